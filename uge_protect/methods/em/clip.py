"""EM's CLIP variant: error-minimizing noise for unlabelled image-text pairs.

Instead of a classifier's cross-entropy, PGD minimizes a surrogate CLIP's contrastive loss
between the perturbed image and its own caption, so that a model trained on the pairs finds
the noise an easier match for the caption than the image content.

* Fit (min-min, like :mod:`em`): alternate a few AdamW steps of the surrogate CLIP on the
  symmetric InfoNCE of (clip(x + δ), caption) batches with PGD sweeps that lower each
  sample's loss. With pretrained surrogate weights the surrogate stays frozen and only the
  PGD sweeps run.
* The per-sample loss is the image→text cross-entropy of the true caption against a fixed
  bank of other training captions (stored in the artifact as tokens), not against the other
  captions of the batch: a sample's noise then never depends on which samples share its
  batch, which streaming apply needs. Bank captions identical to the sample's own are
  masked out.
* Fit stops when the surrogate retrieves the true caption first (among it and the bank) for
  all but ``stop_error`` of the perturbed training images, or after ``max_rounds``.
* Apply runs the same PGD against the fitted surrogate, per batch, from an initial δ drawn
  from each sample's seed, in fixed chunks so the floats do not depend on batch size. δ is
  computed at the image's own resolution (the surrogate resizes its input differentiably).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.methods.base import APPLY_CHUNK, FitContext, ProtectBatch, clip_arch_id
from uge_protect.methods.budget import pgd_minimize
from uge_protect.methods.em.config import EMClipConfig
from uge_protect.methods.em.fitted import FittedEM
from uge_protect.methods.fitting import BatchCursor, FitResult, check_images, fit_record
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.clip import (TINY_CLIP_CONFIG, ClipBundle, build_clip_model, clamp_logit_scale, clip_infonce,
    clip_state, load_clip_state, logit_scale, recorded_model_config, resolve_model_config)


def _same_caption(tokens: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: bank caption k has the same tokens as sample b's caption."""
    return (tokens[:, None, :] == bank[None, :, :]).all(dim=-1)


def sample_loss(bundle: ClipBundle, x: torch.Tensor, text_emb: torch.Tensor, bank_emb: torch.Tensor,
                same: torch.Tensor) -> torch.Tensor:
    """Per-sample image→text cross-entropy of the own caption against the bank, (B,)."""
    img = bundle.encode_images(x)
    pos = (img * text_emb).sum(dim=-1, keepdim=True)
    neg = (img @ bank_emb.T).masked_fill(same, float("-inf"))
    logits = logit_scale(bundle).detach() * torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(x), dtype=torch.long, device=x.device), reduction="none")


def pgd_min_clip(bundle: ClipBundle, x: torch.Tensor, text_emb: torch.Tensor, bank_emb: torch.Tensor,
                 same: torch.Tensor, delta: torch.Tensor, epsilon: float, step_size: float, steps: int
                 ) -> torch.Tensor:
    """``steps`` signed-gradient steps lowering :func:`sample_loss`, projected after each step."""
    return pgd_minimize(lambda xp: sample_loss(bundle, xp, text_emb, bank_emb, same).sum(), x, delta,
                        epsilon, step_size, steps)


@torch.no_grad()
def _retrieval_error(bundle: ClipBundle, images: torch.Tensor, delta: torch.Tensor, tokens: torch.Tensor,
                     bank: torch.Tensor, bank_emb: torch.Tensor, batch_size: int) -> float:
    wrong = 0
    for s in range(0, len(images), batch_size):
        x = (images[s:s + batch_size].float().div(255.0) + delta[s:s + batch_size]).clamp_(0.0, 1.0)
        t = tokens[s:s + batch_size]
        img = bundle.encode_images(x)
        pos = (img * bundle.encode_tokens(t)).sum(-1)
        neg = (img @ bank_emb.T).masked_fill(_same_caption(t, bank), float("-inf"))
        wrong += int((neg.max(dim=1).values >= pos).sum())  # the own caption must score highest
    return wrong / len(images)


