"""Reading stages, run in DataLoader workers: read → decode → batch.

Each stage is a plain generator function; :class:`ShardSource` composes them and splits
the rank's shards across DataLoader workers (whole shards per worker, so order within a
shard is kept).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from uge_protect.shards.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from uge_protect.shards.members import member_kinds, opaque_fields, pick_image_field
from uge_protect.shards.discover import is_remote, open_shard, read_error_text, shard_name
from uge_protect.shards.tario import (
    DEFAULT_MAX_SAMPLE_BYTES,
    MemberCounts,
    RawSample,
    TarReadError,
    iter_tar_samples,
)
from uge_protect.pipeline.lifecycle import InterruptibleStream, blocking_read
from uge_protect.pipeline.records import SampleRecord, ShardBatch
from uge_protect.pipeline.stages import StageClock


@dataclass
class DecodeSettings:
    """What the decode stage needs to know (picklable, sent to workers)."""

    max_pixels: int
    image_size: int | None
    resize_mode: str
    caption_field: str | None
    label_field: str | None
    requires_caption: bool
    requires_label: bool
    #: Most decoded pixels in one batch (a single larger image still makes a batch of one).
    max_batch_pixels: int = DEFAULT_MAX_PIXELS
    #: Most bytes of one sample's members (larger samples fail unread); also the most member
    #: bytes in one batch.
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES


def read_samples(
    spec: str, counts: MemberCounts | None = None, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
) -> Iterator[RawSample | str]:
    """Yield raw samples of one shard; on a corrupt or truncated tar (``corrupt_tar: ...``) or
    a read failure (``unreadable_shard: ...``), yield the error text last. ``counts``, when
    given, receives the members read (see :func:`iter_tar_samples`)."""
    try:
        with _open_input(spec) as stream:
            yield from iter_tar_samples(stream, counts, max_sample_bytes)
    except TarReadError as exc:
        if is_remote(spec):
            # Damage in a download (an HTML error page, a body cut short without a length)
            # looks like damage in the data but may be gone on the next try: retry it.
            yield f"unreadable_shard: the download is not a whole tar ({exc})"
        else:
            yield f"corrupt_tar: {exc}"
    except OSError as exc:  # not damage in the data: the shard is retried on a rerun
        yield f"unreadable_shard: {read_error_text(exc)}"


def _open_input(spec: str) -> InterruptibleStream:
    """Open a shard so that a stop request may end a read that blocks (a FIFO, a stalled
    download) at once; opening a local path (a FIFO's open blocks too) may be ended as well."""
    if is_remote(spec):  # may start a pipe: or download command (a fork): not a point to stop at
        return InterruptibleStream(open_shard(spec))
    with blocking_read():
        return InterruptibleStream(open_shard(spec))


#: Labels are stored as int64 in the manifest.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _has_surrogates(text: str) -> bool:
    """True for strings that cannot be encoded as UTF-8 (undecodable bytes in tar names,
    lone ``\\udXXX`` escapes in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


#: C0 controls, DEL and C1 controls: never part of a member name we write.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_unsafe_key(key: str) -> bool:
    """Keys that could escape the output directory or are not valid member names: absolute
    paths, ``..`` components, backslashes, an empty base name (a hidden file such as
    ``dir/.png``), control characters (C0, DEL, C1: newlines, terminal escapes), and names
    that are not valid UTF-8 (the manifest could not record them).

    ``.`` components are harmless and common (``tar -cf shard.tar .`` writes ``./000001.jpg``).
    """
    if not key or "\\" in key or key.startswith("/") or posixpath.isabs(key):
        return True
    if _has_surrogates(key) or _CONTROL_CHARS.search(key):
        return True
    parts = key.split("/")
    return ".." in parts or parts[-1] in ("", ".")


def printable_key(key: str) -> str:
    """``key`` as valid UTF-8 without control characters (safe to print): undecodable bytes
    and control characters become ``\\xNN`` escapes."""
    if _has_surrogates(key):
        key = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", key)


def _clean_text(text: str) -> str:
    """Replace each lone surrogate (from JSON ``\\udXXX`` escapes) with U+FFFD so the
    manifest can store the text."""
    if _has_surrogates(text):
        text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None


def _caption_and_label(raw: RawSample, s: DecodeSettings) -> tuple[str | None, int | None]:
    meta = None
    if "json" in raw.fields and (s.caption_field or s.label_field or "cls" not in raw.fields):
        try:
            meta = json.loads(raw.fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = None
    caption = None
    if s.caption_field:
        value = meta.get(s.caption_field) if isinstance(meta, dict) else None
        caption = _clean_text(value).strip() if isinstance(value, str) else None
    else:
        caption = _text(raw.fields.get("txt"))
    label = None
    label_text = None
    if s.label_field:
        value = meta.get(s.label_field) if isinstance(meta, dict) else None
        label_text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    else:
        label_text = _text(raw.fields.get("cls"))
    if label_text is not None:
        try:
            label = int(label_text)
        except ValueError:
            label = None
        if label is not None and not _INT64_MIN <= label <= _INT64_MAX:
            label = None  # out of the manifest's int64 range: treat as no label
    return caption or None, label


def decode_samples(
    raws: Iterable[RawSample | str], s: DecodeSettings, clock: StageClock | None = None
) -> Iterator[SampleRecord | str]:
    """Turn raw samples into records: validate keys, find and decode the image, read text.

    Once decoded, a record's image member is kept as its pixels only (its bytes are emptied:
    they are never written), and a failed record keeps its member names only. ``clock``, when
    given, counts the ``decode`` and ``hash`` stages."""
    clock = clock or StageClock()
    seen: set[str] = set()
    previous_cut = False  # the previous sample was cut short by the tar error
    for index, raw in enumerate(raws):
        if isinstance(raw, str):  # tar error text from read_samples
            if not previous_cut:
                # The error fell between samples: record it so nothing vanishes silently.
                yield SampleRecord(key="", index=index, reason=raw)
            yield raw
            return
        previous_cut = raw.error is not None
        # A key that is not valid UTF-8 is recorded with escapes (and fails as unsafe_key).
        rec = SampleRecord(key=printable_key(raw.key), index=index, fields=raw.fields)
        duplicate = raw.key in seen
        seen.add(raw.key)
        rec.caption, rec.label = _caption_and_label(raw, s)
        kinds = member_kinds(raw.fields)
        images = pick_image_field(raw.fields, kinds)
        if raw.error:
            rec.fail(raw.error)
        elif raw.oversized:
            rec.fail(
                f"sample_too_large: {', '.join(raw.oversized)} would take the sample past"
                f" {s.max_sample_bytes} bytes (--max-sample-bytes)"
            )
        elif is_unsafe_key(raw.key):
            rec.fail("unsafe_key")
        elif duplicate:
            rec.fail("duplicate_key")
        elif not images:
            rec.fail("no_image")
        elif len(images) > 1:
            rec.fail("multiple_images")
        elif opaque := opaque_fields(raw.fields, kinds):
            rec.fail(
                f"unprotectable_member: {', '.join(opaque)} (arrays, tensors, pickles, videos and"
                " large compressed members can carry the picture unprotected; remove them)"
            )
        if images and not raw.oversized:
            rec.image_field = images[0]
            with clock.timed("hash"):
                rec.sha256_original = hashlib.sha256(raw.fields[images[0]]).hexdigest()
        if rec.ok and s.requires_caption and rec.caption is None:
            rec.fail("missing_caption")
        if rec.ok and s.requires_label and rec.label is None:
            rec.fail("missing_label")
        if rec.ok:
            try:
                with clock.timed("decode"):
                    img = decode_image(
                        raw.fields[rec.image_field],
                        max_pixels=s.max_pixels,
                        image_size=s.image_size,
                        resize_mode=s.resize_mode,
                    )
            except DecodeError as exc:
                rec.fail(f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason)
            else:
                rec.pixels = torch.from_numpy(img.pixels)
                rec.converted_from = img.converted_from
                rec.exif_rotated = img.exif_rotated
                rec.source_size = img.source_size
                rec.icc_profile = img.icc_profile
                rec.source_frames = img.frames
        if rec.ok:
            rec.fields[rec.image_field] = b""  # its pixels stand for it from here on
        else:
            rec.fields = dict.fromkeys(rec.fields, b"")  # never written: only the names count
        yield rec


def batch_records(
    records: Iterable[SampleRecord | str],
    spec: str,
    batch_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    counts: MemberCounts | None = None,
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    clock: StageClock | None = None,
) -> Iterator[ShardBatch]:
    """Group records into batches of at most ``batch_size`` records, ``max_pixels`` decoded
    pixels and ``max_bytes`` member bytes (a record larger than that is a batch of its own);
    the final batch has
    ``last=True`` and carries the reader's member ``counts`` (complete once the records are
    exhausted). Batch boundaries never change output bytes. Each batch carries the seconds
    ``clock`` counted while it was made (``stage_seconds``)."""
    clock = clock or StageClock()
    name = shard_name(spec)
    pending: list[SampleRecord] = []
    pixels = held = 0
    tar_error = None
    for rec in records:
        if isinstance(rec, str):
            tar_error = rec
            break
        size, nbytes = _pixel_count(rec), sum(map(len, rec.fields.values()))
        if pending and (pixels + size > max_pixels or held + nbytes > max_bytes):
            yield ShardBatch(spec, name, pending, last=False, stage_seconds=clock.take())
            pending, pixels, held = [], 0, 0
        pending.append(rec)
        pixels += size
        held += nbytes
        if len(pending) == batch_size:
            yield ShardBatch(spec, name, pending, last=False, stage_seconds=clock.take())
            pending, pixels, held = [], 0, 0
    last = ShardBatch(spec, name, pending, last=True, tar_error=tar_error, stage_seconds=clock.take())
    if counts is not None:
        last.input_members, last.skipped_members = counts.total, dict(counts.skipped)
    yield last


def _pixel_count(rec: SampleRecord) -> int:
    return 0 if rec.pixels is None else rec.pixels.shape[0] * rec.pixels.shape[1]


def shard_batches(spec: str, s: DecodeSettings, batch_size: int) -> Iterator[ShardBatch]:
    """The composed reading stages for one shard, each batch with its stages' seconds."""
    counts, clock = MemberCounts(), StageClock()
    raws = clock.timed_iter(read_samples(spec, counts, s.max_sample_bytes), "read")
    return batch_records(
        decode_samples(raws, s, clock), spec, batch_size, s.max_batch_pixels, counts, s.max_sample_bytes, clock,
    )


class ShardSource(IterableDataset):
    """Batches from a list of shards; each DataLoader worker takes whole shards.

    Each batch holds at most ``settings.max_batch_pixels`` decoded pixels (or one larger
    image), so the decoded images alive at once are bounded by about that budget times the
    batches in flight: ``prefetch_factor`` (2) per worker, the one being protected and those
    waiting to be encoded.
    """

    def __init__(self, shards: list[str], settings: DecodeSettings, batch_size: int):
        super().__init__()
        self.shards = shards
        self.settings = settings
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ShardBatch]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for spec in mine:
            yield from shard_batches(spec, self.settings, self.batch_size)
