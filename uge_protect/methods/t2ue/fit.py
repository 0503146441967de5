"""Fitting T2UE (see :mod:`uge_protect.methods.t2ue.method` for the method).

``infonce`` (the paper's Eq. 4) trains the generator against a surrogate CLIP, from scratch
after a warm-up on clean pairs unless the surrogate is pretrained; ``em``
(:mod:`uge_protect.methods.t2ue.amortised`) amortises class-wise EM noise per concept into
the generator. This module works on tensors; files belong to the pipeline.
"""

from __future__ import annotations

import copy
import hashlib
import time
from typing import Any

import torch

from uge_protect.errors import UserError
from uge_protect.methods.base import FitContext, clip_arch_id, in_fixed_chunks
from uge_protect.methods.fitting import (BatchCursor, FitResult, ProgressWindow, check_images, check_shares, fit_record,
    module_weights, restore, snapshot)
from uge_protect.methods.t2ue.config import T2UEConfig
from uge_protect.methods.t2ue.generators import build_generator
from uge_protect.methods.t2ue.method import _resize_noise, centered, class_latent, text_features
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.clip import (TINY_CLIP_CONFIG, ClipBundle, build_clip_model, clamp_logit_scale, clip_infonce,
    clip_state, load_clip_state, recorded_model_config, resolve_model_config, zero_shot_loss)
from uge_protect.models.training import pick_device, shift_flip, sync_buffers, sync_grads
def _text_dims(bundle: ClipBundle, context: int, pool: str) -> tuple[int, int]:
    with torch.no_grad():
        pooled, (states, _) = text_features(bundle, torch.zeros((1, context), dtype=torch.long), pool)
    return pooled.shape[-1], states.shape[-1]


