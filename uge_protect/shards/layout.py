"""The output directory layout and the small JSON files in it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uge_protect.atomic import atomic_open, temp_owner


class _Below:
    """An :class:`OutputLayout` attribute: the path ``parts`` below its root."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, layout: OutputLayout, owner: type | None = None) -> Path:
        return layout.root.joinpath(*self.parts)


@dataclass(frozen=True)
class OutputLayout:
    """Paths of everything ``uge-protect shard`` writes under ``root``."""

    root: Path

    shards_dir = _Below("shards")
    manifests_dir = _Below("manifests")
    stats_dir = _Below("stats")
    #: The configuration of the run that owns this directory (written first).
    run_file = _Below("run.json")
    protection_file = _Below("protection.json")
    sizes_file = _Below("shards", "sizes.json")
    lock_file = _Below(".lock")

    def shard(self, name: str) -> Path:
        return self.shards_dir / name

    def manifest(self, name: str) -> Path:
        return self.manifests_dir / f"{_stem(name)}.parquet"

    def stats(self, name: str) -> Path:
        """Per-shard stats JSON: written last, it marks the shard complete."""
        return self.stats_dir / f"{_stem(name)}.json"

    def make_dirs(self) -> None:
        for d in (self.shards_dir, self.manifests_dir, self.stats_dir):
            d.mkdir(parents=True, exist_ok=True)

    def temp_files(self, pid: int | None = None) -> list[Path]:
        """Leftover temporary files of interrupted writes (only those of ``pid`` if given)."""
        out: list[Path] = []
        for d in (self.root, self.shards_dir, self.manifests_dir, self.stats_dir):
            if d.is_dir():
                out.extend(p for p in d.iterdir() if temp_owner(p.name) is not None)
        if pid is not None:
            out = [p for p in out if temp_owner(p.name) == pid]
        return out


def _stem(name: str) -> str:
    return name[:-4] if name.endswith(".tar") else name


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    with atomic_open(path, text=True) as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True)
        f.write("\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed (shards are hashed like this in their stats)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def outside_link(root: Path, path: Path) -> bool:
    """True when ``path`` resolves (through a symlink, of the file or of a folder above it)
    to a place outside ``root``.

    One exception: when ``root`` is a snapshot of the Hugging Face cache
    (``…/snapshots/<revision>``), its files are symlinks into the repository's ``blobs/``
    folder, and targets there count as inside."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real == real_root or real_root in real.parents:
        return False
    blobs = real_root.parent.parent / "blobs"
    return not (real_root.parent.name == "snapshots" and blobs in real.parents)
