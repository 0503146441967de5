"""An attacker who knows UGE but holds no artifact: the rows ``eval --method-aware`` adds.

The attacker has the protected shards, this code, the protection's public record and a small
clean labelled set, not the key. Against the key projection (a secret colour direction, one
of :data:`~uge_protect.methods.uge.key.DIRECTIONS`) it can:

* **enumerate** every direction: ``ARCH@key:I`` trains ``ARCH`` behind the projection along
  direction ``I`` (13 runs an architecture); the group ``ARCH@enumerated`` keeps the run that
  scores best on the attacker's clean set;
* **estimate** the direction from the data (:data:`ESTIMATORS`): UGE's noise lies along the
  key, so along that direction only it raises the images' high-frequency colour energy
  (``ARCH@estimated:hf-energy``), the spread of the class means
  (``ARCH@estimated:class-means``) and the weight a linear probe trained on the protected
  images puts there (``ARCH@estimated:linear-probe``), each measured against the clean set;
* **average** over the family: ``ARCH@all-keys`` sees the mean of the 13 projections.

Against the texture key (:mod:`uge_protect.methods.uge.texture_key`, about 2^232 keys) it can:

* **enumerate** what its budget allows: ``ARCH@key:rI`` trains behind the projection of a
  random key I (:data:`RANDOM_KEYS` of them, group ``ARCH@enumerated``);
* train on what the noise never changes: ``ARCH@invariant`` sees the images' 4×4 block means;
* **fold** away the texture's period without the key: ``ARCH@fold:block`` sees every 8×8
  block less its part of period 4 (the mean of its four 4×4 quarters), where the noise lives;
  ``ARCH@fold:image`` folds the whole image at once (less of the image lost, and exact where
  the generator keeps one coefficient over the image);
* **estimate** each image's texture from its own blocks: ``ARCH@estimated:image-pca`` removes
  from every 4×4 block the top principal direction of the image's 4×4 blocks.

Rows are labelled by strategy and candidate index only; the key is never read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.methods.base import AuthorizedModel
from uge_protect.methods.uge.key import DIRECTIONS, KeyProjection
from uge_protect.methods.uge.texture_key import BLOCK, TILE, TextureProjection, covered, from_squares, to_squares

#: Random keys the texture-key attacker tries, one training run each per architecture: any other
#: key is a wrong one with probability 1 − 2^-232 (10 classes), so one run shows what any number of them gets.
RANDOM_KEYS = 1


def _signs(index: int) -> torch.Tensor:
    return torch.tensor(DIRECTIONS[index], dtype=torch.int64)


class AverageProjection(nn.Module):
    """The mean of the key projections along every candidate direction."""

    def __init__(self) -> None:
        super().__init__()
        self.projections = nn.ModuleList(KeyProjection(_signs(i)) for i in range(len(DIRECTIONS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(x) for p in self.projections]).mean(0)


def high_frequency_energy(images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per candidate direction, the mean squared colour component along it (unit vector) of
    each image minus its 3×3 local mean: (len(DIRECTIONS),) float64, from uint8 (N, 3, H, W)."""
    units = _units()
    total = torch.zeros(len(DIRECTIONS), dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].double()
        residual = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        along = torch.einsum("nchw,dc->ndhw", residual, units)
        total += along.pow(2).sum(dim=(0, 2, 3))
        count += along.shape[0] * along.shape[2] * along.shape[3]
    return total / max(1, count)


def _units() -> torch.Tensor:
    units = torch.tensor(DIRECTIONS, dtype=torch.float64)
    return units / units.norm(dim=1, keepdim=True)


