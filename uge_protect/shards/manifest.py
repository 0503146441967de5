"""Per-sample manifests: one parquet row per *input* sample, written atomically per shard."""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uge_protect.atomic import atomic_open

STATUS_OK = "ok"
STATUS_FAILED = "failed"

#: Column schema of ``manifests/*.parquet``. ``linf`` is in uint8 levels (0–255).
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),
        ("source_shard", pa.string()),
        ("output_shard", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("caption", pa.string()),
        ("label", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("converted_from", pa.string()),
        ("exif_rotated", pa.bool_()),
        ("image_field", pa.string()),
        ("image_format", pa.string()),
        ("lossy", pa.bool_()),
        ("linf", pa.int16()),
        ("psnr", pa.float64()),
        ("sha256_original", pa.string()),
        ("sha256_protected", pa.string()),
        # Added later (null in older manifests): "converted: <profile>" when the colours were
        # converted from an embedded ICC profile to sRGB, "dropped: <why>" when it was unusable.
        ("icc_profile", pa.string()),
        # Added later (null in older manifests and for still images): the frames or pages of
        # an animated GIF/PNG/WebP or multi-page TIFF; only the first is protected and written.
        ("source_frames", pa.int32()),
    ]
)

MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


def empty_row() -> dict[str, Any]:
    """A manifest row with every column set to null."""
    return dict.fromkeys(MANIFEST_COLUMNS)


def write_manifest(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write rows to a parquet file atomically (temporary name, then rename)."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_open(path) as f:
        pq.write_table(table, f, compression="zstd")


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read one manifest file."""
    return pq.read_table(path, schema=MANIFEST_SCHEMA)
