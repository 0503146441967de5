"""``em``: error-minimizing noise (Huang et al., "Unlearnable Examples", ICLR 2021).

Fit (min-min, on in-memory tensors): alternate a few SGD batches of a surrogate classifier on
``clip(x + δ)`` with PGD sweeps that *minimize* the surrogate's cross-entropy over δ (sign
descent, projected to ``‖δ‖∞ ≤ ε`` and to the [0, 1] image box), until the surrogate's error
on the perturbed training set drops below ``stop_error`` or ``max_rounds`` is reached.

* ``sample`` mode: one δ per training image during the fit. To protect a stream of new images,
  the artifact keeps the fitted surrogate and apply runs the same PGD steps against it, per
  batch, from an initial δ drawn from each sample's own seed.
* ``class`` mode: one δ per class (C, 3, H, W); during the sweep every sample takes one signed
  gradient step from its class's δ and the projected results are averaged back into the class
  (as in the reference). Apply is a lookup ``δ[label]``, resized bilinearly to the image size.

This module works on tensors only; files are the business of :mod:`artifact` and the pipeline.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.errors import UserError
from uge_protect.methods.artifact import (artifact_fingerprint, check_config, check_fitted_epsilon, load_artifact,
    loading)
from uge_protect.methods.base import APPLY_CHUNK, FitContext, FittedMethod, ProtectBatch, in_fixed_chunks
from uge_protect.methods.budget import pgd_minimize, seeded_uniform
from uge_protect.methods.em.clip import ErrorMinimizingClip
from uge_protect.methods.em.config import MODES, EMArtifact, EMClipArtifact, EMClipConfig, EMConfig
from uge_protect.methods.fitting import BatchCursor, FitResult, check_images, check_labels, fit_record, module_weights
from uge_protect.models.classifiers import Normalized, build_classifier, set_frozen, small_cnn
from uge_protect.models.training import shift_flip


def build_surrogate(name: str, num_classes: int, width: int | None = None, seed: int | None = None) -> nn.Module:
    """The surrogate classifier (takes [0, 1] images; size-agnostic through global pooling)."""
    if width is None:
        return build_classifier(name, num_classes, seed=seed)
    state = torch.random.get_rng_state()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        return Normalized(small_cnn(num_classes, width=width))
    finally:
        torch.random.set_rng_state(state)


def pgd_min(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
    epsilon: float, step_size: float, steps: int,
) -> torch.Tensor:
    """``steps`` signed-gradient steps that *decrease* the cross-entropy, projected after each step."""
    return pgd_minimize(lambda xp: F.cross_entropy(model(xp), y, reduction="sum"), x, delta,
                        epsilon, step_size, steps)


def _class_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                up: Callable[[torch.Tensor], torch.Tensor], view: Callable[[torch.Tensor], torch.Tensor],
                epsilon: float, step_size: float) -> torch.Tensor:
    """One signed-gradient step per sample that *decreases* the cross-entropy of
    ``view(x + up(δ))`` (each sample's class δ on its grid), projected to ``‖δ‖∞ ≤ ε``; the
    caller averages the steps over each class's samples."""
    d = delta.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(view((x + up(d)).clamp(0.0, 1.0))), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, d)
    return (d.detach() - step_size * grad.sign()).clamp_(-epsilon, epsilon)


@torch.no_grad()
def _error(model: nn.Module, x: torch.Tensor, delta_of: Callable[[torch.Tensor], torch.Tensor],
           y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    wrong = 0
    for start in range(0, len(x), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(x)), device=x.device)
        xb = x[idx].float().div_(255.0)
        pred = model((xb + delta_of(idx)).clamp_(0.0, 1.0)).argmax(1)
        wrong += int((pred != y[idx]).sum())
    return wrong / len(x)


