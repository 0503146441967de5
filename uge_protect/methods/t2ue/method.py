"""``t2ue``: Text-to-Unlearnable Examples (arXiv 2508.03091), noise made from the caption alone.

A generator G(text, z) → δ (‖δ‖∞ ≤ ε through ε·tanh) is trained to minimise a surrogate
CLIP's symmetric InfoNCE on (image + G(text, z), text) pairs (paper Eq. 4): noise that makes
image-caption pairs trivially easy to match, so a model trained on them learns the noise.

* Caption features come from a **frozen** open_clip text tower (the conditioning encoder):
  the pooled, normalised embedding for the ``ssa`` generator, the token states for ``unet``.
* With pretrained surrogate weights (an open_clip tag or a local checkpoint) the surrogate
  stays frozen and also serves as the conditioning encoder, as in the paper.
* Without them the surrogate is trained from scratch on the training pairs: first
  ``warmup_steps`` plain CLIP steps on clean pairs, after which a frozen copy of its text
  tower becomes the conditioning encoder; then generator and surrogate steps alternate
  (min-min), both lowering the InfoNCE.

Apply needs only captions: ``sample`` mode draws z from the sample's seed (key + run seed);
``class`` mode turns the label into a caption with a template and uses one fixed z per class.
The noise is generated at ``noise_size`` and resized bilinearly to each image (a convex
combination, so the budget holds). This module works on tensors; files belong to the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.methods.artifact import (artifact_fingerprint, check_config, check_fitted_epsilon, load_artifact,
    loading)
from uge_protect.methods.base import (APPLY_CHUNK, ProtectBatch, ProtectionMethod, clip_arch_id, in_fixed_chunks,
    sample_seed)
from uge_protect.methods.t2ue.config import DEFAULT_TEMPLATE, MODES, T2UEArtifact, T2UEConfig, TEXT_POOLS
from uge_protect.methods.t2ue.generators import build_generator
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.clip import (TINY_CLIP_CONFIG, ClipBundle, build_clip_model, clamp_logit_scale, clip_infonce,
    clip_state, load_clip_state, recorded_model_config, resolve_model_config, zero_shot_loss)
from uge_protect.models.training import pick_device, shift_flip, sync_buffers, sync_grads

Progress = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- caption features




def text_features(bundle: ClipBundle, tokens: torch.Tensor, pool: str = "eot"
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Pooled normalised embeddings (B, D) and token states with their mask ((B, L, W), (B, L)).

    ``pool="eot"`` is CLIP's own caption embedding (end-of-text token, projected); ``"mean"``
    averages the token states (width W), which keeps every word of the caption visible even
    in an untrained tower.
    """
    model = bundle.model
    if not hasattr(model, "token_embedding"):
        raise UserError("T2UE needs an open_clip CLIP with its own text transformer (not an HF text tower)")
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    from open_clip.transformer import text_global_pool

    pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    mask = (tokens != 0).to(x.dtype)
    mask[:, 0] = 1.0  # never an all-masked row
    if pool == "mean":
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled.float(), dim=-1), (x.float(), mask)


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


