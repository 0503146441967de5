"""Noise-budget helpers shared by all methods: the L∞ budget holds after quantization."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from uge_protect.errors import UserError


def budget_levels(epsilon: float) -> int:
    """The budget in uint8 levels: ``round(epsilon * 255)``."""
    return int(round(epsilon * 255))


def check_epsilon(epsilon: float) -> None:
    """A :class:`UserError` unless ``epsilon`` is in [0, 1] and at least one uint8 level after
    rounding (ε ≤ 0.5/255 rounds to 0 levels: a method would write every image unchanged)."""
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0.0 <= epsilon <= 1.0:
        raise UserError(f"epsilon must be in [0, 1] image units, got {epsilon!r}")
    if budget_levels(epsilon) < 1:
        raise UserError(f"epsilon {epsilon:.6g} is under one uint8 level after rounding ({epsilon * 255:.3g}/255): "
                        "every image would be written unchanged; use at least 1/255 (default 8/255)")


def apply_perturbation(original: torch.Tensor, delta: torch.Tensor, epsilon: float,
                       checked_finite: bool = False) -> torch.Tensor:
    """Add ``delta`` to uint8 ``original`` and return uint8 pixels within the budget.

    ``original`` is uint8 (any shape), ``delta`` the same shape: floating point in [0, 1]
    image units, or an integer dtype in uint8 levels. δ is quantized to whole levels and
    clipped to ±round(epsilon·255) before it is added, so
    ``|protected - original| <= round(epsilon*255)`` holds for every pixel, and the result
    is clipped to [0, 255]. A float δ is worked on in one float32 buffer (the sums of whole
    levels are exact there), laid out as ``delta`` is. A non-finite float δ is a ValueError,
    unless ``checked_finite`` says the caller has made sure of it (:func:`finite_samples`).
    """
    if not delta.is_floating_point():
        return (original.to(torch.int16) + delta_levels(delta, epsilon)).clamp_(0, 255).to(torch.uint8)
    q = budget_levels(epsilon)
    if not checked_finite:
        _check_finite(delta)
    out = delta.to(torch.float32) * 255.0
    out.round_().clamp_(-q, q).add_(original).clamp_(0, 255)
    return out.to(torch.uint8)


def delta_levels(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """δ as int16 uint8-levels within ±round(ε·255): float δ (image units) is rounded first.

    A non-finite float δ is a ValueError: NaN would otherwise become some integer level
    (0 on the CPU) and pass for a perturbation."""
    q = budget_levels(epsilon)
    if delta.is_floating_point():
        _check_finite(delta)
        return torch.round(delta.to(torch.float32) * 255.0).clamp_(-q, q).to(torch.int16)
    return delta.to(torch.int16).clamp_(-q, q)


def finite_samples(delta: torch.Tensor) -> torch.Tensor:
    """(B,) bool: sample b's δ holds no NaN or Inf (an integer δ always does).

    A sample's sum is finite only when all its values are (NaN and ±Inf carry into it), so
    one reduction decides; only a sum that is not finite, which huge finite values can also
    give, is checked value by value."""
    if not delta.is_floating_point():
        return torch.ones(len(delta), dtype=torch.bool, device=delta.device)
    ok = torch.isfinite(delta.sum(dim=tuple(range(1, delta.ndim)), dtype=torch.float32))
    if not bool(ok.all()):
        ok = torch.isfinite(delta).flatten(1).all(1)
    return ok


def _check_finite(delta: torch.Tensor) -> None:
    if not bool(torch.isfinite(delta.sum(dtype=torch.float32))) and not bool(torch.isfinite(delta).all()):
        raise ValueError("the method returned a non-finite perturbation (NaN or Inf)")


def project_linf(x: torch.Tensor, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clamp δ to the ε-ball and x + δ to the [0, 1] image box; returns the new δ."""
    delta = delta.clamp(-epsilon, epsilon)
    return (x + delta).clamp_(0.0, 1.0) - x


def pgd_minimize(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta: torch.Tensor,
                 epsilon: float, step_size: float, steps: int) -> torch.Tensor:
    """``steps`` signed-gradient steps on δ that *decrease* ``loss_of(x + δ)``, projected after each.

    ``loss_of`` takes the perturbed [0, 1] images and returns a scalar that sums per-sample
    losses, so each sample's gradient (and step) depends on that sample only.
    """
    delta = project_linf(x, delta, epsilon)
    for _ in range(steps):
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_of((x + d).clamp(0.0, 1.0)), d)
        delta = project_linf(x, delta - step_size * grad.sign(), epsilon)
    return delta.detach()


def seeded_uniform(seeds: Sequence[int], shape: tuple[int, ...], epsilon: float) -> torch.Tensor:
    """Per-sample δ uniform in [-ε, ε], each from its own seed on the CPU (the same on every device)."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        out[i] = (torch.rand(shape, generator=torch.Generator().manual_seed(int(seed))) * 2 - 1) * epsilon
    return out


def difference_stats(original: np.ndarray, protected: np.ndarray) -> tuple[int, float]:
    """(L∞ in uint8 levels, PSNR in dB) of two uint8 images, in one integer pass.

    PSNR is ``inf`` for identical images.
    """
    if original.shape != protected.shape:
        raise ValueError(f"shape mismatch {original.shape} vs {protected.shape}")
    diff = original.astype(np.int16)
    diff -= protected
    np.abs(diff, out=diff)
    linf = int(diff.max(initial=0))
    squared = int(np.square(diff.astype(np.uint16), dtype=np.uint32).sum(dtype=np.uint64))
    if squared == 0:
        return linf, math.inf
    return linf, 10.0 * math.log10(255.0**2 * diff.size / squared)


def linf_levels(original: np.ndarray, protected: np.ndarray) -> int:
    """Largest absolute per-pixel difference in uint8 levels."""
    return difference_stats(original, protected)[0]


def psnr(original: np.ndarray, protected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    return difference_stats(original, protected)[1]