def class_mean_spread(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per candidate direction, the share of the images' variance along it that lies between
    the class means, less what the class means spread by chance with so few samples (the
    within-class variance over the class size), summed over pixels: (len(DIRECTIONS),) float64."""
    classes = [c for c in labels.unique().tolist() if c >= 0]
    if len(classes) < 2:
        return torch.zeros(len(DIRECTIONS), dtype=torch.float64)
    units = _units()
    means, variances, counts = [], [], []
    for c in classes:  # per class, the colour moments per pixel, a chunk at a time (memory stays flat)
        idx = (labels == c).nonzero().flatten()
        first = torch.zeros(images.shape[1:], dtype=torch.float64)
        second = torch.zeros(3, 3, *images.shape[2:], dtype=torch.float64)
        for start in range(0, len(idx), 256):
            x = images[idx[start:start + 256]].double()
            first += x.sum(0)
            second += torch.einsum("nahw,nbhw->abhw", x, x)
        mean, moment = first / len(idx), second / len(idx)
        means.append(torch.einsum("chw,dc->dhw", mean, units))
        variances.append(torch.einsum("abhw,da,db->dhw", moment, units, units) - means[-1] ** 2)
        counts.append(len(idx))
    m, v, n = torch.stack(means), torch.stack(variances), torch.tensor(counts, dtype=torch.float64)
    between = m.var(0, unbiased=False)
    chance = (v / n.view(-1, 1, 1, 1)).mean(0)
    w = (n / n.sum()).view(-1, 1, 1, 1)
    total = ((w * (v + m ** 2)).sum(0) - (w * m).sum(0) ** 2).sum(dim=(1, 2)).clamp(min=1e-9)
    return (between - chance).clamp(min=0).sum(dim=(1, 2)) / total


def linear_probe_weight(images: torch.Tensor, labels: torch.Tensor, steps: int = 100, seed: int = 0) -> torch.Tensor:
    """Per candidate direction, the squared weight a linear classifier trained on ``images``
    (full batch, Adam, ``steps`` steps) puts along it, summed over pixels and classes."""
    keep = labels >= 0
    x = images[keep].float().div(255.0)
    x = x - x.mean(0, keepdim=True)
    y = labels[keep].long()
    num_classes = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_classes, *x.shape[1:], generator=gen) * 1e-3).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = torch.einsum("nchw,kchw->nk", x, weight) + bias
        (F.cross_entropy(logits, y) + 1e-4 * weight.pow(2).sum()).backward()
        opt.step()
    along = torch.einsum("kchw,dc->kdhw", weight.detach().double(), _units())
    return along.pow(2).sum(dim=(0, 2, 3))


#: How each estimator scores every candidate direction of images and labels, and how the
#: protected images' score is set against the clean ones' (a ratio where natural images
#: differ by direction, a difference for a share); the estimate is the largest.
ESTIMATORS = {
    "hf-energy": (lambda x, y: high_frequency_energy(x), "ratio"),
    "class-means": (class_mean_spread, "difference"),
    "linear-probe": (linear_probe_weight, "ratio"),
}


def estimate_signs(protected: torch.Tensor, clean: torch.Tensor, how: str = "hf-energy",
                   protected_labels: torch.Tensor | None = None,
                   clean_labels: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    """The candidate direction (index, signs) whose score (:data:`ESTIMATORS`) the protected
    images raise most over the clean ones."""
    score, compare = ESTIMATORS[how]
    mine, reference = score(protected, protected_labels), score(clean, clean_labels)
    gain = mine / reference.clamp(min=1e-12) if compare == "ratio" else mine - reference
    index = int(torch.argmax(gain))
    return index, _signs(index)


def attacker_models(record: dict[str, Any], archs: list[str], protected: torch.Tensor,
                    protected_labels: torch.Tensor, clean: torch.Tensor, clean_labels: torch.Tensor
                    ) -> list[AuthorizedModel]:
    """The method-aware attacker's rows for every architecture of ``archs`` (none against a
    protection without the key projection: its authorization is the architecture and its
    initialisation, which the ``ARCH+key:N`` rows already measure)."""
    if record.get("key_projection") is False:
        return []
    if record.get("key_scheme") == "texture":
        return texture_attacker_models(archs, int(protected_labels.max()) + 1 if len(protected_labels) else 2)
    estimates = {how: estimate_signs(protected, clean, how, protected_labels, clean_labels)[0] for how in ESTIMATORS}
    rows = []
    for arch in archs:
        for i in range(len(DIRECTIONS)):
            rows.append(AuthorizedModel(f"{arch}@key:{i}", arch, tag=f"uge-direction-{i}",
                                        front=lambda i=i: KeyProjection(_signs(i)), group=f"{arch}@enumerated"))
        for how, index in estimates.items():
            rows.append(AuthorizedModel(f"{arch}@estimated:{how}", arch, tag=f"uge-direction-{index}",
                                        front=lambda index=index: KeyProjection(_signs(index))))
        rows.append(AuthorizedModel(f"{arch}@all-keys", arch, tag="uge-all-directions", front=AverageProjection))
    return rows


def _on_covered(images: torch.Tensor, transform) -> torch.Tensor:
    """``transform`` (float (N, 3, h, w) → float) of the part the texture covers, rounded back to uint8."""
    out = images.clone()
    ch, cw = covered(*images.shape[-2:])
    if ch and cw:
        out[:, :, :ch, :cw] = transform(images[:, :, :ch, :cw].double()).round().clamp(0, 255).to(torch.uint8)
    return out


def block_means(images: torch.Tensor) -> torch.Tensor:
    """Every 4×4 tile replaced by its mean colour: all the texture key's noise leaves (uint8)."""
    return _on_covered(images, lambda x: F.interpolate(F.avg_pool2d(x, TILE), scale_factor=TILE, mode="nearest"))


