"""UGE's texture key: secret class textures at a secret phase per image, removed exactly by the owner.

The colour key (:mod:`uge_protect.methods.uge.key`) is one of 13 directions: anyone who knows the
method can try them all. The texture key draws from the key string, per colour channel, a
secret permutation of the 16 pixels of a 4×4 tile and a secret choice of Walsh functions: one
±1 tile per class (up to :data:`MAX_CARRIERS`; beyond, classes share tiles), zero-sum on every
channel and orthogonal to the other classes' tiles. That is about 2^248 keys for 10 classes
(:func:`key_space_bits`).

The noise of an image of class y is its class's tile, tiled over the image and shifted by a
phase (dy, dx) in 0..3 that a keyed hash (HMAC-SHA256) draws from the image's 4×4 block sums,
times one integer coefficient per 8×8 block. Because every tile is zero-sum on each channel,
the noise leaves every 4×4 block sum unchanged, so the owner recomputes the phase from the
protected image; because the tiles are orthogonal integer vectors, the owner's projection
(:class:`TextureProjection`) removes the image's component along every class's carrier at that
phase on the integer lattice, n → n − ⌊(n·s)/‖s‖²⌋·s, and its output is **bit-identical** with
and without the noise. The phase changes from image to image, so the noise's class mean is
flat: subtracting each class's mean image leaves it in place, while a network learns "this
texture, at any phase" as easily as a fixed pattern.

What the key does not hide: the 4×4 block sums (a thumbnail at a quarter of the resolution)
are the same in the protected and the clean image, and anyone can train on them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Iterator

import torch
import torch.nn.functional as F

#: Side of the secret tile (the texture's period) and of the blocks sharing one coefficient.
TILE = 4
BLOCK = 8
#: The zero-sum Walsh functions of a 4×4 tile: at most this many distinct class carriers.
MAX_CARRIERS = TILE * TILE - 1
#: Squared norm of a block's carrier: ±1 on every pixel of every channel.
CARRIER_NORM2 = 3 * BLOCK * BLOCK


def _draws(key: str | int, purpose: str) -> Iterator[int]:
    """An endless stream of 64-bit integers, a pure function of ``key`` and ``purpose``."""
    counter = 0
    while True:
        digest = hashlib.sha256(f"uge-texture-{purpose}\x00{key}\x00{counter}".encode()).digest()
        for i in range(0, 32, 8):
            yield int.from_bytes(digest[i:i + 8], "little")
        counter += 1


def _shuffled(n: int, draws: Iterator[int]) -> list[int]:
    """A permutation of range(n) (Fisher-Yates; the modulo bias of 64-bit draws is below 2^-58)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = next(draws) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def _walsh(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def carrier_count(num_classes: int) -> int:
    """How many distinct class tiles a key holds for ``num_classes`` classes."""
    return max(1, min(int(num_classes), MAX_CARRIERS))


def key_space_bits(num_classes: int) -> float:
    """log2 of the number of distinct tile sets: per channel 16! pixel orders times the ordered
    choices of the classes' Walsh functions (an upper bound on what the 256-bit key can reach)."""
    m = carrier_count(num_classes)
    per_channel = math.lgamma(TILE * TILE + 1) + math.lgamma(MAX_CARRIERS + 1) - math.lgamma(MAX_CARRIERS - m + 1)
    return 3 * per_channel / math.log(2)


def texture_tiles(key: str | int, num_classes: int) -> torch.Tensor:
    """The key's class tiles (m, 3, 4, 4), int64 in {-1, 1}: zero-sum on every channel, and the
    tiles of two classes orthogonal (their Walsh functions differ on every channel)."""
    m = carrier_count(num_classes)
    draws = _draws(key, "tiles")
    walsh = _walsh(TILE * TILE)[1:]  # the zero-sum ones
    channels = []
    for _ in range(3):
        rows = _shuffled(MAX_CARRIERS, draws)[:m]
        pixels = _shuffled(TILE * TILE, draws)
        channels.append(walsh[rows][:, pixels])
    return torch.stack(channels, 1).view(m, 3, TILE, TILE).contiguous()


def _phase_key(key: str | int) -> bytes:
    return hashlib.sha256(f"uge-texture-phase\x00{key}".encode()).digest()


def covered(height: int, width: int) -> tuple[int, int]:
    """The part of an image the texture covers: whole 8×8 blocks from the top left."""
    return height - height % BLOCK, width - width % BLOCK


def texture_phases(key: str | int, pixels: torch.Tensor) -> torch.Tensor:
    """Each image's phase (N, 2) in 0..3: HMAC-SHA256 of its covered size and 4×4 block sums
    (uint8 ``pixels`` (N, 3, H, W)), which the noise leaves unchanged."""
    n, _, h, w = pixels.shape
    ch, cw = covered(h, w)
    out = torch.zeros(n, 2, dtype=torch.int64)
    if ch == 0 or cw == 0:
        return out
    sums = F.avg_pool2d(pixels[:, :, :ch, :cw].double(), TILE).mul_(TILE * TILE).round_().to(torch.int32).cpu()
    secret = _phase_key(key)
    head = f"{ch}x{cw}".encode()
    for i in range(n):
        digest = hmac.new(secret, head + sums[i].numpy().tobytes(), hashlib.sha256).digest()
        out[i, 0], out[i, 1] = digest[0] % TILE, digest[1] % TILE
    return out


def block_carriers(tiles: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Every class's carrier of one 8×8 block at each image's phase: (N, m, 3, 8, 8) int64,
    the tile shifted cyclically by the phase and repeated over the block."""
    rolled = torch.stack([torch.roll(tiles, (int(a), int(b)), (2, 3)) for a, b in phases.tolist()]) \
        if len(phases) else tiles.new_zeros((0, *tiles.shape))
    reps = BLOCK // TILE
    return rolled.repeat(1, 1, 1, reps, reps)


def to_squares(x: torch.Tensor, side: int = BLOCK) -> torch.Tensor:
    """(N, C, H, W), H and W multiples of ``side`` → (N, H/side, W/side, C, side, side)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // side, side, w // side, side).permute(0, 2, 4, 1, 3, 5)


def from_squares(b: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_squares`."""
    n, gh, gw, c, side, _ = b.shape
    return b.permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * side, gw * side)


def _class_carrier(tiles: torch.Tensor, phases: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image's own carrier (N, 1, 1, 3, 8, 8): its class's (label mod m) at its phase."""
    carriers = block_carriers(tiles, phases)
    pick = labels.long().cpu() % tiles.shape[0]
    return carriers[torch.arange(len(pick)), pick][:, None, None]


def block_coefficients(t: torch.Tensor) -> torch.Tensor:
    """The generator's output t (N, 1, H, W) in [-1, 1] as one coefficient per covered 8×8
    block (N, gh, gw): its mean over the block."""
    ch, cw = covered(*t.shape[-2:])
    return F.avg_pool2d(t[:, :, :ch, :cw], BLOCK)[:, 0]


def texture_levels(pixels: torch.Tensor, coefficients: torch.Tensor, labels: torch.Tensor, tiles: torch.Tensor,
                   phases: torch.Tensor, epsilon: float) -> torch.Tensor:
    """UGE's noise in uint8 levels (N, 3, H, W) int16 for uint8 ``pixels``: in every covered
    block, k·s with s the image's class carrier and k = round(coefficient·round(255·ε)), clamped
    so that the block stays inside [0, 255]; zero outside the covered part. Exactly a multiple
    of one carrier per block, so :class:`TextureProjection` removes it exactly."""
    n, _, h, w = pixels.shape
    ch, cw = covered(h, w)
    delta = torch.zeros(pixels.shape, dtype=torch.int16, device=pixels.device)
    if ch == 0 or cw == 0 or n == 0:
        return delta
    q = round(epsilon * 255)
    p = to_squares(pixels[:, :, :ch, :cw].to(torch.int64))
    s = _class_carrier(tiles, phases, labels).to(p.device)
    k = torch.round(coefficients.float() * q).to(torch.int64)
    hi = torch.where(s > 0, 255 - p, p).amin((-1, -2, -3))
    lo = -torch.where(s > 0, p, 255 - p).amin((-1, -2, -3))
    k = torch.maximum(torch.minimum(k, hi), lo)
    delta[:, :, :ch, :cw] = from_squares(k[..., None, None, None] * s).to(torch.int16)
    return delta


def along_texture(x: torch.Tensor, coefficients: torch.Tensor, labels: torch.Tensor, tiles: torch.Tensor,
                  phases: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The float, differentiable form of :func:`texture_levels` for [0, 1] images ``x``:
    δ = ε·c·s per covered block, c clamped so that x + δ stays in [0, 1]; ‖δ‖∞ ≤ ε."""
    n, _, h, w = x.shape
    ch, cw = covered(h, w)
    if ch == 0 or cw == 0:
        return torch.zeros_like(x)
    xb = to_squares(x[:, :, :ch, :cw])
    s = _class_carrier(tiles, phases, labels).to(device=x.device, dtype=x.dtype)
    hi = (torch.where(s > 0, 1.0 - xb, xb).amin((-1, -2, -3)) / epsilon).clamp(min=0.0)
    lo = -(torch.where(s > 0, xb, 1.0 - xb).amin((-1, -2, -3)) / epsilon).clamp(min=0.0)
    c = torch.maximum(torch.minimum(coefficients, hi), lo)
    inner = from_squares(epsilon * c[..., None, None, None] * s)
    return F.pad(inner, (0, w - cw, 0, h - ch))


class TextureProjection:
    """The owner's view of uint8 images: in every covered block, the component along every
    class's carrier at the image's phase removed on the integer lattice, then clipped to
    [0, 255]. Adding any integer multiple of one carrier per block (the noise) leaves the
    output bit-identical. A data transform of whole images: crops and flips come after it."""

    def __init__(self, key: str | int, num_classes: int):
        self.key = key
        self.tiles = texture_tiles(key, num_classes)

    def __call__(self, pixels: torch.Tensor, max_pixels: int = 1 << 24) -> torch.Tensor:
        """The owner's view of uint8 ``pixels`` (N, 3, H, W), ``max_pixels`` values at a time."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4:
            raise ValueError("the texture projection takes uint8 images (N, 3, H, W)")
        out = pixels.clone()
        ch, cw = covered(*pixels.shape[-2:])
        if ch == 0 or cw == 0:
            return out
        chunk = max(1, max_pixels // (3 * ch * cw))
        for i in range(0, len(pixels), chunk):
            part = pixels[i:i + chunk]
            p = to_squares(part[:, :, :ch, :cw].to(torch.int64))
            s = block_carriers(self.tiles, texture_phases(self.key, part)).to(p.device)
            # the nearest lattice point (what is left along each carrier is under half a level)
            dots = torch.einsum("nijcab,nmcab->nijm", p, s) + CARRIER_NORM2 // 2
            coeff = torch.div(dots, CARRIER_NORM2, rounding_mode="floor")
            kept = p - torch.einsum("nijm,nmcab->nijcab", coeff, s)
            out[i:i + chunk, :, :ch, :cw] = from_squares(kept).clamp_(0, 255).to(torch.uint8)
        return out
