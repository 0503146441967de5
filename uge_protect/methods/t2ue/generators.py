"""T2UE noise generators: caption features + latent z → noise δ with ‖δ‖∞ ≤ ε.

* ``ssa`` (the paper's, after SSA-GAN): FC(z) → a 4×4 feature map → blocks of (×2 upsample,
  3×3 conv, batch norm whose scale and shift are predicted from the caption embedding, ReLU,
  residual) → 3×3 conv → ε·tanh. Conditioned on the pooled caption embedding.
* ``unet``: diffusers' ``UNet2DConditionModel`` with cross-attention on the caption's token
  states; its input is a latent map made from z by a linear layer (a fixed timestep of 0).
  It runs at half the noise size, and its output is upsampled.

* ``mlp``: two hidden layers (``width`` × 32 units) from the caption embedding and z to the
  whole noise image, then ε·tanh: the regression head of the ``em`` objective, which maps a
  caption to its concept's noise.

All run in eval mode at apply (batch norm uses running statistics), so a sample's noise never
depends on the other samples of its batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("ssa", "unet", "mlp")


class TextConditionedBatchNorm(nn.Module):
    """BatchNorm without its own affine; γ and β come from the text embedding (1 + γ keeps identity at init)."""

    def __init__(self, channels: int, text_dim: int, hidden: int = 64):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.beta = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        for head in (self.gamma, self.beta):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        g = self.gamma(text)[:, :, None, None]
        b = self.beta(text)[:, :, None, None]
        return self.norm(x) * (1 + g) + b


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, text_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = TextConditionedBatchNorm(cout, text_dim)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = TextConditionedBatchNorm(cout, text_dim)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = F.relu(self.norm1(self.conv1(x), text))
        h = self.norm2(self.conv2(h), text)
        return F.relu(h + self.skip(x))


class SSAGenerator(nn.Module):
    """The paper's text-conditioned upsampling generator, for square noise of side ``size`` (a power of 2 ≥ 8)."""

    def __init__(self, text_dim: int, z_dim: int = 100, size: int = 32, width: int = 32, epsilon: float = 8 / 255):
        super().__init__()
        n_blocks = int(round(math.log2(size / 4)))
        if size < 8 or 4 * 2 ** n_blocks != size:
            raise ValueError(f"ssa noise size must be a power of two >= 8, got {size}")
        self.epsilon = epsilon
        chans = [width * 2 ** min(3, n_blocks - i) for i in range(n_blocks + 1)]
        self.fc = nn.Linear(z_dim + text_dim, chans[0] * 16)
        self.blocks = nn.ModuleList(_UpBlock(chans[i], chans[i + 1], text_dim) for i in range(n_blocks))
        self.out = nn.Conv2d(chans[-1], 3, 3, padding=1)
        self.c0 = chans[0]

    def forward(self, text: torch.Tensor, z: torch.Tensor, tokens_state: Any = None) -> torch.Tensor:
        x = self.fc(torch.cat([z, text], dim=1)).view(len(z), self.c0, 4, 4)
        for block in self.blocks:
            x = block(x, text)
        return self.epsilon * torch.tanh(self.out(x))


class MLPGenerator(nn.Module):
    """Caption embedding and z → a whole (3, size, size) noise image through ε·tanh."""

    def __init__(self, text_dim: int, z_dim: int = 100, size: int = 32, width: int = 16, epsilon: float = 8 / 255):
        super().__init__()
        if size < 8:
            raise ValueError(f"mlp noise size must be >= 8, got {size}")
        hidden = 32 * width
        self.epsilon, self.size = epsilon, size
        self.net = nn.Sequential(nn.Linear(text_dim + z_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 3 * size * size))

    def forward(self, text: torch.Tensor, z: torch.Tensor, tokens_state: Any = None) -> torch.Tensor:
        out = self.net(torch.cat([text, z], dim=1)).view(len(z), 3, self.size, self.size)
        return self.epsilon * torch.tanh(out)


class UNetGenerator(nn.Module):
    """A small diffusers ``UNet2DConditionModel`` with cross-attention on the caption's token states.

    The UNet works at half the noise size with cross-attention in its lower block only (a
    quarter of the noise side), and its output is upsampled bilinearly: on a CPU this trains
    far faster than attention at full resolution (docs/methods/t2ue-infonce.md).
    """

    def __init__(self, token_dim: int, z_dim: int = 100, size: int = 32, width: int = 32, epsilon: float = 8 / 255):
        super().__init__()
        from diffusers import UNet2DConditionModel

        if size % 8 or size < 8:
            raise ValueError(f"unet noise size must be a multiple of 8, got {size}")
        self.epsilon = epsilon
        self.size = size
        self.inner = size // 2
        self.latent_channels = 4
        self.latent_side = size // 8  # z → a coarse map, upsampled to the UNet's resolution
        self.from_z = nn.Linear(z_dim, self.latent_channels * self.latent_side ** 2)
        self.unet = UNet2DConditionModel(
            sample_size=self.inner,
            in_channels=self.latent_channels,
            out_channels=3,
            block_out_channels=(width, 2 * width),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=token_dim,
            attention_head_dim=max(8, width // 4),
            norm_num_groups=min(8, width),
        )

    def forward(self, text: torch.Tensor, z: torch.Tensor, tokens_state: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        states, mask = tokens_state
        lat = self.from_z(z).view(len(z), self.latent_channels, self.latent_side, self.latent_side)
        lat = F.interpolate(lat, size=(self.inner, self.inner), mode="bilinear", align_corners=False)
        t = torch.zeros(len(z), dtype=torch.long, device=z.device)
        out = self.unet(lat, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        out = F.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.epsilon * torch.tanh(out)


def build_generator(backbone: str, *, text_dim: int, token_dim: int, z_dim: int, size: int, width: int,
                    epsilon: float, seed: int | None = None) -> nn.Module:
    """A generator of ``backbone`` (``ssa`` or ``unet``), initialised from ``seed``."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown T2UE backbone {backbone!r}; choose ssa, unet or mlp")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if backbone == "mlp":
            return MLPGenerator(text_dim, z_dim=z_dim, size=size, width=width, epsilon=epsilon)
        if backbone == "ssa":
            return SSAGenerator(text_dim, z_dim=z_dim, size=size, width=width, epsilon=epsilon)
        return UNetGenerator(token_dim, z_dim=z_dim, size=size, width=width, epsilon=epsilon)
