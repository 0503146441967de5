"""Reading an output directory as untrusted input.

Published outputs are downloaded and read by strangers, so nothing in one is trusted: every
JSON file, field and manifest row is validated before use, and what is malformed comes back as
a one-line reason, never as an exception. Nothing here opens anything but plain local files.
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
from typing import Any

import numpy as np
from PIL import Image

from uge_protect.pipeline.config import IMAGE_FORMATS, config_fingerprint
from uge_protect.pipeline.encode import FORMAT_EXTENSION
from uge_protect.pipeline.source import DecodeSettings
from uge_protect.shards.decode import RESIZE_MODES
from uge_protect.shards.layout import OutputLayout, read_json
from uge_protect.shards.manifest import STATUS_FAILED, STATUS_OK, read_manifest
from uge_protect.transforms.budget import budget_levels

#: JSON files of an output directory are small; larger ones are refused unread.
MAX_JSON_BYTES = 64 << 20
#: A URL scheme or ``pipe:`` at the start of a source string.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
#: A shard name as the pipeline writes it: a base name ending in .tar.
_SHARD_NAME = re.compile(r"[^/\\\x00]+\.tar")


def is_regular_file(path: Path) -> bool:
    """True for a regular file (following links); False for FIFOs, devices, bad names."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def load_json(path: Path, label: str) -> tuple[Any, str | None]:
    """The JSON content of ``path``, or None and a problem line."""
    if not is_regular_file(path):
        return None, f"{label} is not a regular file" if os.path.lexists(path) else f"{label} is missing"
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return None, f"{label} is too large to be a uge-protect file"
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
    run, error = load_json(layout.run_file, "run.json")
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
    from uge_protect.transforms.registry import method_names

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


def row_error(row: dict[str, Any]) -> str | None:
    """Why a manifest row is malformed, or None."""
    if row["status"] not in (STATUS_OK, STATUS_FAILED) or not isinstance(row["key"], str):
        return "has no valid key or status"
    if row["status"] == STATUS_OK:
        if not all(isinstance(row[c], str) for c in ("image_field", "sha256_protected", "output_shard")):
            return "is written but lacks its image field, hash or output shard"
        if row["image_format"] not in FORMAT_EXTENSION or not is_int(row["linf"]) or not 0 <= row["linf"] <= 255:
            return "is written but has no valid image format or L∞"
    return None


def load_rows(path: Path) -> tuple[list[dict[str, Any]] | None, str | None]:
    if not is_regular_file(path):
        return None, "manifest missing"
    try:
        rows = read_manifest(path).to_pylist()
    except Exception as exc:  # pyarrow raises many kinds on garbage
        return None, f"manifest cannot be read ({short_error(exc)})"
    for i, row in enumerate(rows):
        error = row_error(row)
        if error:
            return None, f"manifest row {i} {error}"
    return rows, None


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
