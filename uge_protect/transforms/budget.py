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


def project_linf(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clip ``delta`` to [-epsilon, epsilon] (for methods that optimise δ directly)."""
    return delta.clamp(-epsilon, epsilon)


def linf_levels(original: np.ndarray, protected: np.ndarray) -> int:
    """Largest absolute per-pixel difference in uint8 levels."""
    if original.shape != protected.shape:
        raise ValueError(f"shape mismatch {original.shape} vs {protected.shape}")
    diff = np.abs(original.astype(np.int16) - protected.astype(np.int16))
    return int(diff.max(initial=0))


def psnr(original: np.ndarray, protected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images)."""
    diff = original.astype(np.float64) - protected.astype(np.float64)
    mse = float(np.mean(diff * diff)) if diff.size else 0.0
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0**2 / mse)