class _Noise:
    """The δ an EM fit learns: one per training sample (sample mode) or one per class on a
    grid of at most ``pattern_size`` (class mode), with its random start drawn from ``gen``."""

    def __init__(self, cfg: EMConfig, n: int, num_classes: int, size: tuple[int, int], labels: torch.Tensor,
                 gen: torch.Generator, device: torch.device):
        h, w = size
        self.mode, self.size, self.labels, self.num_classes = cfg.mode, size, labels, num_classes
        self.grid = (min(cfg.pattern_size, h), min(cfg.pattern_size, w)) if cfg.mode == "class" and cfg.pattern_size \
            else size
        shape = (n, 3, h, w) if cfg.mode == "sample" else (num_classes, 3, *self.grid)
        self.delta = ((torch.rand(shape, generator=gen) * 2 - 1) * cfg.epsilon).to(device)

    def up(self, d: torch.Tensor) -> torch.Tensor:
        """Class patterns brought from their grid to the image size (nearest)."""
        return d if self.grid == self.size else F.interpolate(d, size=self.size, mode="nearest")

    def of(self, idx: torch.Tensor) -> torch.Tensor:
        """δ of the training samples ``idx``."""
        return self.delta[idx] if self.mode == "sample" else self.up(self.delta)[self.labels[idx]]


