"""What travels between pipeline stages: sample records and per-shard batches."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

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
    #: Wall-clock and CPU seconds spent on each stage to make this batch (reading, decoding,
    #: ...), by stage name (see :mod:`uge_protect.pipeline.stages`).
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (sent from a DataLoader worker to the main process): the decoded pixels of
        all records travel as one shared-memory tensor, written once, instead of one shared
        segment (and one file descriptor handed over) per image."""
        state = dict(self.__dict__)
        with_pixels = [r for r in self.records if r.pixels is not None]
        if not with_pixels:
            return state
        wall, cpu = time.perf_counter(), time.thread_time()
        buffer = torch.empty(sum(r.pixels.numel() for r in with_pixels), dtype=torch.uint8).share_memory_()
        records, layout, offset = [], [], 0
        for rec in self.records:
            if rec.pixels is None:
                records.append(rec)
                continue
            n = rec.pixels.numel()
            buffer[offset : offset + n].view(rec.pixels.shape).copy_(rec.pixels)
            layout.append((len(records), offset, tuple(rec.pixels.shape)))
            records.append(dataclasses.replace(rec, pixels=None))
            offset += n
        seconds = dict(self.stage_seconds)
        seconds["send"] = [time.perf_counter() - wall, time.thread_time() - cpu]
        state.update(records=records, _pixels=buffer, _layout=layout, stage_seconds=seconds)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        buffer, layout = state.pop("_pixels", None), state.pop("_layout", ())
        self.__dict__.update(state)
        for index, offset, shape in layout:
            n = 1
            for d in shape:
                n *= d
            self.records[index].pixels = buffer[offset : offset + n].view(shape)
