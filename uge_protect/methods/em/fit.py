"""Fitting EM (see :mod:`uge_protect.methods.em.method` for the method).

Min-min on in-memory tensors: a few SGD batches of the surrogate on ``clip(x + δ)``, then a PGD
sweep over the training set that lowers its loss, round after round. The clip mode's fit is
:mod:`uge_protect.methods.em.clip`'s. This module works on tensors; files belong to the pipeline.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.errors import UserError
from uge_protect.methods.base import FitContext
from uge_protect.methods.em.clip import fit_em_clip
from uge_protect.methods.em.config import EMClipConfig, EMConfig
from uge_protect.methods.em.method import build_surrogate, pgd_min
from uge_protect.methods.fitting import BatchCursor, FitResult, check_images, check_labels, fit_record, module_weights
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.training import shift_flip


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
        return fit_em_clip(images, [str(c) for c in captions], EMClipConfig.from_options(options), ctx)
    return fit_em(images, labels, EMConfig.from_options(options), ctx)


def em_fit_needs(options: dict[str, Any]) -> str:
    """What an EM fit needs of each training sample: ``"captions"`` (clip mode) or ``"labels"``."""
    return "captions" if options.get("mode") == "clip" else "labels"