def fold_period(images: torch.Tensor, whole: bool = False) -> torch.Tensor:
    """Every 8×8 block (``whole``: the whole covered image) less its zero-mean part of period 4,
    the mean of its 4×4 tiles, uint8: what removes a texture of period 4 whatever its tile."""
    def fold(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        gy, gx = (h // TILE, w // TILE) if whole else (BLOCK // TILE, BLOCK // TILE)
        b = x.reshape(n, c, h // (gy * TILE), gy, TILE, w // (gx * TILE), gx, TILE)
        periodic = b.mean((3, 6), keepdim=True)
        periodic = periodic - periodic.mean((4, 7), keepdim=True)
        return (b - periodic).reshape(n, c, h, w)
    return _on_covered(images, fold)


def fold_image(images: torch.Tensor) -> torch.Tensor:
    """:func:`fold_period` over the whole image."""
    return fold_period(images, whole=True)


def image_pca(images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Each image less, in every 4×4 tile, its component along the top principal direction of
    that image's (per-channel centred) tiles: one image's repeated texture, estimated from it alone."""
    def strip(x: torch.Tensor) -> torch.Tensor:
        parts = []
        for i in range(0, len(x), chunk):
            t = to_squares(x[i:i + chunk], TILE)
            n, gh, gw = t.shape[:3]
            v = (t - t.mean((-1, -2), keepdim=True)).reshape(n, gh * gw, -1)
            top = torch.linalg.svd(v, full_matrices=False).Vh[:, 0]  # (n, 48)
            along = torch.einsum("nkd,nd->nk", v, top)
            parts.append(from_squares((v - along[..., None] * top[:, None]).reshape(t.shape) + t.mean((-1, -2), keepdim=True)))
        return torch.cat(parts)
    return _on_covered(images, strip)


def texture_attacker_models(archs: list[str], num_classes: int) -> list[AuthorizedModel]:
    """The rows of an attacker who knows the texture key's method (see the module's docstring)."""
    rows = []
    for arch in archs:
        for i in range(RANDOM_KEYS):
            key = f"texture-attacker-{i}"
            rows.append(AuthorizedModel(f"{arch}@key:r{i}", arch, tag=f"uge-texture-random-key-{i}-{num_classes}",
                                        transform=TextureProjection(key, num_classes), group=f"{arch}@enumerated"))
        rows.append(AuthorizedModel(f"{arch}@invariant", arch, tag="uge-texture-block-means", transform=block_means))
        rows.append(AuthorizedModel(f"{arch}@fold:block", arch, tag="uge-texture-fold-block", transform=fold_period))
        rows.append(AuthorizedModel(f"{arch}@fold:image", arch, tag="uge-texture-fold-image", transform=fold_image))
        rows.append(AuthorizedModel(f"{arch}@estimated:image-pca", arch, tag="uge-texture-image-pca",
                                    transform=image_pca))
    return rows
