"""Defenses a trainer may use against protected data, and partial protection.

Two kinds:

* **data-level** (``grayscale``, ``jpeg:Q``): a preprocessing applied once to the uint8
  images — the training images and, as a trainer deploying that preprocessing would, the
  test images too; ``class-mean`` needs labels, so it changes the training images only;
* **training-time** (``cutout``, ``mixup``, ``strong-aug``, ``adv-train``): applied to every
  batch inside the training loop (see :mod:`uge_protect.eval.classify`).

``none`` is plain training with the standard augmentation (random crop, flip).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from uge_protect.errors import UserError

DATA_DEFENSES = ("grayscale", "jpeg", "class-mean")
TRAIN_DEFENSES = ("cutout", "mixup", "strong-aug", "adv-train")
DEFENSE_NAMES = ("none", *DATA_DEFENSES, *TRAIN_DEFENSES)

#: ITU-R BT.601 luma weights, as Pillow's ``convert("L")``.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Defense:
    """A parsed ``--defense`` value: ``name`` and its parameters (``quality`` for jpeg)."""

    spec: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def data_level(self) -> bool:
        return self.name in DATA_DEFENSES

    @property
    def train_time(self) -> bool:
        return self.name in TRAIN_DEFENSES


def parse_defense(spec: str) -> Defense:
    """``none``, ``grayscale``, ``jpeg:Q`` (1–100), ``class-mean``, ``cutout``, ``mixup``, ``strong-aug``,
    ``adv-train``."""
    s = spec.strip().lower()
    if s.startswith("jpeg"):
        _, _, q = s.partition(":")
        try:
            quality = int(q) if q else 75
        except ValueError:
            raise UserError(f"bad defense {spec!r}: jpeg quality must be an integer, e.g. jpeg:75") from None
        if not 1 <= quality <= 100:
            raise UserError(f"bad defense {spec!r}: jpeg quality must be between 1 and 100")
        return Defense(f"jpeg:{quality}", "jpeg", {"quality": quality})
    aliases = {"gray": "grayscale", "greyscale": "grayscale", "strong_aug": "strong-aug",
               "trivialaugment": "strong-aug", "adv": "adv-train", "adv_train": "adv-train", "at": "adv-train",
               "class_mean": "class-mean", "classmean": "class-mean"}
    s = aliases.get(s, s)
    if s not in DEFENSE_NAMES:
        raise UserError(
            f"unknown defense {spec!r}; choose none, grayscale, jpeg:Q, class-mean, cutout, mixup, strong-aug or adv-train"
        )
    return Defense(s, s)


# ----------------------------------------------------------------------------- data-level


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → luma replicated to three equal channels (still uint8, 3 channels)."""
    w = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    y = (images.float() * w).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return y.expand(-1, 3, -1, -1).contiguous()


def jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode every uint8 (N, 3, H, W) image as JPEG at ``quality`` with Pillow and decode it back."""
    out = torch.empty_like(images)
    arr = images.permute(0, 2, 3, 1).contiguous().numpy()
    for i in range(arr.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(arr[i], mode="RGB").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            dec = np.asarray(im.convert("RGB"))
        out[i] = torch.from_numpy(dec.copy()).permute(2, 0, 1)
    return out


def class_mean_subtraction(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) images, each moved by its class's mean image minus the mean image of
    all labelled ones (rounded, clipped to [0, 255]); unlabelled ones (label < 0) unchanged.

    An attacker who holds the labels and knows nothing of the protection: noise that is the same
    for every image of a class (class-wise noise) is removed exactly up to the clipping, along with
    the class means' own content; sample-wise noise is left where it differs from its class mean."""
    labels = labels.long()
    out = images.float()
    known = labels >= 0
    if not bool(known.any()):
        return images
    overall = out[known].mean(0)
    for c in labels[known].unique().tolist():
        members = labels == c
        out[members] -= out[members].mean(0) - overall
    return out.round_().clamp_(0, 255).to(torch.uint8)


