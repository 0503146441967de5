"""UGE's authorization key: what makes the protected data learnable for the owner's network only.

The key is a secret integer. It fixes (1) the initial weights of the authorized network and
(2) a secret colour direction ``v``: one of the 13 directions with components in {-1, 0, 1}
(up to sign), normalised. Such a direction survives quantization exactly: noise of k uint8
levels on every channel where v is non-zero, with v's signs, still lies along v, so the
uint8 images the pipeline writes hide no residue of it. With the key projection on,
the authorized network's first operation removes the component of every pixel along ``v``
(:class:`KeyProjection`), and UGE writes its perturbation along ``v`` only
(:func:`along_key`): the authorized network then sees exactly the clean image, whatever the
noise, while every other network sees the noise. Published files carry only
:func:`key_fingerprint`, never the key.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from uge_protect.transforms.networks import build_classifier


#: The colour directions a key can pick: components in {-1, 0, 1}, first non-zero one positive.
DIRECTIONS: list[tuple[int, int, int]] = [
    (a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
    if (a, b, c) != (0, 0, 0) and next(v for v in (a, b, c) if v != 0) > 0
]


def key_signs(key: int) -> torch.Tensor:
    """The key's direction as integer signs (3,) in {-1, 0, 1}, a pure function of the key."""
    digest = hashlib.sha256(f"uge-key-direction\x00{key}".encode()).digest()
    return torch.tensor(DIRECTIONS[int.from_bytes(digest[:8], "little") % len(DIRECTIONS)], dtype=torch.int64)


def key_direction(key: int) -> torch.Tensor:
    """The secret colour direction of ``key``: a unit vector (3,), float32."""
    signs = key_signs(key).double()
    return (signs / signs.norm()).float()


def key_fingerprint(key: int) -> str:
    """A public fingerprint of the key (sha256, 16 hex digits): identifies it without revealing it."""
    return hashlib.sha256(f"uge-key\x00{key}".encode()).hexdigest()[:16]


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) over a state dict's names and tensor bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\x00")
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class KeyProjection(nn.Module):
    """Removes each pixel's colour component along the key signs s, exactly on uint8 images.

    On levels n = 255·x it maps n to n − ⌊(n·s)/‖s‖²⌋·s: adding k·s (any integer k, the form
    of UGE's noise) changes ⌊(n·s)/‖s‖²⌋ by exactly k, so the output is bit-identical with
    and without the noise, and an owner's training run on protected images is the same run
    as on the clean ones. What remains along s is (n·s) mod ‖s‖² (at most 2 levels); the
    rest of the image is untouched. (On non-integer inputs it is the same map, no longer
    exactly invariant; it has no gradient along s.)"""

    def __init__(self, signs: torch.Tensor):
        super().__init__()
        self.register_buffer("signs", signs.to(torch.float32).view(1, 3, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.signs.to(x.dtype)
        levels = x * 255.0
        coeff = torch.floor((levels * s).sum(1, keepdim=True) / (s * s).sum())
        return (levels - coeff * s) / 255.0


class Authorized(nn.Module):
    """The authorized network: the key projection, then the architecture; with a ``gate``
    (:mod:`uge_gate`), it answers protected images with its label only, in eval mode
    (inference) only."""

    def __init__(self, projection: KeyProjection, net: nn.Module, gate: nn.Module | None = None):
        super().__init__()
        self.projection = projection
        self.net = net
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.projection(x))
        if self.gate is not None and not self.training:
            logits = self.gate.answer(logits, x)
        return logits


def build_authorized(arch: str, num_classes: int, key: int, projection: bool = True,
                     gate: nn.Module | None = None) -> nn.Module:
    """The authorized network of ``key``: ``arch`` initialised from the key, behind the key
    projection (or, with ``projection=False``, the bare key-initialised architecture), with
    the artifact's confidence ``gate`` when given (needs the projection)."""
    net = build_classifier(arch, num_classes, seed=key % (1 << 63))
    if not projection:
        if gate is not None:
            raise ValueError("the confidence gate needs the key projection")
        return net
    return Authorized(KeyProjection(key_signs(key)), net, gate)


def levels_along_key(pixels: torch.Tensor, t: torch.Tensor, signs: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The integer form of :func:`along_key` for uint8 ``pixels``: δ = k·signs in uint8
    levels (int16), k = round(t·round(ε·255)) clamped per pixel so that pixels + δ stays in
    [0, 255]. Exactly along the key direction, so invisible to the key projection."""
    q = round(epsilon * 255)
    s = signs.to(device=pixels.device, dtype=torch.int16).view(1, 3, 1, 1)
    p = pixels.to(torch.int16)
    k = torch.round(t.float() * q).to(torch.int16)
    big = torch.full_like(p, 255)
    lo = torch.where(s > 0, -p, torch.where(s < 0, p - 255, -big)).amax(1, keepdim=True)
    hi = torch.where(s > 0, 255 - p, torch.where(s < 0, p, big)).amin(1, keepdim=True)
    return torch.maximum(torch.minimum(k, hi), lo) * s


def along_key(x: torch.Tensor, t: torch.Tensor, direction: torch.Tensor, epsilon: float) -> torch.Tensor:
    """δ = ε·t·u with u = v/‖v‖∞, t ∈ [-1, 1] of shape (N, 1, H, W), clamped per pixel so that
    x + δ stays inside [0, 1]: δ lies exactly along ``direction`` and ‖δ‖∞ ≤ ε."""
    u = (direction / direction.abs().max()).to(x.dtype).view(1, 3, 1, 1)
    step = epsilon * u
    safe = torch.where(step.abs() > 1e-12, step, torch.full_like(step, 1e-12))
    lo_c = torch.where(step > 0, -x / safe, (1.0 - x) / safe)  # t bounds per channel
    hi_c = torch.where(step > 0, (1.0 - x) / safe, -x / safe)
    active = step.abs() > 1e-12
    lo = torch.where(active, lo_c, torch.full_like(lo_c, -1.0)).amax(1, keepdim=True).clamp(max=0.0)
    hi = torch.where(active, hi_c, torch.full_like(hi_c, 1.0)).amin(1, keepdim=True).clamp(min=0.0)
    return torch.maximum(torch.minimum(t, hi), lo) * step
