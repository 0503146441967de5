"""Writing stage: one output shard per input shard, its manifest, then its stats (last).

The tar and the manifest go to temporary names and are renamed into place; the stats JSON
is written after both and is the completion marker that resume looks for.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from typing import Any

from uge_protect.atomic import AtomicFile
from uge_protect.pipeline.encode import FORMAT_EXTENSION, EncodedImage, EncodeSettings
from uge_protect.pipeline.records import SampleRecord, ShardBatch
from uge_protect.shards.layout import OutputLayout, write_json_atomic
from uge_protect.shards.manifest import STATUS_FAILED, STATUS_OK, empty_row, write_manifest
from uge_protect.shards.tario import ReproducibleTarWriter


class _HashingFile:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def reason_code(reason: str) -> str:
    """The machine-readable part of a failure reason (before the first colon)."""
    return reason.split(":", 1)[0].strip()


def output_image_field(image_field: str, image_format: str) -> str:
    """The field a protected image is written under: the input field renamed to the output
    format, keeping any prefix (``"jpg"`` → ``"png"``, ``"left.jpg"`` → ``"left.png"``)."""
    prefix = image_field.rsplit(".", 1)[0] + "." if "." in image_field else ""
    return prefix + FORMAT_EXTENSION[image_format]


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}" if ext else key


class ShardWriter:
    """Writes one output shard, collecting its manifest rows and statistics."""

    def __init__(
        self,
        layout: OutputLayout,
        source: str,
        name: str,
        encode: EncodeSettings,
        fingerprint: str,
    ):
        self.layout = layout
        self.source = source
        self.name = name
        self.encode = encode
        self.fingerprint = fingerprint
        self.path = layout.shard(name)
        self._file = AtomicFile(self.path, buffering=1 << 20)
        self._hashing = _HashingFile(self._file.file)
        self._tar = ReproducibleTarWriter(self._hashing)
        self.rows: list[dict[str, Any]] = []
        self.failures: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.linf_max = 0
        self.psnr_values: list[float] = []
        #: Tar members of written and of failed samples; the reader's totals (last batch).
        self.members = Counter({"written": 0, "failed": 0})
        self.input_members: int | None = None
        self.skipped_members: dict[str, int] = {}

    def _row(self, rec: SampleRecord) -> dict[str, Any]:
        row = empty_row()
        w, h = (rec.source_size or (None, None))
        row.update(
            key=rec.key,
            index=rec.index,
            source_shard=self.source,
            caption=rec.caption,
            label=rec.label,
            source_width=w,
            source_height=h,
            converted_from=rec.converted_from or None,
            icc_profile=rec.icc_profile,
            source_frames=rec.source_frames,
            exif_rotated=rec.exif_rotated,
            image_field=rec.image_field,
            sha256_original=rec.sha256_original,
        )
        return row

    def add(self, rec: SampleRecord, encoded: EncodedImage | None) -> None:
        """Write a protected sample (all non-image fields byte-identical) or record a failure."""
        row = self._row(rec)
        if rec.ok and encoded is not None:
            out_ext = output_image_field(rec.image_field, self.encode.image_format)
            for ext, data in rec.fields.items():
                if ext == rec.image_field:
                    self._tar.add(member_name(rec.key, out_ext), encoded.data)
                else:
                    self._tar.add(member_name(rec.key, ext), data)
            h, w = rec.pixels.shape[:2]
            finite_psnr = encoded.psnr if math.isfinite(encoded.psnr) else None
            row.update(
                output_shard=self.name,
                status=STATUS_OK,
                width=w,
                height=h,
                image_format=self.encode.image_format,
                lossy=self.encode.lossy,
                linf=encoded.linf,
                psnr=encoded.psnr,
                sha256_protected=encoded.sha256,
            )
            self.linf_max = max(self.linf_max, encoded.linf)
            self.members["written"] += len(rec.fields)
            if finite_psnr is not None:
                self.psnr_values.append(finite_psnr)
        else:
            reason = rec.reason or "not_protected"
            row.update(status=STATUS_FAILED, reason=reason)
            self.failures[reason_code(reason)] += 1
            self.members["failed"] += len(rec.fields)
        self.rows.append(row)

    def add_batch(self, batch: ShardBatch, encoded: list[EncodedImage | None]) -> None:
        for rec, enc in zip(batch.records, encoded):
            self.add(rec, enc)
        if batch.last:
            self.input_members, self.skipped_members = batch.input_members, dict(batch.skipped_members)

    def finish(self, tar_error: str | None) -> dict[str, Any]:
        """Close and publish the shard, its manifest and (last) its stats; returns the stats."""
        try:
            self._tar.close()
            self._file.commit()
        except BaseException:
            self.abort()
            raise
        write_manifest(self.layout.manifest(self.name), self.rows)
        written = sum(1 for r in self.rows if r["status"] == STATUS_OK)
        psnrs = self.psnr_values
        stats = {
            "shard": self.name,
            "source": self.source,
            "config_fingerprint": self.fingerprint,
            "samples": len(self.rows),
            "written": written,
            "failed": len(self.rows) - written,
            "failures": dict(sorted(self.failures.items())),
            "tar_error": tar_error,
            "linf_max": self.linf_max,
            "psnr_mean": sum(psnrs) / len(psnrs) if psnrs else None,
            "psnr_min": min(psnrs) if psnrs else None,
            "bytes": self._hashing.size,
            "sha256": self._hashing.sha256.hexdigest(),
            "seconds": round(time.perf_counter() - self.started, 3),
            **self._member_stats(),
        }
        write_json_atomic(self.layout.stats(self.name), stats)
        return stats

    def _member_stats(self) -> dict[str, Any]:
        """Member accounting: input = written + failed + skipped (members of written samples,
        of failed samples, and non-file members such as symlinks that belong to no sample)."""
        skipped = sum(self.skipped_members.values())
        return {
            "skipped_members": dict(sorted(self.skipped_members.items())),
            "members": {
                "input": self.input_members,
                "written": self.members["written"],
                "failed": self.members["failed"],
                "skipped": skipped,
            },
        }

    def abort(self) -> None:
        """Drop the partial shard (used when the run fails)."""
        try:
            self._tar.abort()
        finally:
            self._file.abort()
