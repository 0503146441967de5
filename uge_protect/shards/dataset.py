"""Load small image-text shard sets into memory (for fitting methods and for evaluation).

Web-scale data streams through the pipeline; fitting a method or training an evaluation
model on a few thousand images is simpler and faster from in-memory tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uge_protect.errors import UserError
from uge_protect.shards.decode import DecodeError, decode_image, pick_image_field
from uge_protect.shards.discover import expand_inputs, open_shard, read_error_text
from uge_protect.shards.tario import TarReadError, iter_tar_samples


@dataclass
class InMemoryDataset:
    """Decoded samples: ``images`` uint8 (N, 3, H, W); ``labels`` int64 (N,), -1 where absent."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str | None]
    keys: list[str]
    skipped: int

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        valid = self.labels[self.labels >= 0]
        return int(valid.max()) + 1 if len(valid) else 0


def _label(fields: dict[str, bytes]) -> int:
    try:
        return int(fields["cls"].decode("utf-8").strip())
    except (KeyError, UnicodeDecodeError, ValueError):
        return -1


def load_shards(
    patterns: list[str],
    *,
    image_size: int | None = None,
    resize_mode: str = "center_crop",
    limit: int | None = None,
) -> InMemoryDataset:
    """Decode every sample of the shards matched by ``patterns`` into memory.

    Images are brought to ``image_size`` × ``image_size`` (``center_crop`` by default) when
    given; otherwise all images must share one size. Samples that do not decode are
    counted in ``skipped`` (the data is the user's own training or test set).
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    captions: list[str | None] = []
    keys: list[str] = []
    skipped = 0
    for spec in expand_inputs(patterns):
        try:
            with open_shard(spec) as stream:
                for sample in iter_tar_samples(stream):
                    fields = pick_image_field(sample.fields)
                    if sample.error or sample.oversized or len(fields) != 1:
                        skipped += 1
                        continue
                    try:
                        img = decode_image(
                            sample.fields[fields[0]],
                            image_size=image_size,
                            resize_mode=resize_mode if image_size else "none",
                        )
                    except DecodeError:
                        skipped += 1
                        continue
                    images.append(img.pixels)
                    labels.append(_label(sample.fields))
                    txt = sample.fields.get("txt")
                    captions.append(txt.decode("utf-8", "replace").strip() if txt is not None else None)
                    keys.append(sample.key)
                    if limit is not None and len(keys) >= limit:
                        break
        except TarReadError:
            skipped += 1
        except OSError as exc:  # not damage in the data: training on less would go unnoticed
            raise UserError(f"cannot read shard {spec}: {read_error_text(exc)}; rerun once it is reachable") from None
        if limit is not None and len(keys) >= limit:
            break
    if not images:
        raise UserError(f"no decodable images in {' '.join(patterns)}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"images have several sizes {sorted(shapes)[:3]}...; pass an image size to resize them")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return InMemoryDataset(stacked, torch.tensor(labels, dtype=torch.int64), captions, keys, skipped)
