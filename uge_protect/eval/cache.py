"""Reuse finished training runs: an evaluation's results keyed by everything that determines them.

Comparing several protections against the same clean data trains the same clean models again
and again; an interrupted evaluation loses its finished runs. With ``--cache DIR`` each run's
result is stored under a key made from the training data's bytes (images, labels, captions),
the test data's bytes, the defense, the training settings and seed, the device type and the
package version, and a later run with the same key is read back instead of retrained.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from uge_protect.shards.dataset import InMemoryDataset
from uge_protect.shards.layout import read_json, write_json_atomic


def dataset_digest(ds: InMemoryDataset) -> str:
    """sha256 of a dataset's pixels, shape, labels and captions, in order (keys are not part of it)."""
    h = hashlib.sha256()
    h.update(repr(tuple(ds.images.shape)).encode())
    h.update(ds.images.contiguous().numpy().tobytes())
    h.update(ds.labels.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps(ds.captions, ensure_ascii=False).encode())
    return h.hexdigest()


def run_key(**parts: Any) -> str:
    """A stable key (sha256 hex) of JSON-serialisable ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class RunCache:
    """A directory of ``<key>.json`` results; ``None`` directory: a cache that keeps nothing."""

    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        if self.dir is None:
            return None
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError):
            return None  # a damaged entry is retrained and overwritten
        return data if isinstance(data, dict) and data.get("key") == key else None

    def put(self, key: str, result: dict[str, Any]) -> None:
        if self.dir is not None:
            write_json_atomic(self.dir / f"{key}.json", {**result, "key": key})
