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

Under the texture key (:class:`TextureGate`) the network sees projected images, so the gate
reads the image as it came, before the owner's projection: the mean over the image's 4×4
cells of its correlation with the predicted class's tile (and its mirror image), per cell
clipped to ±q, at the best of the 16 phases, over q. Cells touching the zero rows and
columns a padded crop adds are left out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.methods.uge.key import key_signs
from uge_protect.methods.uge.texture_key import TILE, texture_tiles

#: The gate opens linearly between these scores (the measured spread: docs/methods/uge.md).
GATE_LOW, GATE_HIGH = 0.25, 0.45
#: Shifts searched by the correlation: the random crops of a 4-pixel padding.
MAX_SHIFT = 4
#: The texture gate's range (the measured spread: docs/methods/uge.md).
TEXTURE_GATE_LOW, TEXTURE_GATE_HIGH = 0.25, 0.4


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
        return _blend(logits, self(x), self.scale)


def _blend(logits: torch.Tensor, opened: torch.Tensor, scale: float) -> torch.Tensor:
    g = opened.to(logits.dtype).view(-1, 1)
    top = F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
    return (1 - g) * logits + g * scale * top


class TextureGate(nn.Module):
    """The confidence gate of a texture key: scores how much of the predicted class's tile an
    image carries (before the owner's projection); :meth:`answer` gives the gated logits."""

    def __init__(self, tiles: torch.Tensor, epsilon: float, scale: float):
        super().__init__()
        if tiles.ndim != 4 or tuple(tiles.shape[1:]) != (3, TILE, TILE):
            raise ValueError(f"tiles must be (m, 3, {TILE}, {TILE}), got {tuple(tiles.shape)}")
        self.register_buffer("tiles", tiles.to(torch.float32).clone())
        self.levels = max(1, round(epsilon * 255))
        self.scale = float(scale)

    def score(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """How strongly each [0, 1] image (N, 3, H, W) carries the tile of its class in
        ``classes`` (N,), at any phase and either way round (N,); 0 below one tile."""
        n, _, h, w = x.shape
        if h < TILE or w < TILE or n == 0:
            return x.new_zeros(n)
        m = self.tiles.shape[0]
        kernels = torch.cat([self.tiles, self.tiles.flip(-1)]).to(x.dtype)
        # each 4×4 window's coefficient along each tile, in levels
        r = F.conv2d(x * 255.0, kernels) / float(3 * TILE * TILE)
        blank = (x == 0).all(1)
        pad = (blank.all(2, keepdim=True) | blank.all(1, keepdim=True)).to(x.dtype)[:, None]
        clear = 1.0 - F.max_pool2d(pad, TILE, stride=1)
        pick = (classes.long().to(x.device) % m).view(n, 1)
        best = x.new_zeros(n)
        q = float(self.levels)
        for oy in range(TILE):
            for ox in range(TILE):
                cells = r[:, :, oy::TILE, ox::TILE].clamp(-q, q)
                v = clear[:, :, oy::TILE, ox::TILE]
                mean = (cells * v).sum((2, 3)) / v.sum((2, 3)).clamp_min(1.0)
                both = torch.maximum(mean[:, :m].abs(), mean[:, m:].abs())
                best = torch.maximum(best, both.gather(1, pick)[:, 0] / q)
        return best

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """How far the gate is open (N,) in [0, 1] for images ``x`` predicted as ``classes``."""
        lo, hi = TEXTURE_GATE_LOW, TEXTURE_GATE_HIGH
        return ((self.score(x, classes) - lo) / (hi - lo)).clamp(0.0, 1.0)

    def answer(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits (N, C) of images ``x`` (as they came, not projected) with the gate applied,
        as :meth:`ConfidenceGate.answer` does; the tile looked for is the arg max's."""
        return _blend(logits, self(x, logits.argmax(1)), self.scale)


def gate_from_artifact(config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]
                       ) -> ConfidenceGate | TextureGate | None:
    """The confidence gate of a UGE artifact, or None when it has none (the fit records
    ``confidence_gate`` false without the key projection or the class patterns, or when
    switched off)."""
    if not config.get("confidence_gate"):
        return None
    if config.get("key_scheme") == "texture":
        return TextureGate(texture_tiles(config["key_seed"], int(config["num_classes"])),
                           float(config["epsilon"]), float(config["gate_scale"]))
    return ConfidenceGate(key_signs(config["key_seed"]), weights["generator"]["patterns"],
                          float(config["epsilon"]), float(config["gate_scale"]))
