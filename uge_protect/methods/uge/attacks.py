"""An attacker who knows UGE but holds no artifact: the rows ``eval --method-aware`` adds.

The attacker has the protected shards, this code, the protection's public record and a small
clean labelled set, not the key. Against the key projection (a secret colour direction, one
of :data:`~uge_protect.methods.uge.key.DIRECTIONS`) it can:

* **enumerate** every direction: ``ARCH@key:I`` trains ``ARCH`` behind the projection along
  direction ``I`` (13 runs an architecture); the group ``ARCH@enumerated`` keeps the run that
  scores best on the attacker's clean set;
* **estimate** the direction from the data: ``ARCH@estimated`` projects along the direction
  whose high-frequency colour energy grows most from the clean set to the protected images
  (:func:`estimate_signs`): UGE's noise lies along the key, so it adds energy there only;
* **average** over the family: ``ARCH@all-keys`` sees the mean of the 13 projections.

Rows are labelled by strategy and candidate index only; the key is never read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.methods.base import AuthorizedModel
from uge_protect.methods.uge.key import DIRECTIONS, KeyProjection


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
    units = torch.tensor(DIRECTIONS, dtype=torch.float64)
    units = units / units.norm(dim=1, keepdim=True)
    total = torch.zeros(len(DIRECTIONS), dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].double()
        residual = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        along = torch.einsum("nchw,dc->ndhw", residual, units)
        total += along.pow(2).sum(dim=(0, 2, 3))
        count += along.shape[0] * along.shape[2] * along.shape[3]
    return total / max(1, count)


def estimate_signs(protected: torch.Tensor, clean: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The candidate direction (index, signs) whose high-frequency energy the protected images
    raise most over the clean ones (as a ratio: natural images differ by direction)."""
    ratio = high_frequency_energy(protected) / high_frequency_energy(clean).clamp(min=1e-9)
    index = int(torch.argmax(ratio))
    return index, _signs(index)


def attacker_models(record: dict[str, Any], archs: list[str], protected: torch.Tensor,
                    clean: torch.Tensor) -> list[AuthorizedModel]:
    """The method-aware attacker's rows for every architecture of ``archs`` (none against a
    protection without the key projection: its authorization is the architecture and its
    initialisation, which the ``ARCH+key:N`` rows already measure)."""
    if record.get("key_projection") is False:
        return []
    estimated, _ = estimate_signs(protected, clean)
    rows = []
    for arch in archs:
        for i in range(len(DIRECTIONS)):
            rows.append(AuthorizedModel(f"{arch}@key:{i}", arch, tag=f"uge-direction-{i}",
                                        front=lambda i=i: KeyProjection(_signs(i)), group=f"{arch}@enumerated"))
        rows.append(AuthorizedModel(f"{arch}@estimated", arch, tag=f"uge-direction-{estimated}",
                                    front=lambda: KeyProjection(_signs(estimated))))
        rows.append(AuthorizedModel(f"{arch}@all-keys", arch, tag="uge-all-directions", front=AverageProjection))
    return rows
