"""What EM's two fitted methods (sample/class in :mod:`.method`, clip in :mod:`.clip`) share."""

from __future__ import annotations

from typing import Any, Callable

import torch

from uge_protect.methods.base import FittedMethod, ProtectBatch, in_fixed_chunks
from uge_protect.methods.budget import seeded_uniform


class FittedEM(FittedMethod):
    """What EM's fitted methods share: the name, apply's PGD steps, and PGD from each sample's
    own seeded start in fixed chunks (so the floats do not depend on the batch size)."""

    name = "em"

    def __init__(self, config: dict[str, Any], fingerprint: str | None = None):
        super().__init__(config, fingerprint)
        self.step_size = float(config["step_size"])
        self.pgd_steps = int(config["pgd_steps"])

    def seeded_pgd(self, batch: ProtectBatch, pgd: Callable[..., torch.Tensor], condition: torch.Tensor
                   ) -> torch.Tensor:
        """``pgd(images, start δ, condition)`` on fixed chunks of the batch, from a δ uniform in
        [-ε, ε] drawn from each sample's seed; ``condition`` holds one row per sample."""
        start = seeded_uniform(batch.seeds, tuple(batch.pixels.shape[1:]), self.epsilon).to(self.device)
        return in_fixed_chunks(pgd, batch.images.float(), start, condition)
