"""``uge-protect inspect``: summarise an output directory and verify it.

Verification checks that every shard matches its completion marker (size, sha256), that
manifests and shards agree (keys, order, protected-image hashes, sizes.json counts), that
every written image is within the budget, and — when the source shards are reachable — that
each written image is within the budget of its re-decoded original and every non-image
field is byte-identical to the input.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from uge_protect.pipeline.records import SampleRecord
from uge_protect.pipeline.source import DecodeSettings, decode_samples, read_samples
from uge_protect.pipeline.writer import reason_code
from uge_protect.shards.discover import is_remote
from uge_protect.shards.layout import OutputLayout, file_sha256, read_json
from uge_protect.shards.manifest import STATUS_OK, read_manifest
from uge_protect.shards.tario import TarReadError, iter_tar_samples
from uge_protect.transforms.budget import linf_levels

MAX_LISTED_PROBLEMS = 50


def inspect_output(root: str | Path, *, check_sources: bool = True) -> dict[str, Any]:
    """Summarise and verify the output directory ``root``; ``problems`` lists mismatches."""
    layout = OutputLayout(Path(root))
    problems: list[str] = []
    if not layout.run_file.is_file():
        return {"problems": [f"{root} is not a uge-protect output directory (no run.json)"]}
    run = read_json(layout.run_file)
    levels = int(run.get("budget_levels", 0))
    settings = run.get("settings", {})
    lossy = settings.get("image_format") == "jpeg" or (
        settings.get("image_format") == "webp" and settings.get("allow_lossy")
    )
    sizes = read_json(layout.sizes_file) if layout.sizes_file.is_file() else None
    if sizes is None:
        problems.append("shards/sizes.json is missing (the run did not finish)")
    failures: Counter[str] = Counter()
    linf_hist: Counter[int] = Counter()
    psnrs: list[float] = []
    counts = Counter()
    stats_files = sorted(layout.stats_dir.glob("*.json")) if layout.stats_dir.is_dir() else []
    for stats_path in stats_files:
        stats = read_json(stats_path)
        name = stats["shard"]
        if stats.get("config_fingerprint") != run.get("fingerprint"):
            problems.append(f"{name}: completed under another configuration")
            continue
        counts["shards"] += 1
        shard_problems, checked = _verify_shard(layout, stats, levels, lossy, settings, check_sources, sizes)
        problems.extend(shard_problems)
        counts["sources_checked"] += int(checked)
        table = read_manifest(layout.manifest(name)).to_pylist() if layout.manifest(name).is_file() else []
        for row in table:
            counts["samples"] += 1
            if row["status"] == STATUS_OK:
                counts["written"] += 1
                linf_hist[int(row["linf"])] += 1
                if row["psnr"] is not None and np.isfinite(row["psnr"]):
                    psnrs.append(float(row["psnr"]))
            else:
                counts["failed"] += 1
                failures[reason_code(row["reason"] or "")] += 1
    for tmp in layout.temp_files():
        problems.append(f"leftover temporary file {tmp.name} (an interrupted run; rerun to finish)")
    psnr_summary = None
    if psnrs:
        arr = np.asarray(psnrs)
        psnr_summary = {
            "min": float(arr.min()), "p5": float(np.percentile(arr, 5)),
            "median": float(np.median(arr)), "mean": float(arr.mean()), "max": float(arr.max()),
        }
    return {
        "directory": str(root),
        "method": run.get("method"),
        "settings": settings,
        "budget_levels": levels,
        "counts": dict(counts),
        "failures": dict(sorted(failures.items())),
        "linf_histogram": {str(k): v for k, v in sorted(linf_hist.items())},
        "psnr": psnr_summary,
        "sources_checked": counts.pop("sources_checked", 0),
        "problems": problems,
    }


def _verify_shard(
    layout: OutputLayout,
    stats: dict[str, Any],
    levels: int,
    lossy: bool,
    settings: dict[str, Any],
    check_sources: bool,
    sizes: dict[str, int] | None,
) -> tuple[list[str], bool]:
    """Problems of one shard, and whether its source was re-read and compared."""
    name = stats["shard"]
    shard_path, manifest_path = layout.shard(name), layout.manifest(name)
    if not shard_path.is_file() or not manifest_path.is_file():
        return [f"{name}: shard or manifest missing"], False
    problems: list[str] = []
    if file_sha256(shard_path) != stats["sha256"]:
        problems.append(f"{name}: shard bytes differ from the completion marker (sha256)")
    rows = read_manifest(manifest_path).to_pylist()
    ok_rows = [r for r in rows if r["status"] == STATUS_OK]
    if len(rows) != stats["samples"] or len(ok_rows) != stats["written"]:
        problems.append(f"{name}: manifest has {len(rows)} rows / {len(ok_rows)} written, stats say {stats['samples']} / {stats['written']}")
    if sizes is not None and sizes.get(name) != len(ok_rows):
        problems.append(f"{name}: sizes.json says {sizes.get(name)}, manifest has {len(ok_rows)} written")
    ok_keys = {r["key"] for r in ok_rows}
    originals = _source_records(stats["source"], settings, ok_keys) if check_sources else None
    with open(shard_path, "rb") as f:
        try:
            problems.extend(_verify_samples(name, iter_tar_samples(f), ok_rows, originals, levels, lossy))
        except TarReadError as exc:
            problems.append(f"{name}: the output shard is damaged ({exc})")
    if len(problems) > MAX_LISTED_PROBLEMS:
        problems = problems[:MAX_LISTED_PROBLEMS] + [f"{name}: … and more problems"]
    return problems, originals is not None


def _verify_samples(
    name: str,
    written: Iterator,
    ok_rows: list[dict[str, Any]],
    originals: Iterator[SampleRecord] | None,
    levels: int,
    lossy: bool,
) -> list[str]:
    """Compare the output samples, streamed, with the manifest rows and the sources."""
    problems: list[str] = []
    sentinel = object()
    for sample, row in zip_longest(written, ok_rows, fillvalue=sentinel):
        if sample is sentinel or row is sentinel or sample.key != row["key"]:
            problems.append(f"{name}: keys in the shard differ from the manifest's written rows")
            break
        ext = row["image_field"]
        image_ext = next((e for e in sample.fields if e.rsplit(".", 1)[-1] in ("png", "webp", "jpg")), None)
        if image_ext is None:
            problems.append(f"{name}/{row['key']}: no image in the output sample")
            continue
        data = sample.fields[image_ext]
        if hashlib.sha256(data).hexdigest() != row["sha256_protected"]:
            problems.append(f"{name}/{row['key']}: image bytes differ from the manifest hash")
        if not lossy and row["linf"] > levels:
            problems.append(f"{name}/{row['key']}: L∞ {row['linf']} exceeds the budget {levels}")
        if originals is None:
            continue
        original = next(originals, None)
        if original is None or original.key != row["key"]:
            problems.append(f"{name}/{row['key']}: not found in order in the source shard")
            originals = None
            continue
        pixels, fields = original.pixels.numpy(), original.fields
        for field_ext, field_data in fields.items():
            if field_ext != ext and sample.fields.get(field_ext) != field_data:
                problems.append(f"{name}/{row['key']}: field {field_ext!r} differs from the input")
        protected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if protected.shape != pixels.shape:
            problems.append(f"{name}/{row['key']}: size {protected.shape} differs from the source {pixels.shape}")
            continue
        measured = linf_levels(pixels, protected)
        if measured != row["linf"]:
            problems.append(f"{name}/{row['key']}: measured L∞ {measured} but manifest says {row['linf']}")
        if not lossy and measured > levels:
            problems.append(f"{name}/{row['key']}: L∞ {measured} against the source exceeds the budget {levels}")
    return problems


def _source_records(source: str, settings: dict[str, Any], keys: set[str]) -> Iterator[SampleRecord] | None:
    """Re-decode the source shard with the run's settings, streaming the records whose key is
    in ``keys`` in order (None when the source is not reachable)."""
    if not is_remote(source) and not Path(source).is_file():
        return None
    decode = DecodeSettings(
        max_pixels=settings.get("max_pixels", 64_000_000),
        image_size=settings.get("image_size"),
        resize_mode=settings.get("resize_mode", "none"),
        caption_field=settings.get("caption_field"),
        label_field=settings.get("label_field"),
        requires_caption=False,
        requires_label=False,
    )
    return (
        rec
        for rec in decode_samples(read_samples(source), decode)
        if not isinstance(rec, str) and rec.ok and rec.key in keys
    )
