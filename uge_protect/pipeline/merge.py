"""Merging per-shard stats into ``sizes.json`` and ``protection.json`` (main process)."""

from __future__ import annotations

import platform
from collections import Counter
from importlib import metadata
from typing import Any

from uge_protect import __version__
from uge_protect.shards.layout import OutputLayout, read_json, write_json_atomic

_VERSIONED = ("torch", "torchvision", "webdataset", "accelerate", "pillow", "numpy", "pyarrow")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the output bytes."""
    out = {"uge-protect": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def collect_stats(layout: OutputLayout, fingerprint: str) -> list[dict[str, Any]]:
    """All completion markers in the directory that belong to this configuration."""
    stats = []
    if layout.stats_dir.is_dir():
        for path in sorted(layout.stats_dir.glob("*.json")):
            data = read_json(path)
            if data.get("config_fingerprint") == fingerprint:
                stats.append(data)
    return stats


def member_totals(stats: list[dict[str, Any]]) -> dict[str, int] | None:
    """Summed member accounting of the shards (input = written + failed + skipped); None when
    a shard does not record it (written by an older version)."""
    parts = [s.get("members") for s in stats]
    if not all(isinstance(p, dict) and p.get("input") is not None for p in parts):
        return None
    return {k: sum(p[k] for p in parts) for k in ("input", "written", "failed", "skipped")}


def merge_outputs(
    layout: OutputLayout,
    run_config: dict[str, Any],
    *,
    input_names: list[str],
    timings: dict[str, Any],
    unreadable: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``shards/sizes.json`` and ``protection.json``; return the protection summary.

    ``unreadable`` maps the shards this run could not read to the error (they have no
    output; they are also among ``missing_shards``)."""
    stats = collect_stats(layout, run_config["fingerprint"])
    by_name = {s["shard"]: s for s in stats}
    sizes = {name: s["written"] for name, s in sorted(by_name.items())}
    write_json_atomic(layout.sizes_file, sizes)
    failures: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for s in stats:
        failures.update(s["failures"])
        skipped.update(s.get("skipped_members", {}))
    psnr_means = [(s["psnr_mean"], s["written"]) for s in stats if s.get("psnr_mean") is not None]
    weight = sum(w for _, w in psnr_means)
    missing = sorted(set(input_names) - set(by_name))
    summary = {
        "method": run_config["method"],
        "settings": run_config["settings"],
        "config_fingerprint": run_config["fingerprint"],
        "versions": package_versions(),
        "counts": {
            "shards": len(stats),
            "shards_missing": len(missing),
            "samples": sum(s["samples"] for s in stats),
            "written": sum(s["written"] for s in stats),
            "failed": sum(s["failed"] for s in stats),
            "skipped_members": sum(skipped.values()),
        },
        "failures": dict(sorted(failures.items())),
        "skipped_members": dict(sorted(skipped.items())),
        "members": member_totals(stats),
        "shards_with_tar_errors": sorted(s["shard"] for s in stats if s.get("tar_error")),
        "missing_shards": missing,
        "unreadable_shards": dict(sorted((unreadable or {}).items())),
        "budget": {
            "epsilon": run_config["method"].get("epsilon"),
            "levels": run_config["budget_levels"],
            "linf_max": max((s["linf_max"] for s in stats), default=0),
            "psnr_mean": sum(p * w for p, w in psnr_means) / weight if weight else None,
        },
        "timings": timings,
    }
    write_json_atomic(layout.protection_file, summary)
    return summary