def centered(emb: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``emb`` minus the caption mean, renormalised (unchanged when ``mean`` is None)."""
    return emb if mean is None else F.normalize(emb - mean.to(emb.device), dim=-1)


def _text_dims(bundle: ClipBundle, context: int, pool: str) -> tuple[int, int]:
    with torch.no_grad():
        pooled, (states, _) = text_features(bundle, torch.zeros((1, context), dtype=torch.long), pool)
    return pooled.shape[-1], states.shape[-1]


def _text_only_state(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    return {k: v for k, v in clip_state(bundle).items() if not k.startswith("visual.")}


def class_latent(seed: int, label: int, z_dim: int) -> torch.Tensor:
    """The fixed z of class ``label`` in class mode, for an apply ``seed``."""
    return latent(sample_seed(seed, f"class:{int(label)}"), z_dim)


def _is_image_side(name: str) -> bool:
    return name.startswith("visual.") or name == "logit_scale"


def _surrogate_trainable(bundle: ClipBundle, lock_text: bool) -> list[torch.nn.Parameter]:
    """The surrogate's parameters a from-scratch fit trains: all, or the image side only."""
    return [p for name, p in bundle.model.named_parameters() if not lock_text or _is_image_side(name)]


def latent(seed: int, z_dim: int) -> torch.Tensor:
    """z ~ N(0, I) from a seed, drawn on the CPU (the same on every device)."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed)))


# --------------------------------------------------------------------------- fit


def _resize_noise(delta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if tuple(delta.shape[-2:]) == (h, w):
        return delta
    return F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)


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
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode("utf-8"))
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fit_em_objective(images: torch.Tensor, captions: list[str], cfg: T2UEConfig, progress: Progress | None,
                      labels: torch.Tensor | None) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    from uge_protect.methods.t2ue.amortised import fit_amortised
    from uge_protect.models.static_text import centred_static, distil
    from uge_protect.models.text_encoders import (MINILM, MINILM_SHA256, CachedEncoder, SentenceEncoder, encoder_files,
        files_as_tensors)

    n, _, h, w = images.shape
    extra: dict[str, Any] = {}
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
        extra.update(surrogate=recorded_cfg, text_dim=encoder.dim, token_dim=1,
                     context_length=int(bundle.tokenize(["x"]).shape[1]))
    else:
        files, name, where = encoder_files(cfg.text_encoder)
        sentence = SentenceEncoder(files, name=name, where=where,
                                   expected_sha256=MINILM_SHA256 if name == MINILM else None)
        if cfg.text_encoding == "static":  # the artifact carries the token table: apply reads nothing else
            static = centred_static(distil(sentence), captions)
            encoder, identity = CachedEncoder(static), static.identity
            weights["text_encoder"] = static.tensors()
        else:
            encoder, identity = CachedEncoder(sentence), sentence.identity
            if name != MINILM:  # the artifact carries its encoder: loading it reads nothing outside it
                weights["text_encoder"] = files_as_tensors(files)
        extra.update(surrogate=None, text_dim=sentence.dim, token_dim=1, context_length=sentence.max_length)
    em_options = {k: v for k, v in (("max_rounds", cfg.em_rounds), ("stop_error", cfg.em_stop_error))
                  if v is not None}
    record, tensors, generator = fit_amortised(
        images, labels, captions, encoder, epsilon=cfg.epsilon, noise_size=cfg.noise_size, z_dim=cfg.z_dim,
        width=cfg.width, backbone=cfg.backbone, steps=int(cfg.steps), batch_size=cfg.batch_size,
        lr=float(cfg.lr), weight_decay=cfg.weight_decay, seed=cfg.seed, device=cfg.device,
        clusters=cfg.clusters, concept_names=cfg.concepts, class_names=cfg.class_names,
        template=cfg.template, em_options=em_options, progress=progress)
    config = {
        "method": "t2ue",
        **dataclasses.asdict(cfg),
        **extra,
        "device": pick_device(cfg.device).type,
        "fit_size": [h, w],
        "n_train": n,
        "text_encoder_identity": identity,
        "concept_source": record["concept_source"],
        "num_concepts": record["num_concepts"],
        "concept_counts": record["concept_counts"],
        "regression": record["regression"],
        "em": record["em"],
        "final_loss": record["regression"]["mse"],
        "loss_history": [],
        "surrogate_trained": False,
        "processes": 1,
        "fit_architectures": record["fit_architectures"],
    }
    weights["generator"] = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
    weights["concepts"] = tensors
    return config, weights


def _check_fit_inputs(images: torch.Tensor, captions: list[str], labels: torch.Tensor | None) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if len(captions) != len(images) or len(images) < 2:
        raise UserError("T2UE needs at least two captioned training images")


def fit_t2ue(images: torch.Tensor, captions: list[str], cfg: T2UEConfig, progress: Progress | None = None,
             *, labels: torch.Tensor | None = None, state: dict[str, Any] | None = None,
             checkpoint: Callable[[dict[str, Any]], None] | None = None, checkpoint_every: int = 0,
             rank: int = 0, world: int = 1) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Fit T2UE on uint8 ``images`` (N, 3, H, W) and their ``captions`` with ``cfg.objective``.

    ``em`` (:mod:`t2ue_amortised`) runs the same in every process of a launch and ignores
    checkpoints (it takes minutes); ``infonce`` is :func:`fit_t2ue_infonce`.
    """
    cfg.validate()
    cfg = cfg.resolved()
    if cfg.objective == "infonce":
        return fit_t2ue_infonce(images, captions, cfg, progress, labels=labels, state=state,
                                checkpoint=checkpoint, checkpoint_every=checkpoint_every, rank=rank, world=world)
    _check_fit_inputs(images, captions, labels)
    if state is not None:
        raise UserError("the checkpoint was written by a fit with the infonce objective; give --objective "
                        "infonce to resume it, or delete it")
    config, weights = _fit_em_objective(images, captions, cfg, progress, labels)
    config["processes"] = world  # each process ran the same fit; the main one writes it
    return config, weights


def fit_t2ue_infonce(images: torch.Tensor, captions: list[str], cfg: T2UEConfig, progress: Progress | None = None,
                     *, labels: torch.Tensor | None = None, state: dict[str, Any] | None = None,
                     checkpoint: Callable[[dict[str, Any]], None] | None = None, checkpoint_every: int = 0,
                     rank: int = 0, world: int = 1) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Train a T2UE generator by the paper's Eq. 4 on uint8 ``images`` and their ``captions``.

    ``labels`` (int64, -1 where absent) are needed only with ``cfg.class_names``. ``state`` (from an earlier ``checkpoint`` call) resumes a fit; ``checkpoint`` is called
    with the full training state every ``checkpoint_every`` steps. Under a launch of
    ``world`` processes (process group already joined) each takes every ``world``-th sample
    of each batch, its InfoNCE uses the negatives it holds, and gradients are averaged.
    Returns ``(config, weights)`` for :func:`artifact.save_artifact`: ``generator`` and
    ``text_encoder`` (the conditioning CLIP's text tower).
    """
    cfg.validate()
    cfg = cfg.resolved()
    _check_fit_inputs(images, captions, labels)
    if min(cfg.batch_size, len(images)) < 2 * world:
        raise UserError(f"batch size {cfg.batch_size} is too small for {world} processes (at least 2 each)")
    started = time.perf_counter()
    n, _, h, w = images.shape
    device = pick_device(cfg.device)
    model_cfg = resolve_model_config(cfg.surrogate, TINY_CLIP_CONFIG, image_size=h if h == w else None)
    recorded_cfg = recorded_model_config(model_cfg, "the surrogate")
    surrogate = build_clip_model(model_cfg, seed=cfg.seed, pretrained=cfg.surrogate_pretrained)
    surrogate.model.to(device)
    pretrained = cfg.surrogate_pretrained is not None
    tokens = surrogate.tokenize(list(captions))
    text_dim, token_dim = _text_dims(surrogate, tokens.shape[1], cfg.text_pool)
    prompt_tokens = None
    if cfg.class_names:
        if labels is None or not bool((labels >= 0).any()):
            raise UserError("T2UE class names need labelled training samples (cls or a label field)")
        if int(labels.max()) >= len(cfg.class_names):
            raise UserError(f"label {int(labels.max())} has no class name ({len(cfg.class_names)} given)")
        prompt_tokens = surrogate.tokenize([cfg.template.format(c) for c in cfg.class_names]).to(device)
        # the fixed z of each class that `shard --mode class` uses (with its default --seed 0)
        class_z = torch.stack([class_latent(0, c, cfg.z_dim) for c in range(len(cfg.class_names))]).to(device)
    generator = build_generator(cfg.backbone, text_dim=text_dim, token_dim=token_dim, z_dim=cfg.z_dim,
                                size=cfg.noise_size, width=cfg.width, epsilon=cfg.epsilon, seed=cfg.seed).to(device)
    g_opt = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lock_text = cfg.lock_text and not pretrained
    trainable = _surrogate_trainable(surrogate, lock_text)
    set_frozen(surrogate.model, True)
    s_opt = torch.optim.AdamW(trainable, lr=cfg.surrogate_lr, weight_decay=0.1)
    warmup = 0 if pretrained else cfg.warmup_steps
    total = warmup + cfg.steps
    g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(g_opt, T_max=cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    # the caption encoder: the pretrained surrogate, else a frozen copy taken after the warm-up
    # (with no warm-up or a locked text tower: the surrogate's initial, random text tower)
    conditioner: ClipBundle | None = (surrogate if pretrained else copy.deepcopy(surrogate)
                                      if warmup == 0 or lock_text else None)
    history: list[dict[str, float]] = []
    if state is not None:
        step = int(state["step"])
        generator.load_state_dict(state["generator"])
        load_clip_state(surrogate, state["surrogate"])
        g_opt.load_state_dict(state["g_opt"])
        s_opt.load_state_dict(state["s_opt"])
        g_sched.load_state_dict(state["g_sched"])
        history = list(state["history"])
        if not pretrained and step >= warmup:
            conditioner = copy.deepcopy(surrogate)
            load_clip_state(conditioner, state["conditioner"])
    if conditioner is not None:
        conditioner.model.eval()
        set_frozen(conditioner.model, True)
    text_mean = caption_mean(conditioner, tokens, cfg.text_pool) if conditioner is not None and cfg.center_text else None
    def surrogate_step(loss: torch.Tensor) -> None:
        s_opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(trainable, world)
        s_opt.step()
        clamp_logit_scale(surrogate.model)

    bs = min(cfg.batch_size, n)
    order, cursor = torch.randperm(n, generator=gen), 0
    seen = 0
    tick = started
    window: list[float] = []
    if state is not None:
        order, cursor, window = state["order"].clone(), int(state["cursor"]), list(state["window"])
        gen.set_state(state["rng"])
    while step < total:
        if cursor + bs > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        batch = order[cursor:cursor + bs]
        cursor += bs
        idx = batch[rank::world]  # this process's share of the batch
        x = images[idx].to(device).float().div_(255.0)
        t = tokens[idx].to(device)
        if step < warmup:  # clean CLIP steps: the surrogate learns the data before noise is made
            surrogate.model.train()
            set_frozen(trainable, False)
            loss = clip_infonce(surrogate, x, t)
            surrogate_step(loss)
            if step + 1 == warmup:
                if not lock_text:
                    conditioner = copy.deepcopy(surrogate)
                    conditioner.model.eval()
                    set_frozen(conditioner.model, True)
                    if cfg.center_text:
                        text_mean = caption_mean(conditioner, tokens, cfg.text_pool)
                if cfg.restart_surrogate:
                    # min-min from a fresh surrogate: it learns the data *with* the noise from the
                    # start, so the noise can become its easiest feature (as in EM's min-min)
                    fresh = clip_state(build_clip_model(model_cfg, seed=cfg.seed + 1))
                    if lock_text:  # a fresh image tower; the locked text tower stays
                        fresh = {k: v for k, v in fresh.items() if _is_image_side(k)}
                    load_clip_state(surrogate, fresh, strict=not lock_text)
                    s_opt = torch.optim.AdamW(trainable, lr=cfg.surrogate_lr, weight_decay=0.1)
        else:
            assert conditioner is not None
            z = torch.randn((len(batch), cfg.z_dim), generator=gen)[rank::world].to(device)
            view = (lambda v: shift_flip(v, gen)) if cfg.augment else (lambda v: v)
            y = None  # the class term's labels: this share's labelled samples, when class names are set
            if prompt_tokens is not None and bool((labels[idx] >= 0).any()):
                labelled = (labels[idx] >= 0).to(device)
                y, x_lab = labels[idx].to(device)[labelled], x[labelled]
            with torch.no_grad():
                emb, states = text_features(conditioner, t, cfg.text_pool)
                emb = centered(emb, text_mean)
                if y is not None:
                    p_emb, p_states = text_features(conditioner, prompt_tokens[y], cfg.text_pool)
                    p_emb = centered(p_emb, text_mean)
                    p_z = class_z[y]

            def objective(delta: torch.Tensor, p_delta: torch.Tensor | None) -> torch.Tensor:
                """What both players minimise: Eq. 4, plus the optional noise-only and class terms."""
                out = clip_infonce(surrogate, view((x + delta).clamp(0.0, 1.0)), t)
                if cfg.noise_weight > 0:
                    out = out + cfg.noise_weight * clip_infonce(surrogate, view((0.5 + delta).clamp(0.0, 1.0)), t)
                if p_delta is not None:
                    out = out + cfg.class_weight * zero_shot_loss(
                        surrogate, view((x_lab + p_delta).clamp(0.0, 1.0)), prompt_tokens, y)
                return out

            # generator step: lower the objective through δ, surrogate fixed
            generator.train()
            surrogate.model.eval()
            set_frozen(surrogate.model, True)
            delta = _resize_noise(generator(emb, z, states), h, w)
            p_delta = _resize_noise(generator(p_emb, p_z, p_states), h, w) if y is not None else None
            loss = objective(delta, p_delta)
            g_opt.zero_grad(set_to_none=True)
            loss.backward()
            sync_grads(generator.parameters(), world)
            g_opt.step()
            g_sched.step()
            if not pretrained:  # surrogate step on the perturbed pairs (min-min)
                set_frozen(trainable, False)
                surrogate.model.train()
                surrogate_step(objective(delta.detach(), p_delta.detach() if p_delta is not None else None))
        step += 1
        seen += len(batch)
        window.append(float(loss.detach()))
        in_warmup = step <= warmup
        if step % 20 == 0 or step in (warmup, total):
            now = time.perf_counter()
            phase = "surrogate warm-up" if in_warmup else "generator"
            record = {"phase": phase, "step": step if in_warmup else step - warmup,
                      "loss": sum(window) / len(window)}
            if not in_warmup:
                history.append(dict(record))
            if progress is not None:
                progress({**record, "steps": warmup if in_warmup else cfg.steps, "seconds": now - started,
                          "images_per_s": seen / max(now - tick, 1e-9)})
            window, seen, tick = [], 0, now
        if checkpoint_every and step % checkpoint_every == 0 and step < total:
            sync_buffers(generator, world)  # every process holds the same state from here
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0 and step < total:
            checkpoint(copy.deepcopy({  # a snapshot: the live tensors keep changing
                "step": step, "generator": generator.state_dict(), "surrogate": clip_state(surrogate),
                "conditioner": clip_state(conditioner) if conditioner is not None else None, "g_opt": g_opt.state_dict(), "s_opt": s_opt.state_dict(),
                "g_sched": g_sched.state_dict(), "rng": gen.get_state(), "history": history,
                "order": order, "cursor": cursor, "window": window,
            }))
    assert conditioner is not None
    sync_buffers(generator, world)
    config = {
        "method": "t2ue",
        **dataclasses.asdict(cfg),
        "surrogate": recorded_cfg,
        "device": device.type,
        "fit_size": [h, w],
        "n_train": n,
        "text_dim": text_dim,
        "token_dim": token_dim,
        "context_length": int(tokens.shape[1]),
        "loss_history": history,
        "final_loss": history[-1]["loss"] if history else None,
        "surrogate_trained": not pretrained,
        "processes": world,
        "fit_architectures": [clip_arch_id(recorded_cfg)],
    }
    weights = {
        "generator": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()},
        "text_encoder": {**_text_only_state(conditioner),
                         **({"caption_mean": text_mean} if text_mean is not None else {})},
    }
    return config, weights


def fit_t2ue_from_options(images: torch.Tensor, labels: torch.Tensor, captions: list[str | None],
                          options: dict[str, Any], progress: Progress | None = None, **kwargs: Any
                          ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The fitter registered under ``"t2ue"`` (needs captions; checkpoints, resumes, multi-process)."""
    return fit_t2ue(images, [str(c) for c in captions], T2UEConfig.from_options(options), progress,
                    labels=labels, **kwargs)


# --------------------------------------------------------------------------- apply


class TextToUnlearnable(ProtectionMethod):
    """Apply a fitted T2UE generator: noise from each sample's caption (or class prompt) and z."""

    name = "t2ue"
    text_only = True

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]], *,
                 mode: str = "sample", class_names: list[str] | None = None, template: str = DEFAULT_TEMPLATE,
                 seed: int = 0, fingerprint: str | None = None):
        super().__init__(epsilon=float(config["epsilon"]))
        if mode not in MODES:
            raise UserError(f"unknown T2UE mode {mode!r}; choose sample or class")
        if mode == "class":
            if not class_names:
                raise UserError("T2UE class mode needs class names (--class-names)")
            if "{}" not in template:
                raise UserError(f"the class template must contain '{{}}' for the class name, got {template!r}")
        self.mode = mode
        self.class_names = list(class_names or [])
        self.template = template
        self.seed = int(seed)
        self._config = dict(config)
        self._fingerprint = fingerprint
        self.z_dim = int(config["z_dim"])
        self.text_pool = str(config.get("text_pool", "eot"))
        if self.text_pool not in TEXT_POOLS:
            raise UserError(f"T2UE artifact has an unknown text pooling {self.text_pool!r}")
        self.objective = str(config.get("objective", "infonce"))
        self.sentence_encoder: Any = None
        if self.objective == "em" and config.get("text_encoder") != "open_clip":
            if "generator" not in weights:
                raise UserError("T2UE artifact lacks its generator weights")
            from uge_protect.models import static_text
            from uge_protect.models.text_encoders import MINILM, CachedEncoder, encoder_from_tensors, load_text_encoder

            ident = config["text_encoder_identity"]
            # the static table or encoder files the artifact carries, or the installed MiniLM
            # package: never a path or a Hub name read from the (untrusted) artifact
            if ident.get("pooling") == static_text.POOLING:
                if "text_encoder" not in weights:
                    raise UserError("T2UE artifact records a static caption encoder but does not carry it "
                                    "(text_encoder.safetensors); refit it")
                sentence = static_text.from_tensors(weights["text_encoder"], ident)
            elif ident["name"] == MINILM:
                sentence = load_text_encoder(MINILM, expected_sha256=str(ident["sha256"]))
            elif "text_encoder" in weights:
                sentence = encoder_from_tensors(weights["text_encoder"], name=str(ident["name"]),
                                                where="T2UE artifact's caption encoder",
                                                expected_sha256=str(ident["sha256"]))
            else:
                raise UserError("T2UE artifact names a caption encoder other than minilm but does not carry "
                                "its files (text_encoder.safetensors); refit it")
            self.sentence_encoder = CachedEncoder(sentence)
            if self.sentence_encoder.encoder.dim != int(config["text_dim"]):
                raise UserError("T2UE artifact's caption encoder does not have the recorded dimension")
            self.encoder = None
            self.text_mean = None
            self._build_generator(config, weights)
            return
        if "generator" not in weights or "text_encoder" not in weights:
            raise UserError("T2UE artifact lacks its generator or text encoder weights")
        self.encoder = build_clip_model(config["surrogate"], seed=0)
        text_state = dict(weights["text_encoder"])
        self.text_mean = text_state.pop("caption_mean", None)
        if bool(config.get("center_text")) != (self.text_mean is not None):
            raise UserError("T2UE artifact's caption mean does not match its center_text setting")
        missing, unexpected = self.encoder.model.load_state_dict(text_state, strict=False)
        if unexpected or any(not k.startswith("visual.") for k in missing):
            raise UserError("T2UE artifact's text encoder does not fit its model config")
        self.encoder.model.eval()
        set_frozen(self.encoder.model, True)
        self._build_generator(config, weights)

    def _build_generator(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> None:
        def build() -> torch.nn.Module:
            return build_generator(
                config["backbone"], text_dim=int(config["text_dim"]), token_dim=int(config["token_dim"]),
                z_dim=self.z_dim, size=int(config["noise_size"]), width=int(config["width"]),
                epsilon=float(config["epsilon"]))

        with torch.device("meta"):  # shapes first: sizes in the config never allocate beyond the weights
            shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
        given = {k: tuple(v.shape) for k, v in weights["generator"].items()}
        if shapes != given:
            wrong = sorted(set(shapes) ^ set(given)) or sorted(k for k in shapes if shapes[k] != given[k])
            raise UserError(f"T2UE artifact's generator does not load: its weights do not fit its config "
                            f"(first mismatch: {wrong[0]})")
        self.generator = build()
        try:
            self.generator.load_state_dict(weights["generator"], strict=True)
        except RuntimeError as exc:
            raise UserError(f"T2UE artifact's generator does not load: {str(exc).splitlines()[0]}") from exc
        self.generator.eval()
        set_frozen(self.generator, True)

    @property
    def requires_caption(self) -> bool:  # type: ignore[override]
        return self.mode == "sample"

    @property
    def requires_label(self) -> bool:  # type: ignore[override]
        return self.mode == "class"

    @classmethod
    def from_artifact(cls, path: str, epsilon: float | None = None, **options: Any) -> "TextToUnlearnable":
        """Load an artifact made by ``uge-protect fit t2ue``; ``options`` are mode, class_names,
        template and seed. The artifact's ε is authoritative (another given ε is an error)."""
        def check(c: dict[str, Any]) -> Any:
            required = ["epsilon", "backbone", "z_dim", "noise_size", "width", "text_dim", "token_dim"]
            em = c.get("objective") == "em"
            if not em or c.get("text_encoder") == "open_clip":
                required.append("surrogate")
            if em:
                required += ["text_encoder", "text_encoder_identity"]
            # artifacts from before the em objective are infonce fits
            return check_config(path, c, T2UEArtifact, required=required,
                                legacy={"objective": "infonce", "steps": 400, "lr": 2e-3})

        config, weights = load_artifact(path, expected_method="t2ue", check=check)
        check_fitted_epsilon(path, config, epsilon)
        with loading(path, "T2UE"):
            return cls(config, weights, fingerprint=artifact_fingerprint(path), **options)

    def to(self, device: torch.device | str) -> "TextToUnlearnable":
        super().to(device)
        if self.encoder is not None:
            self.encoder.model.to(self.device)
        if self.sentence_encoder is not None:
            self.sentence_encoder.encoder.to(self.device)
        self.generator.to(self.device)
        return self

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def fit_architectures(self) -> list[str]:
        """em: the EM surrogate its concept noise was fitted against; infonce: the surrogate CLIP."""
        if self.objective == "em":
            recorded = self._config.get("fit_architectures")
            if isinstance(recorded, list) and all(isinstance(a, str) for a in recorded):
                return list(recorded)
            em = self._config.get("em") or {}
            return [str(em.get("surrogate") or "small_cnn")]
        return [clip_arch_id(self._config["surrogate"])]

    def config(self) -> dict[str, Any]:
        keep = ("objective", "backbone", "noise_size", "z_dim", "width", "fit_size", "steps", "surrogate_trained",
                "surrogate_pretrained", "final_loss", "text_encoder_identity", "concept_source", "num_concepts")
        extra: dict[str, Any] = {"mode": self.mode, "seed": self.seed, "apply_chunk": APPLY_CHUNK}
        if self.mode == "class":
            extra.update(class_names=self.class_names, template=self.template)
        return {**super().config(), **{k: self._config.get(k) for k in keep}, **extra}

    def prompts_and_latents(self, batch: ProtectBatch) -> tuple[list[str], torch.Tensor]:
        """The text each sample's noise is made from, and its z (B, z_dim)."""
        if self.mode == "class":
            texts, zs = [], []
            for lab in batch.labels:
                if lab is None or not 0 <= int(lab) < len(self.class_names):
                    raise UserError(f"label {lab!r} has no class name (give --class-names for every class)")
                texts.append(self.template.format(self.class_names[int(lab)]))
                zs.append(class_latent(self.seed, int(lab), self.z_dim))
            return texts, torch.stack(zs)
        if any(not c for c in batch.captions):
            raise UserError("T2UE sample mode needs a caption for every sample")
        return [str(c) for c in batch.captions], torch.stack([latent(s, self.z_dim) for s in batch.seeds])

    @torch.no_grad()
    def noise(self, texts: list[str], z: torch.Tensor) -> torch.Tensor:
        """Noise (B, 3, noise_size, noise_size) for captions and latents, in fixed chunks."""
        if self.sentence_encoder is not None:
            emb = self.sentence_encoder.encode(list(texts)).to(self.device)
            return in_fixed_chunks(lambda e, zz: self.generator(e, zz).float(), emb, z.float().to(self.device))

        def chunk(t: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
            emb, states = text_features(self.encoder, t, self.text_pool)
            return self.generator(centered(emb, self.text_mean), zz, states).float()

        return in_fixed_chunks(chunk, self.encoder.tokenize(texts).to(self.device), z.float().to(self.device))

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        texts, z = self.prompts_and_latents(batch)
        _, _, h, w = batch.pixels.shape
        return _resize_noise(self.noise(texts, z), h, w).clamp(-self.epsilon, self.epsilon)
