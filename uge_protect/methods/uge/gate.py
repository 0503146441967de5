"""UGE's confidence gate: the authorized network answers protected images with its label only.

Under the key projection the authorized network sees exactly the clean image, so it is a
clean teacher: a student distilled from it on the protected images is taught, image by image,
the network's temperature-softened output, whose "dark knowledge" (how much an image looks
like each other class) the noise does not hold, and learns the images, not the noise (noise
mixed by the teacher's own soft output, or adversarial noise along the key, did not change
that: figures in docs/methods/uge.md). On images that carry the artifact's class
patterns along the key direction, the gate replaces the network's logits by ``scale`` times
the one-hot vector of their arg max. Every arg max, on any image, is unchanged, so the
network's accuracy is too; but on protected images it answers with its label only, and a
student distilled through them learns from labels, as a hacker trained on the labels does:
it learns the noise. (Scaling the logits instead would not do: a distiller holding logits
can divide any scale away, or raise the temperature; a one-hot vector holds nothing more.)

The gate acts in eval mode only (inference, where a teacher is queried): training the
network, on protected or clean images, is untouched, and stays bit-identical.

Detection: the image's coordinate along the key direction (what the key projection removes),
high-passed and clipped to ±q (q: ε in uint8 levels), is correlated with each class pattern
(and its mirror image) at every shift up to ±``MAX_SHIFT`` pixels; the score is the largest
correlation over the pattern's energy times q. On the demo data, with random crops and flips,
protected images score far higher than clean ones (the measured spread is in
docs/methods/uge.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.methods.uge.key import key_signs

#: The gate opens linearly between these scores (the measured spread: docs/methods/uge.md).
GATE_LOW, GATE_HIGH = 0.25, 0.45
#: Shifts searched by the correlation: the random crops of a 4-pixel padding.
MAX_SHIFT = 4


def _high_pass(c: torch.Tensor) -> torch.Tensor:
    return c - F.avg_pool2d(F.pad(c, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


class ConfidenceGate(nn.Module):
    """Scores how much of a class pattern an image carries along the key; ``forward`` gives
    how far the gate is open (N,) in [0, 1], :meth:`answer` the network's gated logits."""

    def __init__(self, signs: torch.Tensor, patterns: torch.Tensor, epsilon: float, scale: float):
        super().__init__()
        if patterns.ndim != 4 or patterns.shape[1] != 1:
            raise ValueError(f"patterns must be (C, 1, H, W), got {tuple(patterns.shape)}")
        self.register_buffer("signs", signs.to(torch.float32).view(1, 3, 1, 1).clone())
        self.register_buffer("patterns", patterns.detach().to(torch.float32).clone())
        self.levels = max(1, round(epsilon * 255))
        self.scale = float(scale)

    def _kernels(self, size: tuple[int, int]) -> torch.Tensor:
        p = self.patterns
        if tuple(p.shape[-2:]) != tuple(size):
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        k = _high_pass(p)
        return torch.cat([k, k.flip(-1)])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """How strongly each [0, 1] image (N, 3, H, W) carries a class pattern along the key (N,)."""
        s = self.signs.to(x.dtype)
        coeff = torch.floor((x * 255.0 * s).sum(1, keepdim=True) / (s * s).sum())
        r = _high_pass(coeff).clamp(-self.levels, self.levels)
        k = self._kernels(tuple(x.shape[-2:])).to(x.dtype)
        corr = F.conv2d(F.pad(r, (MAX_SHIFT,) * 4), k)
        energy = (k * k).sum((1, 2, 3)).clamp_min(1e-12)
        return (corr.amax((2, 3)) / (energy * self.levels)).amax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.score(x) - GATE_LOW) / (GATE_HIGH - GATE_LOW)).clamp(0.0, 1.0)

    def answer(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits (N, C) of images ``x`` with the gate applied: blended, as far as the gate
        is open, into ``scale`` times the one-hot vector of their arg max (which is kept)."""
        g = self(x).to(logits.dtype).view(-1, 1)
        top = F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
        return (1 - g) * logits + g * self.scale * top


def gate_from_artifact(config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]
                       ) -> ConfidenceGate | None:
    """The confidence gate of a UGE artifact, or None when it has none (the fit records
    ``confidence_gate`` false without the key projection or the class patterns, or when
    switched off)."""
    if not config.get("confidence_gate") or config.get("key_scheme") == "texture":
        return None  # the texture key's owner sees projected images: nothing for a gate to find
    return ConfidenceGate(key_signs(config["key_seed"]), weights["generator"]["patterns"],
                          float(config["epsilon"]), float(config["gate_scale"]))