def _text_only_state(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    return {k: v for k, v in clip_state(bundle).items() if not k.startswith("visual.")}


def _is_image_side(name: str) -> bool:
    return name.startswith("visual.") or name == "logit_scale"


def _surrogate_trainable(bundle: ClipBundle, lock_text: bool) -> list[torch.nn.Parameter]:
    """The surrogate's parameters a from-scratch fit trains: all, or the image side only."""
    return [p for name, p in bundle.model.named_parameters() if not lock_text or _is_image_side(name)]


@torch.no_grad()
def caption_mean(bundle: ClipBundle, tokens: torch.Tensor, pool: str = "eot", batch_size: int = 512) -> torch.Tensor:
    """Mean pooled embedding (D,) of ``tokens`` under ``bundle``'s text tower."""
    device = next(bundle.model.parameters()).device
    total = None
    for s in range(0, len(tokens), batch_size):
        e, _ = text_features(bundle, tokens[s:s + batch_size].to(device), pool)
        part = e.sum(0)
        total = part if total is None else total + part
    assert total is not None
    return (total / len(tokens)).cpu()



class ClipCaptionEncoder:
    """An open_clip text tower as a caption encoder (its pooled, normalised embedding)."""

    def __init__(self, bundle: ClipBundle, pool: str = "eot"):
        self.bundle, self.pool = bundle, pool
        context = int(bundle.tokenize(["x"]).shape[1])
        self.dim = _text_dims(bundle, context, pool)[0]

    def to(self, device: torch.device | str) -> "ClipCaptionEncoder":
        self.bundle.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        device = next(self.bundle.model.parameters()).device
        tokens = self.bundle.tokenize(list(texts)).to(device)
        return in_fixed_chunks(lambda t: text_features(self.bundle, t, self.pool)[0], tokens).cpu()


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode("utf-8"))
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _caption_encoder(cfg: T2UEConfig, captions: list[str], h: int, w: int
                     ) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The ``em`` objective's caption encoder: (encoder, its identity, config fields, the
    weights the artifact carries of it)."""
    from uge_protect.models.static_text import centred_static, distil
    from uge_protect.models.text_encoders import (MINILM, MINILM_SHA256, CachedEncoder, SentenceEncoder, encoder_files,
        files_as_tensors)

    weights: dict[str, dict[str, torch.Tensor]] = {}
    if cfg.text_encoder == "open_clip":
        model_cfg = resolve_model_config(cfg.surrogate, TINY_CLIP_CONFIG, image_size=h if h == w else None)
        recorded_cfg = recorded_model_config(model_cfg, "the caption encoder's CLIP")
        bundle = build_clip_model(model_cfg, seed=cfg.seed, pretrained=cfg.surrogate_pretrained)
        bundle.model.eval()
        set_frozen(bundle.model, True)
        encoder: Any = ClipCaptionEncoder(bundle, cfg.text_pool)
        state = _text_only_state(bundle)
        weights["text_encoder"] = state
        identity = {"name": f"open_clip:{clip_arch_id(recorded_cfg)}", "sha256": _state_sha256(state),
                    "dim": encoder.dim, "pooling": cfg.text_pool}
        extra = dict(surrogate=recorded_cfg, text_dim=encoder.dim, token_dim=1,
                     context_length=int(bundle.tokenize(["x"]).shape[1]))
        return encoder, identity, extra, weights
    files, name, where = encoder_files(cfg.text_encoder)
    sentence = SentenceEncoder(files, name=name, where=where, expected_sha256=MINILM_SHA256 if name == MINILM else None)
    if cfg.text_encoding == "static":  # the artifact carries the token table: apply reads nothing else
        static = centred_static(distil(sentence), captions)
        encoder, identity = CachedEncoder(static), static.identity
        weights["text_encoder"] = static.tensors()
    else:
        encoder, identity = CachedEncoder(sentence), sentence.identity
        if name != MINILM:  # the artifact carries its encoder: loading it reads nothing outside it
            weights["text_encoder"] = files_as_tensors(files)
    extra = dict(surrogate=None, text_dim=sentence.dim, token_dim=1, context_length=sentence.max_length)
    return encoder, identity, extra, weights


def _fit_em_objective(images: torch.Tensor, captions: list[str], cfg: T2UEConfig, ctx: FitContext,
                      labels: torch.Tensor | None) -> FitResult:
    from uge_protect.methods.t2ue.amortised import fit_amortised

    n, _, h, w = images.shape
    encoder, identity, extra, weights = _caption_encoder(cfg, captions, h, w)
    em_options = {k: v for k, v in (("max_rounds", cfg.em_rounds), ("stop_error", cfg.em_stop_error))
                  if v is not None}
    record, tensors, generator = fit_amortised(
        images, labels, captions, encoder, epsilon=cfg.epsilon, noise_size=cfg.noise_size, z_dim=cfg.z_dim,
        width=cfg.width, backbone=cfg.backbone, steps=int(cfg.steps), batch_size=cfg.batch_size,
        lr=float(cfg.lr), weight_decay=cfg.weight_decay, seed=cfg.seed, device=cfg.device,
        clusters=cfg.clusters, concept_names=cfg.concepts, class_names=cfg.class_names,
        template=cfg.template, em_options=em_options, progress=ctx.progress)
    config = fit_record(
        "t2ue", cfg, **extra, device=pick_device(cfg.device).type, fit_size=[h, w], n_train=n,
        text_encoder_identity=identity, concept_source=record["concept_source"],
        num_concepts=record["num_concepts"], concept_counts=record["concept_counts"],
        regression=record["regression"], em=record["em"], final_loss=record["regression"]["mse"],
        loss_history=[], surrogate_trained=False, processes=ctx.world,  # each process ran the same fit
        fit_architectures=record["fit_architectures"])
    weights["generator"] = module_weights(generator)
    weights["concepts"] = tensors
    return config, weights


def _check_fit_inputs(images: torch.Tensor, captions: list[str], labels: torch.Tensor | None) -> None:
    check_images(images)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if len(captions) != len(images) or len(images) < 2:
        raise UserError("T2UE needs at least two captioned training images")


def fit_t2ue(images: torch.Tensor, captions: list[str], cfg: T2UEConfig, ctx: FitContext | None = None,
             *, labels: torch.Tensor | None = None) -> FitResult:
    """Fit T2UE on uint8 ``images`` (N, 3, H, W) and their ``captions`` with ``cfg.objective``.

    ``em`` (:mod:`uge_protect.methods.t2ue.amortised`) runs the same in every process of a
    launch and ignores checkpoints (it takes minutes); ``infonce`` is :func:`fit_t2ue_infonce`.
    """
    ctx = ctx or FitContext()
    cfg.validate()
    cfg = cfg.resolved()
    if cfg.objective == "infonce":
        return fit_t2ue_infonce(images, captions, cfg, ctx, labels=labels)
    _check_fit_inputs(images, captions, labels)
    if ctx.state is not None:
        raise UserError("the checkpoint was written by a fit with the infonce objective; give --objective "
                        "infonce to resume it, or delete it")
    return _fit_em_objective(images, captions, cfg, ctx, labels)


class _InfoNCEFit:
    """One fit by Eq. 4: the surrogate CLIP, the generator, their optimizers and the
    conditioning encoder, step by step."""

    def __init__(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor | None, cfg: T2UEConfig,
                 ctx: FitContext):
        self.images, self.labels, self.cfg, self.ctx = images, labels, cfg, ctx
        self.started = time.perf_counter()
        self.n, _, self.h, self.w = images.shape
        self.device = ctx.pick_device(cfg.device)
        self.model_cfg = resolve_model_config(cfg.surrogate, TINY_CLIP_CONFIG,
                                              image_size=self.h if self.h == self.w else None)
        self.recorded_cfg = recorded_model_config(self.model_cfg, "the surrogate")
        self.surrogate = build_clip_model(self.model_cfg, seed=cfg.seed, pretrained=cfg.surrogate_pretrained)
        self.surrogate.model.to(self.device)
        self.pretrained = cfg.surrogate_pretrained is not None
        self.tokens = self.surrogate.tokenize(list(captions))
        self.text_dim, self.token_dim = _text_dims(self.surrogate, self.tokens.shape[1], cfg.text_pool)
        self._class_prompts()
        self.generator = build_generator(
            cfg.backbone, text_dim=self.text_dim, token_dim=self.token_dim, z_dim=cfg.z_dim, size=cfg.noise_size,
            width=cfg.width, epsilon=cfg.epsilon, seed=cfg.seed).to(self.device)
        self.g_opt = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lock_text = cfg.lock_text and not self.pretrained
        self.trainable = _surrogate_trainable(self.surrogate, self.lock_text)
        set_frozen(self.surrogate.model, True)
        self.s_opt = torch.optim.AdamW(self.trainable, lr=cfg.surrogate_lr, weight_decay=0.1)
        self.warmup = 0 if self.pretrained else cfg.warmup_steps
        self.total = self.warmup + cfg.steps
        self.g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.g_opt, T_max=cfg.steps)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict[str, Any]] = []

    def _class_prompts(self) -> None:
        """The class term's prompt tokens and fixed z of each class (None without class names)."""
        cfg, labels = self.cfg, self.labels
        self.prompt_tokens: torch.Tensor | None = None
        if not cfg.class_names:
            return
        if labels is None or not bool((labels >= 0).any()):
            raise UserError("T2UE class names need labelled training samples (cls or a label field)")
        if int(labels.max()) >= len(cfg.class_names):
            raise UserError(f"label {int(labels.max())} has no class name ({len(cfg.class_names)} given)")
        self.prompt_tokens = self.surrogate.tokenize([cfg.template.format(c) for c in cfg.class_names]).to(self.device)
        # the fixed z of each class that `shard --mode class` uses (with its default --seed 0)
        self.class_z = torch.stack([class_latent(0, c, cfg.z_dim) for c in range(len(cfg.class_names))]
                                   ).to(self.device)

    def _stateful(self) -> dict[str, Any]:
        return {"generator": self.generator, "g_opt": self.g_opt, "s_opt": self.s_opt, "g_sched": self.g_sched}

    def resume(self) -> None:
        """The conditioning encoder (the pretrained surrogate, else a frozen copy taken after
        the warm-up; with no warm-up or a locked text tower the surrogate's initial, random
        text tower), the training state of a checkpoint, and the batch cursor."""
        cfg, state = self.cfg, self.ctx.state
        self.conditioner: ClipBundle | None = (self.surrogate if self.pretrained else copy.deepcopy(self.surrogate)
                                               if self.warmup == 0 or self.lock_text else None)
        if state is not None:
            self.step = int(state["step"])
            restore(state, self._stateful())
            load_clip_state(self.surrogate, state["surrogate"])
            self.history = list(state["history"])
            if not self.pretrained and self.step >= self.warmup:
                self.conditioner = copy.deepcopy(self.surrogate)
                load_clip_state(self.conditioner, state["conditioner"])
        if self.conditioner is not None:
            self.conditioner.model.eval()
            set_frozen(self.conditioner.model, True)
        self.text_mean = (caption_mean(self.conditioner, self.tokens, cfg.text_pool)
                          if self.conditioner is not None and cfg.center_text else None)
        self.bs = min(cfg.batch_size, self.n)
        self.cursor = BatchCursor(self.n, self.bs, self.gen)
        self.window = ProgressWindow(self.started)
        if state is not None:
            self.cursor.restore(state)
            self.window = ProgressWindow(self.started, state["window"])
            self.gen.set_state(state["rng"])

    def snapshot(self) -> dict[str, Any]:
        """The full training state, for a checkpoint."""
        conditioner = clip_state(self.conditioner) if self.conditioner is not None else None
        return snapshot(self.step, self.gen, self.cursor, self.window, self.history, {
            **self._stateful(), "surrogate": clip_state(self.surrogate), "conditioner": conditioner})

    def surrogate_step(self, loss: torch.Tensor) -> None:
        """One optimizer step of the surrogate's trainable parameters on ``loss``."""
        self.s_opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.trainable, self.ctx.world)
        self.s_opt.step()
        clamp_logit_scale(self.surrogate.model)

    def warmup_step(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A clean CLIP step (the surrogate learns the data before noise is made); after the
        last one, the conditioning encoder is taken and the surrogate restarts if asked."""
        cfg = self.cfg
        self.surrogate.model.train()
        set_frozen(self.trainable, False)
        loss = clip_infonce(self.surrogate, x, t)
        self.surrogate_step(loss)
        if self.step + 1 == self.warmup:
            if not self.lock_text:
                self.conditioner = copy.deepcopy(self.surrogate)
                self.conditioner.model.eval()
                set_frozen(self.conditioner.model, True)
                if cfg.center_text:
                    self.text_mean = caption_mean(self.conditioner, self.tokens, cfg.text_pool)
            if cfg.restart_surrogate:
                # min-min from a fresh surrogate: it learns the data *with* the noise from the
                # start, so the noise can become its easiest feature (as in EM's min-min)
                fresh = clip_state(build_clip_model(self.model_cfg, seed=cfg.seed + 1))
                if self.lock_text:  # a fresh image tower; the locked text tower stays
                    fresh = {k: v for k, v in fresh.items() if _is_image_side(k)}
                load_clip_state(self.surrogate, fresh, strict=not self.lock_text)
                self.s_opt = torch.optim.AdamW(self.trainable, lr=cfg.surrogate_lr, weight_decay=0.1)
        return loss

    @torch.no_grad()
    def _conditioning(self, t: torch.Tensor, y: torch.Tensor | None) -> tuple[Any, Any]:
        """The generator's inputs from the captions' tokens ``t`` and, with labels ``y``, from
        their class prompts (embedding, z, token states), both from the conditioning encoder."""
        cfg, conditioner = self.cfg, self.conditioner
        assert conditioner is not None
        emb, states = text_features(conditioner, t, cfg.text_pool)
        prompts = None
        if y is not None:
            assert self.prompt_tokens is not None
            p_emb, p_states = text_features(conditioner, self.prompt_tokens[y], cfg.text_pool)
            prompts = (centered(p_emb, self.text_mean), self.class_z[y], p_states)
        return (centered(emb, self.text_mean), states), prompts

    def noise_step(self, batch: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A generator step lowering the objective through δ (surrogate fixed), then, for a
        surrogate trained from scratch, a surrogate step on the perturbed pairs (min-min)."""
        cfg, labels, surrogate, world = self.cfg, self.labels, self.surrogate, self.ctx.world
        z = torch.randn((len(batch), cfg.z_dim), generator=self.gen)[self.ctx.rank::world].to(self.device)
        view = (lambda v: shift_flip(v, self.gen)) if cfg.augment else (lambda v: v)
        y = x_lab = None  # the class term's labels: this share's labelled samples, when class names are set
        if self.prompt_tokens is not None and labels is not None and bool((labels[idx] >= 0).any()):
            labelled = (labels[idx] >= 0).to(self.device)
            y, x_lab = labels[idx].to(self.device)[labelled], x[labelled]
        (emb, states), prompts = self._conditioning(t, y)

        def objective(delta: torch.Tensor, p_delta: torch.Tensor | None) -> torch.Tensor:
            """What both players minimise: Eq. 4, plus the optional noise-only and class terms."""
            out = clip_infonce(surrogate, view((x + delta).clamp(0.0, 1.0)), t)
            if cfg.noise_weight > 0:
                out = out + cfg.noise_weight * clip_infonce(surrogate, view((0.5 + delta).clamp(0.0, 1.0)), t)
            if p_delta is not None:
                out = out + cfg.class_weight * zero_shot_loss(
                    surrogate, view((x_lab + p_delta).clamp(0.0, 1.0)), self.prompt_tokens, y)
            return out

        self.generator.train()
        surrogate.model.eval()
        set_frozen(surrogate.model, True)
        delta = _resize_noise(self.generator(emb, z, states), self.h, self.w)
        p_delta = _resize_noise(self.generator(*prompts), self.h, self.w) if prompts is not None else None
        loss = objective(delta, p_delta)
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.generator.parameters(), world)
        self.g_opt.step()
        self.g_sched.step()
        if not self.pretrained:  # surrogate step on the perturbed pairs (min-min)
            set_frozen(self.trainable, False)
            surrogate.model.train()
            self.surrogate_step(objective(delta.detach(), p_delta.detach() if p_delta is not None else None))
        return loss

    def run(self) -> None:
        """Warm-up steps, then noise steps, to the end, reporting and checkpointing."""
        cfg, ctx, warmup, total = self.cfg, self.ctx, self.warmup, self.total
        while self.step < total:
            batch = self.cursor.next()
            idx = batch[ctx.rank::ctx.world]  # this process's share of the batch
            x = self.images[idx].to(self.device).float().div_(255.0)
            t = self.tokens[idx].to(self.device)
            loss = self.warmup_step(x, t) if self.step < warmup else self.noise_step(batch, idx, x, t)
            self.step += 1
            self.window.add({"loss": float(loss.detach())}, len(batch))
            in_warmup = self.step <= warmup
            if self.step % 20 == 0 or self.step in (warmup, total):
                record = self.window.close("surrogate warm-up" if in_warmup else "generator",
                                           self.step if in_warmup else self.step - warmup,
                                           warmup if in_warmup else cfg.steps, ctx)
                if not in_warmup:
                    self.history.append(dict(record))
            if ctx.checkpoint_due(self.step, total):
                sync_buffers(self.generator, ctx.world)  # every process holds the same state from here
                if ctx.checkpoint is not None:
                    ctx.checkpoint(self.snapshot())
        sync_buffers(self.generator, ctx.world)

    def result(self) -> FitResult:
        """The artifact's config and weights: the generator and the conditioning text tower."""
        assert self.conditioner is not None
        history = self.history
        config = fit_record(
            "t2ue", self.cfg, surrogate=self.recorded_cfg, device=self.device.type, fit_size=[self.h, self.w],
            n_train=self.n, text_dim=self.text_dim, token_dim=self.token_dim,
            context_length=int(self.tokens.shape[1]), loss_history=history,
            final_loss=history[-1]["loss"] if history else None, surrogate_trained=not self.pretrained,
            processes=self.ctx.world, fit_architectures=[clip_arch_id(self.recorded_cfg)])
        mean = {"caption_mean": self.text_mean} if self.text_mean is not None else {}
        return config, {"generator": module_weights(self.generator),
                        "text_encoder": {**_text_only_state(self.conditioner), **mean}}