def apply_data_defense(defense: Defense, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a data-level defense to uint8 images; other defenses return ``images`` unchanged.
    ``labels`` are the training images' (None for test images: a defense that needs labels,
    ``class-mean``, leaves them as they are)."""
    if defense.name == "class-mean":
        return images if labels is None else class_mean_subtraction(images, labels)
    if defense.name == "grayscale":
        return grayscale(images)
    if defense.name == "jpeg":
        return jpeg_roundtrip(images, defense.params["quality"])
    return images


# ----------------------------------------------------------------------------- training-time


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one ``size`` × ``size`` square per image of a float batch (N, C, H, W), placed inside the image."""
    n, _, h, w = x.shape
    size = max(1, min(size, h, w))
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + size).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + size).view(n, 1, 1)))
    return x * (~inside).unsqueeze(1).to(x.device, x.dtype)


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float = 1.0,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix each image with a random partner: returns (mixed x, soft targets (N, K), λ).

    λ ~ Beta(α, α); targets are λ·onehot(y) + (1−λ)·onehot(y[perm]).
    """
    g = generator
    # Beta(α, α) from two Gamma draws made with a seeded numpy generator (torch's Beta takes no generator).
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    mixed = lam * x + (1.0 - lam) * x[perm]
    onehot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
    targets = lam * onehot + (1.0 - lam) * onehot[perm]
    return mixed, targets, lam


def trivial_augment(images: torch.Tensor, seed: int) -> torch.Tensor:
    """TrivialAugmentWide on uint8 (N, 3, H, W): one random op and magnitude per image, seeded.

    Ops and magnitudes are drawn per image from torchvision's TrivialAugmentWide space; images
    that drew the same (op, magnitude) are transformed together in one batched call, which is
    ~50× faster on a CPU than calling the transform image by image.
    """
    from torchvision.transforms import v2

    aug = v2.TrivialAugmentWide()
    g = torch.Generator().manual_seed(int(seed))
    space = getattr(aug, "_AUGMENTATION_SPACE", None)
    apply = getattr(aug, "_apply_image_or_video_transform", None)
    if space is None or apply is None:  # torchvision without these internals: per image
        out = torch.empty_like(images)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for i in range(images.shape[0]):
                out[i] = aug(images[i])
        return out
    names = list(space)
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    bins = aug.num_magnitude_bins
    op = torch.randint(len(names), (n,), generator=g)
    level = torch.randint(bins, (n,), generator=g)
    negative = torch.rand(n, generator=g) <= 0.5
    table = []
    for name in names:
        magnitudes_fn, signed = space[name]
        mags = magnitudes_fn(bins, h, w)
        table.append((None if mags is None else mags.tolist(), signed))
    groups: dict[tuple[str, float], list[int]] = {}
    for i, (o, b, neg) in enumerate(zip(op.tolist(), level.tolist(), negative.tolist())):
        mags, signed = table[o]
        mag = 0.0 if mags is None else float(mags[b]) * (-1.0 if signed and neg else 1.0)
        groups.setdefault((names[o], mag), []).append(i)
    out = images.clone()
    for (name, mag), idx in groups.items():
        if name == "Identity":
            continue
        sel = torch.tensor(idx)
        out[sel] = apply(images[sel], name, mag, interpolation=aug.interpolation, fill=aug._fill)
    return out


def pgd_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epsilon: float, step: float,
               steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """L∞ PGD with a uniform random start: maximises cross-entropy within ``epsilon`` of ``x`` in [0, 1]."""
    noise = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    delta = (noise * 2 - 1) * epsilon
    x_adv = (x + delta).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon).clamp(0, 1).detach()
    return x_adv


# ----------------------------------------------------------------------------- partial protection


def partial_protection(protected_images: torch.Tensor, protected_keys: list[str],
                       clean_images: torch.Tensor, clean_keys: list[str],
                       fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a seeded random ``fraction`` of protected samples by their clean versions (paired by key).

    Returns (images, mask) where ``mask[i]`` is True when sample ``i`` now holds the clean image.
    Exactly ``round(fraction · N)`` samples are replaced. Raises :class:`UserError` when a
    protected key to replace has no clean counterpart or the images differ in size.
    """
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"--clean-fraction must be between 0 and 1, got {fraction}")
    n = len(protected_keys)
    k = int(round(fraction * n))
    mask = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return protected_images, mask
    if protected_images.shape[1:] != clean_images.shape[1:]:
        raise UserError(
            f"protected and clean images differ in size ({tuple(protected_images.shape[1:])} vs "
            f"{tuple(clean_images.shape[1:])}); pass --image-size"
        )
    index = {key: i for i, key in enumerate(clean_keys)}
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=g)[:k]
    missing = [protected_keys[i] for i in chosen.tolist() if protected_keys[i] not in index]
    if missing:
        raise UserError(
            f"--clean-fraction pairs samples by key, but {len(missing)} protected keys are not in the "
            f"clean training set (e.g. {missing[0]!r})"
        )
    out = protected_images.clone()
    src = torch.tensor([index[protected_keys[i]] for i in chosen.tolist()], dtype=torch.long)
    out[chosen] = clean_images[src]
    mask[chosen] = True
    return out, mask
