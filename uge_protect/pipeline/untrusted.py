"""Reading an output directory as untrusted input.

Published outputs are downloaded and read by strangers, so nothing in one is trusted: every
JSON file, field and manifest row is validated before use, and what is malformed comes back as
a one-line reason, never as an exception. Nothing here opens anything but plain local files,
and each file's size (and a manifest's metadata) is checked before it is parsed, so a small
file cannot expand into unbounded memory.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from uge_protect.pipeline.config import IMAGE_FORMATS, config_fingerprint
from uge_protect.pipeline.encode import FORMAT_EXTENSION
from uge_protect.pipeline.source import DecodeSettings
from uge_protect.shards.decode import RESIZE_MODES
from uge_protect.shards.layout import OutputLayout, outside_link, read_json
from uge_protect.shards.manifest import MANIFEST_SCHEMA, STATUS_FAILED, STATUS_OK
from uge_protect.methods.budget import budget_levels

#: JSON files of an output directory are small; larger ones are refused unread. ``sizes.json``
#: and ``protection.json`` grow with the number of shards; a stats file is a few hundred bytes
#: and ``run.json`` a few KB (more with a long class-name list).
MAX_JSON_BYTES = 64 << 20
MAX_STATS_BYTES = 1 << 20
MAX_RUN_BYTES = 4 << 20
#: Manifests: one row per input sample of one shard (shards hold thousands). Larger files, more
#: rows, or columns that decode to more bytes are refused before or while they are read.
MAX_MANIFEST_BYTES = 1 << 30
MAX_MANIFEST_ROWS = 1_000_000
MAX_MANIFEST_DECODED_BYTES = 512 << 20
#: A manifest's footer (its metadata) is a few KB; thrift limits bound what parsing it allocates.
_MAX_FOOTER_BYTES = 16 << 20
_THRIFT_LIMITS = {"thrift_string_size_limit": 1 << 20, "thrift_container_size_limit": 1 << 16}
#: The manifest columns inspect uses (a caption or other column is never read).
INSPECT_COLUMNS = (
    "key", "status", "reason", "output_shard", "image_field", "image_format", "lossy", "linf", "psnr",
    "sha256_original", "sha256_protected",
)
#: A URL scheme or ``pipe:`` at the start of a source string.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: A shard name as the pipeline writes it: a base name ending in .tar, without control
#: characters (C0, DEL, C1: newlines, terminal escapes) or undecodable bytes.
_SHARD_NAME = re.compile(r"[^/\\\x00-\x1f\x7f-\x9f\ud800-\udfff]+\.tar")


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following links); False for FIFOs, devices, bad names."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def outside_problem(label: str, path: Path) -> str:
    """The problem line for a path of the directory that links outside it."""
    if os.path.islink(path):
        return f"{label} is a symlink to a path outside the directory; it is not read"
    return f"{label} lies in a folder that is a symlink to a path outside the directory; it is not read"


def load_json(path: Path, label: str, limit: int = MAX_JSON_BYTES) -> tuple[Any, str | None]:
    """The JSON content of ``path``, or None and a problem line; files over ``limit`` bytes
    are refused unread."""
    if not is_regular_file(path):
        return None, f"{label} is not a regular file" if os.path.lexists(path) else f"{label} is missing"
    try:
        size = path.stat().st_size
        if size > limit:
            return None, f"{label} is {size:,} bytes, too large to be a uge-protect file (at most {limit:,})"
        return read_json(path), None
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"{label} is not valid JSON ({short_error(exc)})"


def short_error(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def is_int(value: Any) -> bool:
    """An integer and not a bool (JSON ``true`` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """A non-negative integer."""
    return is_int(value) and value >= 0


def is_count_map(value: Any) -> bool:
    """A JSON object of {name: non-negative integer}."""
    return isinstance(value, dict) and all(isinstance(k, str) and is_count(v) for k, v in value.items())


def local_path(source: Any) -> Path | None:
    """``source`` as a local path when it is one: absolute, no scheme, no ``pipe:``."""
    if not isinstance(source, str) or not source or "\x00" in source or _SCHEME.match(source):
        return None
    path = Path(source)
    return path if path.is_absolute() else None


@dataclass
class RunInfo:
    """What inspect takes from a validated ``run.json``."""

    fingerprint: str
    method: dict[str, Any]
    settings: dict[str, Any]
    levels: int
    lossy: bool
    promises_noise: bool
    #: Problems with the run file itself (verification goes on without trusting it).
    problems: list[str]
    #: The settings decode the sources as the run did (None when they are malformed).
    decode: DecodeSettings | None


def load_run(layout: OutputLayout) -> tuple[RunInfo | None, str]:
    """``run.json`` validated, or None and why it cannot be used at all."""
    if outside_link(layout.root, layout.run_file):
        return None, outside_problem("run.json", layout.run_file)
    run, error = load_json(layout.run_file, "run.json", MAX_RUN_BYTES)
    if error:
        return None, error
    if not isinstance(run, dict):
        return None, "run.json is not a JSON object"
    fingerprint, method, settings, levels = (run.get(k) for k in ("fingerprint", "method", "settings", "budget_levels"))
    if not isinstance(fingerprint, str) or not isinstance(method, dict) or not isinstance(settings, dict):
        return None, "run.json lacks its fingerprint, method or settings"
    if not is_count(levels) or not isinstance(method.get("method"), str):
        return None, "run.json lacks the method name or an integer budget_levels"
    problems = []
    # The fingerprint covers the settings, the method's parameters and the artifact, as
    # pipeline.run.build_run_config computes it: an edited run.json no longer matches.
    method_config = {k: v for k, v in method.items() if k != "artifact_fingerprint"}
    signed = {**settings, "method": method_config, "artifact": method.get("artifact_fingerprint")}
    if config_fingerprint(signed) != fingerprint:
        problems.append("run.json was edited: its fingerprint does not match its settings and method")
    epsilon = method.get("epsilon")
    if not (is_int(epsilon) or (isinstance(epsilon, float) and math.isfinite(epsilon))):
        problems.append(f"run.json: the method's epsilon {epsilon!r} is not a number")
    elif budget_levels(epsilon) != levels:
        problems.append(f"run.json: budget_levels {levels} does not match epsilon {epsilon}")
    image_format = settings.get("image_format")
    lossy = image_format == "jpeg" or (image_format == "webp" and settings.get("allow_lossy") is True)
    decode = decode_settings(settings)
    if image_format not in IMAGE_FORMATS or decode is None:
        problems.append("run.json: malformed settings (image format, sizes or fields); sources are not compared")
        decode = None
    promises = levels >= 1 and method["method"] not in hidden_methods()
    return RunInfo(fingerprint, method, settings, levels, lossy, promises, problems, decode), ""


def hidden_methods() -> set[str]:
    """Registered methods that are never offered to users (benchmark controls that write
    images unchanged): the only ones for which L∞ 0 is no problem."""
    from uge_protect.methods.registry import method_names

    return set(method_names(include_hidden=True)) - set(method_names())


def decode_settings(s: dict[str, Any]) -> DecodeSettings | None:
    """The run's decode settings, or None when any is malformed."""
    max_pixels, size = s.get("max_pixels", 64_000_000), s.get("image_size")
    mode, caption, label = s.get("resize_mode", "none"), s.get("caption_field"), s.get("label_field")
    if not (is_int(max_pixels) and max_pixels > 0) or not (size is None or (is_int(size) and size > 0)):
        return None
    if mode not in RESIZE_MODES or (mode != "none" and size is None):
        return None
    if not all(f is None or isinstance(f, str) for f in (caption, label)):
        return None
    return DecodeSettings(max_pixels, size, mode, caption, label, requires_caption=False, requires_label=False)


def stats_error(stats: Any) -> str | None:
    """Why a stats file cannot be used, or None."""
    if not isinstance(stats, dict):
        return "is not a JSON object"
    if not isinstance(stats.get("shard"), str) or not _SHARD_NAME.fullmatch(stats["shard"]):
        return "has no valid field 'shard' (a .tar base name)"
    for key in ("samples", "written", "failed", "bytes"):
        if not is_count(stats.get(key)):
            return f"has no valid field {key!r} (a non-negative integer)"
    for key in ("sha256", "source"):
        if not isinstance(stats.get(key), str):
            return f"has no valid field {key!r} (a string)"
    if not (stats.get("tar_error") is None or isinstance(stats["tar_error"], str)):
        return "has an invalid field 'tar_error'"
    if not is_count_map(stats.get("failures")):
        return "has no valid field 'failures' ({reason: count})"
    if not is_count_map(stats.get("skipped_members", {})):
        return "has an invalid field 'skipped_members' ({kind: count})"
    members = stats.get("members")
    if members is not None and not (
        isinstance(members, dict) and all(is_count(members.get(k)) for k in ("written", "failed", "skipped"))
        and (members.get("input") is None or is_count(members["input"]))
    ):
        return "has an invalid field 'members'"
    return None


def row_error(row: Mapping[str, Any]) -> str | None:
    """Why a manifest row is malformed, or None."""
    if row["status"] not in (STATUS_OK, STATUS_FAILED) or not isinstance(row["key"], str):
        return "has no valid key or status"
    if row["status"] == STATUS_OK:
        if not all(isinstance(row[c], str) for c in ("image_field", "sha256_protected", "output_shard")):
            return "is written but lacks its image field, hash or output shard"
        if row["image_format"] not in FORMAT_EXTENSION or not is_int(row["linf"]) or not 0 <= row["linf"] <= 255:
            return "is written but has no valid image format or L∞"
    return None


def load_rows(path: Path, expected: int | None = None) -> tuple[list[ManifestRow] | None, str | None]:
    """The manifest's rows (the :data:`INSPECT_COLUMNS` only), or None and a problem line.

    The metadata is checked before any row is read: the row count must equal ``expected`` (the
    stats file's ``samples``) when given, and stay within :data:`MAX_MANIFEST_ROWS`; the columns
    must be there. Rows are then streamed in batches whose decoded size is counted before they
    become Python objects, so a small file that expands (dictionary and run-length encoding,
    compression) is refused, not read."""
    if not is_regular_file(path):
        return None, "manifest missing"
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            return None, f"manifest is {size:,} bytes, more than a manifest holds (at most {MAX_MANIFEST_BYTES:,})"
        if _footer_size(path) > _MAX_FOOTER_BYTES:
            return None, "manifest cannot be read (its metadata is too large)"
        with pq.ParquetFile(path, pre_buffer=False, **_THRIFT_LIMITS) as probe:
            names = set(probe.schema_arrow.names)
        # text columns stay dictionary-encoded until their decoded size is known
        text = [c for c in INSPECT_COLUMNS if c in names and pa.types.is_string(MANIFEST_SCHEMA.field(c).type)]
        with pq.ParquetFile(path, read_dictionary=text, pre_buffer=False, buffer_size=1 << 20, **_THRIFT_LIMITS) as pf:
            error = _metadata_error(pf, names, expected)
            if error:
                return None, error
            rows = _stream_rows(pf, pf.metadata.num_rows)
    except _ManifestTooLarge as exc:
        return None, str(exc)
    except Exception as exc:  # pyarrow raises many kinds on garbage
        return None, f"manifest cannot be read ({short_error(exc)})"
    for i, row in enumerate(rows):
        error = row_error(row)
        if error:
            return None, f"manifest row {i} {error}"
    return rows, None


class _ManifestTooLarge(Exception):
    """A manifest whose rows decode to more than it may."""


def _footer_size(path: Path) -> int:
    """The length a parquet file's last 8 bytes give its footer (0 when they are no footer)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 12:
            return 0
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
    return int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0


def _metadata_error(pf: pq.ParquetFile, names: set[str], expected: int | None) -> str | None:
    """Why the manifest is not read, from its metadata alone, or None."""
    missing = [c for c in INSPECT_COLUMNS if c not in names]
    if missing:
        return f"manifest lacks the columns {', '.join(missing)}"
    meta = pf.metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    rows = meta.num_rows
    if rows != sum(g.num_rows for g in groups):
        return "manifest cannot be read (its row groups do not add up to its row count)"
    if expected is not None and rows != expected:
        return f"manifest has {rows:,} rows, the stats say {expected:,} samples; it is not read"
    if rows > MAX_MANIFEST_ROWS:
        return f"manifest has {rows:,} rows, more than inspect reads (at most {MAX_MANIFEST_ROWS:,})"
    wanted = set(INSPECT_COLUMNS)
    declared = sum(
        chunk.total_uncompressed_size for g in groups for j in range(g.num_columns)
        if (chunk := g.column(j)).path_in_schema in wanted
    )
    if declared > MAX_MANIFEST_DECODED_BYTES:
        return f"manifest columns hold {declared:,} bytes, more than inspect reads (at most {MAX_MANIFEST_DECODED_BYTES:,})"
    return None


class ManifestRow(tuple):
    """One manifest row's :data:`INSPECT_COLUMNS`, read as ``row["key"]``: a tuple, a fraction
    of a dict's memory (a manifest may hold a million rows)."""

    __slots__ = ()

    def __getitem__(self, column: str) -> Any:  # type: ignore[override]
        return tuple.__getitem__(self, _COLUMN_INDEX[column])


_COLUMN_INDEX = {c: i for i, c in enumerate(INSPECT_COLUMNS)}


def _stream_rows(pf: pq.ParquetFile, declared_rows: int) -> list[ManifestRow]:
    """The rows, batch by batch; raises :class:`_ManifestTooLarge` once the rows read exceed
    the declared count or their decoded size exceeds :data:`MAX_MANIFEST_DECODED_BYTES`."""
    rows: list[ManifestRow] = []
    decoded = 0
    for batch in pf.iter_batches(batch_size=1 << 16, columns=list(INSPECT_COLUMNS), use_threads=False):
        columns = [batch.column(c) for c in INSPECT_COLUMNS]
        decoded += sum(_decoded_bytes(a) for a in columns)
        if decoded > MAX_MANIFEST_DECODED_BYTES:
            raise _ManifestTooLarge(f"manifest rows decode to more than {MAX_MANIFEST_DECODED_BYTES:,} bytes; it is not read")
        if len(rows) + batch.num_rows > declared_rows:
            raise _ManifestTooLarge("manifest holds more rows than its metadata declares; it is not read")
        values = [_column_values(a, MANIFEST_SCHEMA.field(c).type) for a, c in zip(columns, INSPECT_COLUMNS)]
        rows.extend(map(ManifestRow, zip(*values)))
    return rows


def _decoded_bytes(arr: pa.Array) -> int:
    """Bytes ``arr`` takes once each value is its own object (dictionary values repeated)."""
    if pa.types.is_dictionary(arr.type):
        lengths = pc.binary_length(arr.dictionary).take(arr.indices)
        return int(pc.sum(lengths).as_py() or 0) + 8 * len(arr)
    return arr.nbytes


def _column_values(arr: pa.Array, target: pa.DataType) -> list[Any]:
    """Python values of a column as the manifest schema's ``target`` type; text must be text.
    A dictionary-encoded column with few distinct values shares one object per value."""
    if pa.types.is_dictionary(arr.type):
        if not pa.types.is_string(arr.type.value_type):
            raise TypeError(f"a text column holds {arr.type.value_type}")
        if len(arr.dictionary) * 4 < len(arr):
            values = arr.dictionary.to_pylist()
            return [None if i is None else values[i] for i in arr.indices.to_pylist()]
        arr = arr.dictionary_decode()
    if pa.types.is_string(target) and not (pa.types.is_string(arr.type) or arr.null_count == len(arr)):
        raise TypeError(f"a text column holds {arr.type}")
    return arr.cast(target).to_pylist()


# --- images ---------------------------------------------------------------------------------


#: The formats ``shard`` writes: nothing else is ever decoded from an output directory (no
#: plugin that could run an external program, such as EPS, is reached).
_WRITTEN_FORMATS = ("PNG", "WEBP", "JPEG")


def image_format_of(data: bytes) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data), formats=_WRITTEN_FORMATS) as img:
                return img.format
        except Exception:
            return None


def decode_rgb(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """Decode a written image whose header says ``size`` (w, h); None otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data), formats=_WRITTEN_FORMATS) as img:
                if img.size != size:
                    return None
                return np.asarray(img.convert("RGB"))
        except Exception:
            return None