def fit_t2ue_infonce(images: torch.Tensor, captions: list[str], cfg: T2UEConfig, ctx: FitContext | None = None,
                     *, labels: torch.Tensor | None = None) -> FitResult:
    """Train a T2UE generator by the paper's Eq. 4 on uint8 ``images`` and their ``captions``.

    ``labels`` (int64, -1 where absent) are needed only with ``cfg.class_names``.
    ``ctx.state`` (from an earlier ``ctx.checkpoint`` call) resumes a fit; ``ctx.checkpoint``
    is called with the full training state every ``checkpoint_every`` steps. Under a launch
    of ``ctx.world`` processes (process group already joined) each takes every ``world``-th
    sample of each batch, its InfoNCE uses the negatives it holds, and gradients are averaged.
    Returns ``(config, weights)`` for :func:`artifact.save_artifact`: ``generator`` and
    ``text_encoder`` (the conditioning CLIP's text tower).
    """
    ctx = ctx or FitContext()
    cfg.validate()
    cfg = cfg.resolved()
    _check_fit_inputs(images, captions, labels)
    check_shares(cfg.batch_size, len(images), ctx.world)
    fit = _InfoNCEFit(images, captions, labels, cfg, ctx)
    fit.resume()
    fit.run()
    return fit.result()


def fit_t2ue_from_options(images: torch.Tensor, labels: torch.Tensor, captions: list[str | None],
                          options: dict[str, Any], ctx: FitContext | None = None) -> FitResult:
    """The fitter registered under ``"t2ue"`` (needs captions; checkpoints, resumes, multi-process)."""
    return fit_t2ue(images, [str(c) for c in captions], T2UEConfig.from_options(options), ctx, labels=labels)
