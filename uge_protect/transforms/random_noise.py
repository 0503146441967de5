"""``random``: uniform noise within the budget — a control that does NOT protect.

Evaluations compare real methods against it to show that an effect comes from the method
and not from the mere presence of noise. Each sample's noise comes from its own seed.
"""

from __future__ import annotations

from typing import Any

import torch

from uge_protect.transforms.base import ProtectBatch, ProtectionMethod
from uge_protect.transforms.budget import budget_levels


class RandomNoise(ProtectionMethod):
    """Integer noise drawn uniformly from [-round(ε·255), +round(ε·255)] levels per pixel."""

    name = "random"

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        q = budget_levels(self.epsilon)
        shape = tuple(batch.images.shape[1:])
        noise = torch.empty((len(batch.seeds),) + shape, dtype=torch.int16)
        gen = torch.Generator(device="cpu")
        for i, seed in enumerate(batch.seeds):
            gen.manual_seed(seed)
            torch.randint(-q, q + 1, shape, generator=gen, dtype=torch.int16, out=noise[i])
        return noise.to(batch.images.device, non_blocking=True).to(torch.float32) / 255.0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "protects": False}


class PassThrough(ProtectionMethod):
    """No perturbation. For benchmarks only: never offered by the CLI (it would publish
    unprotected data)."""

    name = "passthrough"
    hidden = True

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        return torch.zeros_like(batch.images)
