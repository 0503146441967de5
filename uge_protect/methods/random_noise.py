"""``random``: uniform noise within the budget — a control that does NOT protect.

Evaluations compare real methods against it to show that an effect comes from the method
and not from the mere presence of noise. Each sample's noise comes from its own seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from uge_protect.methods.base import ProtectBatch, ProtectionMethod
from uge_protect.methods.budget import budget_levels


class RandomNoise(ProtectionMethod):
    """Integer noise drawn uniformly from [-round(ε·255), +round(ε·255)] levels per pixel."""

    name = "random"

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        q = budget_levels(self.epsilon)
        shape = tuple(batch.pixels.shape[1:])
        noise = np.empty((len(batch.seeds),) + shape, dtype=np.int8)
        for i, seed in enumerate(batch.seeds):
            # PCG64 on the CPU: the same noise for a key on every device and batch layout.
            noise[i] = np.random.Generator(np.random.PCG64(seed)).integers(-q, q + 1, shape, dtype=np.int8)
        return torch.from_numpy(noise).to(batch.pixels.device)  # integer δ: uint8 levels

    def config(self) -> dict[str, Any]:
        return {**super().config(), "protects": False}


class PassThrough(ProtectionMethod):
    """No perturbation. For benchmarks only: never offered by the CLI (it would publish
    unprotected data)."""

    name = "passthrough"
    hidden = True
    perturbs = False

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        return torch.zeros_like(batch.pixels, dtype=torch.int8)
