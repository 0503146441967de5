"""What travels between pipeline stages: sample records and per-shard batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SampleRecord:
    """One input sample on its way through the pipeline.

    ``pixels`` (HxWx3 uint8 tensor) is set when the image decoded; ``reason`` is set when
    the sample failed and must be left out of the output shard.
    """

    key: str
    index: int
    fields: dict[str, bytes] = field(default_factory=dict)
    image_field: str | None = None
    pixels: torch.Tensor | None = None
    reason: str | None = None
    caption: str | None = None
    label: int | None = None
    converted_from: str = ""
    #: What happened to an embedded ICC profile (see ``DecodedImage.icc_profile``).
    icc_profile: str | None = None
    #: Frames or pages of the source image when more than one (only the first is protected).
    source_frames: int | None = None
    exif_rotated: bool = False
    source_size: tuple[int, int] | None = None
    sha256_original: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def fail(self, reason: str) -> "SampleRecord":
        """Mark failed and release the pixels and image bytes."""
        self.reason = reason
        self.pixels = None
        return self


@dataclass
class ShardBatch:
    """Consecutive records of one shard. ``last`` marks the shard's final batch."""

    shard: str
    shard_name: str
    records: list[SampleRecord]
    last: bool
    tar_error: str | None = None
    #: On the last batch: every member the reader saw (files and skipped), and the members
    #: that are no regular file (links, directories, devices), by kind.
    input_members: int | None = None
    skipped_members: dict[str, int] = field(default_factory=dict)