def _train_surrogate(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                     noise: _Noise, view: Callable[[torch.Tensor], torch.Tensor], cursor: BatchCursor,
                     batches: int, device: torch.device) -> None:
    """A few SGD batches of the surrogate on the perturbed data."""
    model.train()
    set_frozen(model, False)
    for _ in range(batches):
        idx = cursor.next().to(device)
        xb = images[idx].float().div_(255.0)
        loss = F.cross_entropy(model(view((xb + noise.of(idx)).clamp_(0.0, 1.0))), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _pgd_sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, noise: _Noise, cfg: EMConfig,
               view: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """A PGD sweep over the whole (un-shuffled) training set, minimising the loss: each
    sample's δ, or each class's δ from the mean of its samples' steps."""
    model.eval()
    set_frozen(model, True)
    eps, delta, n = cfg.epsilon, noise.delta, len(images)
    for start in range(0, n, cfg.batch_size):
        idx = torch.arange(start, min(start + cfg.batch_size, n), device=images.device)
        xb = images[idx].float().div_(255.0)
        yb = labels[idx]
        if cfg.mode == "sample":
            delta[idx] = pgd_min(model, xb, yb, delta[idx], eps, cfg.step_size, cfg.pgd_steps)
            continue
        if noise.grid == noise.size and not cfg.augment:  # the reference update
            moved = pgd_min(model, xb, yb, delta[yb], eps, cfg.step_size, 1)
        else:
            moved = _class_step(model, xb, yb, delta[yb], noise.up, view, eps, cfg.step_size)
        sums = torch.zeros_like(delta).index_add_(0, yb, moved)
        counts = torch.bincount(yb, minlength=noise.num_classes)
        present = counts > 0
        delta[present] = (sums[present] / counts[present].view(-1, 1, 1, 1)).clamp_(-eps, eps)


def fit_em(images: torch.Tensor, labels: torch.Tensor, cfg: EMConfig, ctx: FitContext | None = None) -> FitResult:
    """Fit EM noise by min-min on uint8 ``images`` (N, 3, H, W) with int ``labels`` (N,).

    Returns ``(config, weights)`` for :func:`artifact.save_artifact`: weights hold the
    surrogate's state dict under ``"surrogate"`` and, in class mode, ``{"delta": (C,3,H,W)}``
    under ``"class_noise"``. Deterministic for a given seed on a given device and thread count.
    ``ctx.progress`` is called after every round with ``round``, ``train_error`` and ``seconds``.
    """
    ctx = ctx or FitContext()
    cfg.validate()
    check_images(images)
    labels = check_labels(images, labels)
    if len(labels) == 0 or int(labels.min()) < 0:
        raise UserError("every training sample needs a class label >= 0")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise UserError("EM needs at least two classes in the training labels")

    started = time.perf_counter()
    n, _, h, w = images.shape
    device = ctx.pick_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device
    model = build_surrogate(cfg.surrogate, num_classes, cfg.surrogate_width, seed=cfg.seed).to(device)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    view = (lambda x: shift_flip(x, gen)) if cfg.augment else (lambda x: x)  # noqa: E731
    noise = _Noise(cfg, n, num_classes, (h, w), labels, gen, device)
    cursor = BatchCursor(n, cfg.batch_size, gen)
    history: list[float] = []
    for rnd in range(1, cfg.max_rounds + 1):
        _train_surrogate(model, opt, images, labels, noise, view, cursor, cfg.train_batches, device)
        _pgd_sweep(model, images, labels, noise, cfg, view)
        # stop when the surrogate fits the perturbed training set
        train_error = _error(model, images, noise.of, labels, cfg.batch_size)
        history.append(round(train_error, 6))
        ctx.report({"round": rnd, "max_rounds": cfg.max_rounds, "train_error": train_error,
                    "seconds": time.perf_counter() - started})
        if train_error < cfg.stop_error:
            break
    set_frozen(model, False)

    config = fit_record("em", cfg, device=device.type, num_classes=num_classes, fit_size=[h, w], n_train=n,
                        rounds=len(history), train_error=history[-1], train_error_history=history,
                        converged=history[-1] < cfg.stop_error, fit_architectures=[cfg.surrogate])
    weights = {"surrogate": module_weights(model)}
    if cfg.mode == "class":
        weights["class_noise"] = {"delta": noise.up(noise.delta).cpu().clone()}  # at the fit's resolution
    return config, weights


def fit_em_from_options(images: torch.Tensor, labels: torch.Tensor, captions: list[str | None],
                        options: dict[str, Any], ctx: FitContext | None = None) -> FitResult:
    """The fitter registered under ``"em"``: sample/class modes fit against a classifier on
    the labels (:func:`fit_em`), the ``clip`` mode against a CLIP on the captions
    (:func:`uge_protect.methods.em.clip.fit_em_clip`)."""
    if options.get("mode") == "clip":
        from uge_protect.methods.em.clip import fit_em_clip

        return fit_em_clip(images, [str(c) for c in captions], EMClipConfig.from_options(options), ctx)
    return fit_em(images, labels, EMConfig.from_options(options), ctx)


def em_fit_needs(options: dict[str, Any]) -> str:
    """What an EM fit needs of each training sample: ``"captions"`` (clip mode) or ``"labels"``."""
    return "captions" if options.get("mode") == "clip" else "labels"


def _check_em_config(path: str, config: dict[str, Any]) -> None:
    """Check an EM artifact's config against the schema of its mode."""
    if config.get("mode") == "clip":
        check_config(path, config, EMClipArtifact, required=("epsilon", "mode", "step_size", "pgd_steps", "clip_model"))
        return
    # surrogate_width: artifacts older than the field had the architecture's own width
    check_config(path, config, EMArtifact, legacy={"surrogate_width": None},
                 required=("epsilon", "mode", "num_classes", "step_size", "pgd_steps", "surrogate"))


def em_from_artifact(path: str, epsilon: float | None = None) -> "ErrorMinimizing | ErrorMinimizingClip":
    """Load an artifact made by ``uge-protect fit em``: an :class:`ErrorMinimizing` (sample or
    class mode) or an :class:`~uge_protect.methods.em.clip.ErrorMinimizingClip` (clip mode).
    Its ε is authoritative: an ``epsilon`` that differs is an error; None means "not given".
    The default budget (8/255, what the CLI passes when ``--epsilon`` is absent) also counts
    as "not given" for an artifact fitted with a smaller ε, so a run never exceeds the
    default silently."""
    config, weights = load_artifact(path, expected_method="em", check=lambda c: _check_em_config(path, c))
    check_fitted_epsilon(path, config, epsilon)
    cls = ErrorMinimizingClip if config["mode"] == "clip" else ErrorMinimizing
    with loading(path, "EM"):
        return cls(config, weights, fingerprint=artifact_fingerprint(path))


class ErrorMinimizing(FittedMethod):
    """Apply a fitted EM artifact: PGD against its surrogate (sample) or a class lookup (class)."""

    name = "em"
    requires_label = True

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                 fingerprint: str | None = None):
        super().__init__(config, fingerprint)
        self.mode = config.get("mode")
        if self.mode not in MODES:
            raise UserError(f"EM artifact has an unknown mode {self.mode!r}")
        self.num_classes = int(config["num_classes"])
        self.step_size = float(config["step_size"])
        self.pgd_steps = int(config["pgd_steps"])
        try:
            self.model = build_surrogate(config["surrogate"], self.num_classes, config.get("surrogate_width"))
            self.model.load_state_dict(weights["surrogate"], strict=True)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"EM artifact's surrogate does not load: {exc}") from exc
        self.model.eval()
        set_frozen(self.model, True)
        self.class_delta: torch.Tensor | None = None
        if self.mode == "class":
            delta = weights.get("class_noise", {}).get("delta")
            if delta is None or delta.ndim != 4 or delta.shape[0] != self.num_classes or delta.shape[1] != 3:
                raise UserError("EM class-wise artifact lacks a (classes, 3, H, W) class_noise delta")
            self.class_delta = delta.float()

    @classmethod
    def from_artifact(cls, path: str, epsilon: float | None = None) -> "ErrorMinimizing":
        """Load a sample- or class-mode artifact (see :func:`em_from_artifact`, which also
        loads the clip mode's)."""
        method = em_from_artifact(path, epsilon)
        if not isinstance(method, ErrorMinimizing):
            raise UserError(f"EM artifact {path} is a clip-mode artifact; load it with em_from_artifact")
        return method

    def to(self, device: torch.device | str) -> "ErrorMinimizing":
        super().to(device)
        self.model.to(self.device)
        if self.class_delta is not None:
            self.class_delta = self.class_delta.to(self.device)
        return self

    def config(self) -> dict[str, Any]:
        keep = ("mode", "step_size", "pgd_steps", "surrogate", "surrogate_width", "num_classes",
                "fit_size", "rounds", "train_error")
        return self.public_config(keep, apply_chunk=APPLY_CHUNK)

    def fit_architectures(self) -> list[str]:
        """The surrogate classifier (any width counts as its architecture)."""
        return [str(self._config["surrogate"])]

    def _labels(self, batch: ProtectBatch) -> torch.Tensor:
        bad = [lab for lab in batch.labels if lab is None or not 0 <= int(lab) < self.num_classes]
        if bad:
            raise UserError(
                f"label {bad[0]!r} is outside the {self.num_classes} classes this EM artifact was "
                "fitted on; refit on data that covers every class"
            )
        return torch.tensor([int(lab) for lab in batch.labels], dtype=torch.int64, device=self.device)

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        labels = self._labels(batch)
        _, _, h, w = batch.pixels.shape
        if self.mode == "class":
            delta = self.class_delta
            if tuple(delta.shape[-2:]) != (h, w):
                delta = F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)
            return delta[labels].float().clamp(-self.epsilon, self.epsilon)
        return self._sample_pgd(batch, labels)

    def _sample_pgd(self, batch: ProtectBatch, labels: torch.Tensor) -> torch.Tensor:
        start = seeded_uniform(batch.seeds, tuple(batch.pixels.shape[1:]), self.epsilon).to(self.device)
        return in_fixed_chunks(
            lambda xs, ds, ys: pgd_min(self.model, xs, ys, ds, self.epsilon, self.step_size, self.pgd_steps),
            batch.images.float(), start, labels).float()
