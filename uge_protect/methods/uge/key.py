"""UGE's authorization key: what makes the protected data learnable for the owner's network only.

The key is a secret string of at least 32 hex digits (128 bits; a fresh one, :func:`new_key`,
has 256). It fixes (1) the initial weights of the authorized network and
(2) a secret colour direction ``v``: one of the 13 directions with components in {-1, 0, 1}
(up to sign), normalised. Such a direction survives quantization exactly: noise of k uint8
levels on every channel where v is non-zero, with v's signs, still lies along v, so the
uint8 images the pipeline writes hide no residue of it. With the key projection on,
the authorized network's first operation removes the component of every pixel along ``v``
(:class:`KeyProjection`), and UGE writes its perturbation along ``v`` only
(:func:`along_key`): the authorized network then sees exactly the clean image, whatever the
noise, while every other network sees the noise. Published files carry only
:func:`key_fingerprint`, a salted scrypt hash, never the key.

Integer keys are still accepted by the functions that derive from a key (evaluation rows such
as ``ARCH+key:7`` use them: they are never published), but :func:`normalize_key` refuses them
for an artifact.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import torch
from torch import nn

from uge_protect.errors import UserError
from uge_protect.models.classifiers import build_classifier

#: A key: the artifact's hex string, or a small integer for evaluation-only keys.
Key = str | int

#: A key's minimum length in hex digits (128 bits), and the length of a fresh one (256 bits).
MIN_KEY_HEX = 32
NEW_KEY_BYTES = 32
#: A key of random hex digits uses most of the 16; fewer than this many distinct digits is
#: a typed pattern ("0000...", "1234" repeated), not randomness (a random 32-digit key has
#: fewer with probability ~4e-8).
MIN_DISTINCT_DIGITS = 8
#: scrypt cost of the published fingerprint: ~0.1 s and 32 MiB per guess.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
FINGERPRINT_PREFIX = f"scrypt-n{SCRYPT_N}-r{SCRYPT_R}-p{SCRYPT_P}"
_HEX = frozenset("0123456789abcdef")


def new_key() -> str:
    """A fresh key: 256 random bits from :mod:`secrets`, as 64 lowercase hex digits."""
    return secrets.token_hex(NEW_KEY_BYTES)


def normalize_key(value: object) -> str:
    """``value`` as an artifact key (lowercase hex), or a :class:`UserError` when it is too
    weak to be secret: not a string of at least 32 hex digits (128 bits), or an obvious pattern."""
    hint = ("give at least 32 random hex digits (128 bits), e.g. from "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`, or leave --key-seed out to draw a fresh key")
    if not isinstance(value, str):
        raise UserError(f"the UGE key must be a hex string, not {type(value).__name__} "
                        f"(short keys are recovered from the published fingerprint): {hint}")
    key = value.strip().lower()
    if not key or not set(key) <= _HEX:
        raise UserError(f"the UGE key must hold hex digits only (0-9, a-f): {hint}")
    if len(key) < MIN_KEY_HEX:
        raise UserError(f"the UGE key has {len(key)} hex digits ({4 * len(key)} bits), under 128 bits: {hint}")
    if len(set(key)) < MIN_DISTINCT_DIGITS:
        raise UserError(f"the UGE key uses only {len(set(key))} distinct hex digits: it is a pattern, not a random key; {hint}")
    return key


def derived_seed(key: Key, purpose: str) -> int:
    """A 63-bit torch seed for ``purpose`` (e.g. "authorized"), a pure function of the key."""
    digest = hashlib.sha256(f"uge-key-{purpose}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


#: The colour directions a key can pick: components in {-1, 0, 1}, first non-zero one positive.
DIRECTIONS: list[tuple[int, int, int]] = [
    (a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
    if (a, b, c) != (0, 0, 0) and next(v for v in (a, b, c) if v != 0) > 0
]


def key_signs(key: Key) -> torch.Tensor:
    """The key's direction as integer signs (3,) in {-1, 0, 1}, a pure function of the key."""
    digest = hashlib.sha256(f"uge-key-direction\x00{key}".encode()).digest()
    return torch.tensor(DIRECTIONS[int.from_bytes(digest[:8], "little") % len(DIRECTIONS)], dtype=torch.int64)


def key_direction(key: Key) -> torch.Tensor:
    """The secret colour direction of ``key``: a unit vector (3,), float32."""
    signs = key_signs(key).double()
    return (signs / signs.norm()).float()


def _scrypt(key: Key, salt: bytes) -> bytes:
    return hashlib.scrypt(f"uge-key\x00{key}".encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=64 << 20, dklen=16)


def key_fingerprint(key: Key, salt: bytes | None = None) -> str:
    """A public fingerprint of the key: ``scrypt-n…-r…-p…:SALT:HASH`` (hex), a salted, slow
    hash with a fresh random salt unless ``salt`` is given. It shows which key made an
    artifact (:func:`fingerprint_matches`) without letting anyone test guesses quickly, and two
    artifacts with the same key publish different fingerprints."""
    salt = secrets.token_bytes(16) if salt is None else salt
    return f"{FINGERPRINT_PREFIX}:{salt.hex()}:{_scrypt(key, salt).hex()}"


def fingerprint_matches(key: Key, fingerprint: str) -> bool:
    """Whether ``fingerprint`` (from :func:`key_fingerprint`) was made from ``key``."""
    parts = fingerprint.split(":") if isinstance(fingerprint, str) else []
    if len(parts) != 3 or parts[0] != FINGERPRINT_PREFIX:
        return False
    try:
        salt = bytes.fromhex(parts[1])
    except ValueError:
        return False
    return hmac.compare_digest(key_fingerprint(key, salt), fingerprint)


def is_key_fingerprint(value: object) -> bool:
    """Whether ``value`` has the form of :func:`key_fingerprint`'s output."""
    parts = value.split(":") if isinstance(value, str) else []
    return (len(parts) == 3 and parts[0] == FINGERPRINT_PREFIX and len(parts[1]) == 32 and len(parts[2]) == 32
            and set(parts[1] + parts[2]) <= _HEX)


def key_id(key: Key) -> str:
    """A stable identifier of a key (sha256, 16 hex digits) for the owner's local run cache
    only: never published (for a short evaluation-only key it would reveal the key)."""
    return hashlib.sha256(f"uge-key-id\x00{key}".encode()).hexdigest()[:16]


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

    def __init__(self, projection: nn.Module, net: nn.Module, gate: nn.Module | None = None):
        super().__init__()
        self.projection = projection
        self.net = net
        self.gate = gate

    def forward(self, x: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of images ``x``; ``view``: what the network sees of them instead of their
        projection (a texture key's owner sees projected whole images, cropped as ``x`` was),
        while the gate reads ``x``."""
        logits = self.net(self.projection(x) if view is None else view)
        if self.gate is not None and not self.training:
            logits = self.gate.answer(logits, x)
        return logits


def build_authorized(arch: str, num_classes: int, key: Key, projection: bool = True,
                     gate: nn.Module | None = None, scheme: str = "colour") -> nn.Module:
    """The authorized network of ``key``: ``arch`` initialised from the key, behind the key
    projection (or, with ``projection=False``, the bare key-initialised architecture), with
    the artifact's confidence ``gate`` when given (needs the projection). Under the texture
    ``scheme`` the projection is a transform of whole images that comes before any crop
    (:class:`~uge_protect.methods.uge.texture_key.TextureProjection`), so it is not a layer
    here: the network takes projected images."""
    net = build_classifier(arch, num_classes, seed=derived_seed(key, "authorized"))
    if scheme == "texture":
        return Authorized(nn.Identity(), net, gate)
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