def _train_clip(bundle: ClipBundle, opt: torch.optim.Optimizer, images: torch.Tensor, tokens: torch.Tensor,
                delta: torch.Tensor, cursor: BatchCursor, batches: int) -> None:
    """A few AdamW steps of the surrogate CLIP on the perturbed pairs."""
    bundle.model.train()
    set_frozen(bundle.model, False)
    for _ in range(batches):
        idx = cursor.next().to(images.device)
        x = (images[idx].float().div_(255.0) + delta[idx]).clamp_(0.0, 1.0)
        loss = clip_infonce(bundle, x, tokens[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_logit_scale(bundle.model)


def _pgd_sweep(bundle: ClipBundle, images: torch.Tensor, tokens: torch.Tensor, bank: torch.Tensor,
               delta: torch.Tensor, cfg: EMClipConfig) -> torch.Tensor:
    """A PGD sweep over the training set lowering each sample's loss against the bank (in
    place); returns the bank's embeddings under the frozen surrogate."""
    bundle.model.eval()
    set_frozen(bundle.model, True)
    with torch.no_grad():
        bank_emb = bundle.encode_tokens(bank)
    bs = cfg.batch_size
    for s in range(0, len(images), bs):
        t = tokens[s:s + bs]
        x = images[s:s + bs].float().div_(255.0)
        with torch.no_grad():
            text_emb = bundle.encode_tokens(t)
        delta[s:s + bs] = pgd_min_clip(bundle, x, text_emb, bank_emb, _same_caption(t, bank), delta[s:s + bs],
                                       cfg.epsilon, cfg.step_size, cfg.pgd_steps)
    return bank_emb


def fit_em_clip(images: torch.Tensor, captions: list[str], cfg: EMClipConfig, ctx: FitContext | None = None
                ) -> FitResult:
    """Fit EM-CLIP noise by min-min on uint8 ``images`` (N, 3, H, W) and their ``captions``.

    Returns ``(config, weights)`` for :func:`artifact.save_artifact`: the surrogate CLIP's
    state under ``"surrogate"`` and the bank's caption tokens under ``"bank"``.
    """
    ctx = ctx or FitContext()
    cfg.validate()
    check_images(images)
    if len(captions) != len(images):
        raise ValueError("one caption per image is needed")
    if len(images) < 2:
        raise UserError("EM's CLIP mode needs at least two captioned images")
    started = time.perf_counter()
    n, _, h, w = images.shape
    device = ctx.pick_device(cfg.device)
    model_cfg = resolve_model_config(cfg.clip_model, TINY_CLIP_CONFIG, image_size=h if h == w else None)
    recorded_cfg = recorded_model_config(model_cfg, "the CLIP model")
    bundle = build_clip_model(model_cfg, seed=cfg.seed, pretrained=cfg.clip_pretrained)
    bundle.model.to(device)
    trainable = cfg.clip_pretrained is None
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = bundle.tokenize(list(captions)).to(device)
    bank = tokens[torch.randperm(n, generator=gen)[: min(cfg.bank_size, n)].to(device)]
    images = images.to(device)
    delta = ((torch.rand((n, 3, h, w), generator=gen) * 2 - 1) * cfg.epsilon).to(device)
    opt = torch.optim.AdamW([p for p in bundle.model.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    cursor = BatchCursor(n, min(cfg.batch_size, n), gen)
    history: list[float] = []
    for rnd in range(1, cfg.max_rounds + 1):
        if trainable:
            _train_clip(bundle, opt, images, tokens, delta, cursor, cfg.train_batches)
        bank_emb = _pgd_sweep(bundle, images, tokens, bank, delta, cfg)
        error = _retrieval_error(bundle, images, delta, tokens, bank, bank_emb, cfg.batch_size)
        history.append(round(error, 6))
        ctx.report({"round": rnd, "max_rounds": cfg.max_rounds, "train_error": error,
                    "seconds": time.perf_counter() - started})
        if error < cfg.stop_error:
            break
    set_frozen(bundle.model, False)
    config = fit_record("em", cfg, clip_model=recorded_cfg, device=device.type, fit_size=[h, w], n_train=n,
                        bank_size=int(len(bank)), rounds=len(history), train_error=history[-1],
                        train_error_history=history, converged=history[-1] < cfg.stop_error,
                        surrogate_trained=trainable, fit_architectures=[clip_arch_id(recorded_cfg)])
    return config, {"surrogate": clip_state(bundle), "bank": {"tokens": bank.detach().cpu().clone()}}


class ErrorMinimizingClip(FittedEM):
    """Apply a fitted EM-CLIP artifact: PGD against its surrogate CLIP, per sample and caption."""

    requires_caption = True

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                 fingerprint: str | None = None):
        super().__init__(config, fingerprint)
        self.mode = "clip"
        if "surrogate" not in weights or "tokens" not in weights.get("bank", {}):
            raise UserError("EM-CLIP artifact lacks its surrogate or caption bank weights")
        # The architecture only: weights come from the artifact, never from the network.
        self.bundle = build_clip_model(config["clip_model"], seed=0)
        load_clip_state(self.bundle, weights["surrogate"])
        self.bundle.model.eval()
        set_frozen(self.bundle.model, True)
        self.bank = weights["bank"]["tokens"].long()
        with torch.no_grad():
            self.bank_emb = self.bundle.encode_tokens(self.bank)

    def to(self, device: torch.device | str) -> "ErrorMinimizingClip":
        super().to(device)
        self.bundle.model.to(self.device)
        self.bank = self.bank.to(self.device)
        with torch.no_grad():
            self.bank_emb = self.bundle.encode_tokens(self.bank)
        return self

    def fit_architectures(self) -> list[str]:
        """The surrogate CLIP."""
        return [clip_arch_id(self._config["clip_model"])]

    def config(self) -> dict[str, Any]:
        keep = ("mode", "step_size", "pgd_steps", "bank_size", "fit_size", "rounds", "train_error",
                "surrogate_trained", "clip_pretrained")
        model = self._config.get("clip_model")
        return self.public_config(keep, clip_model=model if isinstance(model, str) else "config",
                                  apply_chunk=APPLY_CHUNK)

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        if any(not c for c in batch.captions):
            raise UserError("EM's CLIP mode needs a caption for every sample")
        tokens = self.bundle.tokenize([str(t) for t in batch.captions]).to(self.device)

        def chunk(xs: torch.Tensor, ds: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                text_emb = self.bundle.encode_tokens(ts)
            return pgd_min_clip(self.bundle, xs, text_emb, self.bank_emb, _same_caption(ts, self.bank),
                                ds, self.epsilon, self.step_size, self.pgd_steps)

        return self.seeded_pgd(batch, chunk, tokens)
