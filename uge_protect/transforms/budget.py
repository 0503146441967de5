"""Noise-budget helpers shared by all methods: the L∞ budget holds after quantization."""

from __future__ import annotations

import math

import numpy as np
import torch


def budget_levels(epsilon: float) -> int:
    """The budget in uint8 levels: ``round(epsilon * 255)``."""
    return int(round(epsilon * 255))


def apply_perturbation(original: torch.Tensor, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Add ``delta`` to uint8 ``original`` and return uint8 pixels within the budget.

    ``original`` is uint8 (any shape), ``delta`` the same shape: floating point in [0, 1]
    image units, or an integer dtype in uint8 levels. δ is quantized to whole levels and clipped to ±round(epsilon·255) before it is added, so
    ``|protected - original| <= round(epsilon*255)`` holds for every pixel, and the result
    is clipped to [0, 255].
    """
    q = budget_levels(epsilon)
    if delta.is_floating_point():
        levels = torch.round(delta.to(torch.float32) * 255.0).clamp_(-q, q).to(torch.int16)
    else:
        levels = delta.to(torch.int16).clamp_(-q, q)
    return (original.to(torch.int16) + levels).clamp_(0, 255).to(torch.uint8)


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
