"""UGE's image-conditioned noise generator: t = tanh(G(x)), fully convolutional, any image size.

A residual encoder at full resolution with growing dilation (receptive field 31 pixels at
the default depth) plus a global-context path: the pooled features of the whole image set a
scale and shift of every block (as FiLM), so the noise can depend on what the image shows
as a whole (its class) as well as on local content. Group norm, not batch norm: a sample's
output never depends on the other samples of its batch.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, width), width)


class _Block(nn.Module):
    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.norm1 = _norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = _norm(width)
        self.film = nn.Linear(width, 2 * width)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        pooled = h.mean((2, 3)) if context is None else h.mean((2, 3)) + context
        scale, shift = self.film(pooled).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        out = torch.relu(self.norm1(self.conv1(h)))
        out = self.norm2(self.conv2(out)) * (1 + scale) + shift
        return torch.relu(h + out)


class NoiseGenerator(nn.Module):
    """G: [0, 1] images (N, 3, H, W) → t = tanh(G(x)) in [-1, 1], shape (N, out_channels, H, W).

    With ``num_classes`` the global context also holds a learned embedding of the label, and
    a pattern per class in [-1, 1] (``patterns``, ``pattern_size`` square, resized bilinearly
    to the image) is added to the output, which is clipped to [-1, 1]: the class-wise part
    of the noise. The patterns are a buffer, not a parameter: the fit moves them by signed
    gradient steps averaged over each class's samples, as class-wise EM moves its noise."""

    def __init__(self, out_channels: int = 1, width: int = 32, depth: int = 4, num_classes: int | None = None,
                 pattern_size: int = 32):
        super().__init__()
        self.classes = nn.Embedding(num_classes, width) if num_classes else None
        self.patterns: torch.Tensor | None
        self.register_buffer("patterns", torch.zeros(num_classes, out_channels, pattern_size, pattern_size)
                             if num_classes else None)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), _norm(width), nn.ReLU())
        self.blocks = nn.ModuleList(_Block(width, 2 ** (i % 4)) for i in range(depth))
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)
        # the noise starts at zero and grows only where the losses want it
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def class_patterns(self, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Each sample's class pattern at ``size`` (N, out_channels, H, W)."""
        assert self.patterns is not None
        pattern = self.patterns[labels]
        if tuple(pattern.shape[-2:]) != tuple(size):
            pattern = nn.functional.interpolate(pattern, size=size, mode="bilinear", align_corners=False)
        return pattern

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                pattern: torch.Tensor | None = None) -> torch.Tensor:
        """t in [-1, 1]; ``pattern`` replaces ``class_patterns(labels)`` (the fit's handle on it)."""
        if (self.classes is None) != (labels is None):
            raise ValueError("a label-conditioned generator needs labels, and only it takes them")
        context = self.classes(labels) if self.classes is not None and labels is not None else None
        h = self.stem(x * 2 - 1)
        for block in self.blocks:
            h = block(h, context)
        out = torch.tanh(self.head(h))
        if self.patterns is not None and labels is not None:
            if pattern is None:
                pattern = self.class_patterns(labels, tuple(out.shape[-2:]))
            out = (out + pattern).clamp(-1.0, 1.0)
        return out


def build_noise_generator(out_channels: int, width: int, depth: int, seed: int,
                          num_classes: int | None = None, pattern_size: int = 32) -> NoiseGenerator:
    """A generator with seeded initial weights (label-conditioned when ``num_classes`` is given)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return NoiseGenerator(out_channels, width, depth, num_classes, pattern_size)
    finally:
        torch.random.set_rng_state(state)
