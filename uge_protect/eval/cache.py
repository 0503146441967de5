"""Reuse finished training runs: an evaluation's results keyed by everything that determines them.

Comparing several protections against the same clean data trains the same clean models again
and again; an interrupted evaluation loses its finished runs. With ``--cache DIR`` each run's
result is stored under a key made from the training data's bytes (images, labels, captions),
the test data's bytes, the defense, the training settings and seed, the device type and the
package version, and a later run with the same key is read back instead of retrained.

The cache directory is untrusted: an entry is used only when it holds every field the
evaluation reads, with its type (and the job's own defense, seed, ... where the caller says);
a damaged entry is a miss, retrained and overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from uge_protect.shards.dataset import InMemoryDataset
from uge_protect.shards.layout import read_json, write_json_atomic
from uge_protect.methods.artifact import json_type_matches

_RUN = {"defense": str, "repeat": int, "seed": int, "train_data": str, "per_epoch": list[dict[str, Any]]}
#: What the evaluation reads of a cached run, per task (see ``eval/runner.py`` and ``report.py``).
RESULT_FIELDS: dict[str, dict[str, Any]] = {
    "classify": {**_RUN, "arch": str, "final_test_acc": float, "best_test_acc": float},
    "clip": {**_RUN, "i2t": dict[str, float], "t2i": dict[str, float], "zero_shot_accuracy": float | None,
             "seconds": float, "crop_pad": int},
}
_RETRIEVAL = ("R@1", "R@5", "R@10", "median_rank")


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

    def get(self, key: str, task: str | None = None, expect: Mapping[str, Any] | None = None,
            epochs: int | None = None) -> dict[str, Any] | None:
        """The stored result of ``key``, or None (a miss) when there is none or it is damaged:
        unreadable, of another key, or, given the ``task``, without a field the evaluation
        reads (:data:`RESULT_FIELDS`), a field not equal to ``expect``'s, or another number
        of ``epochs``."""
        if self.dir is None:
            return None
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError):
            return None  # a damaged entry is retrained and overwritten
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        if task is not None and not valid_result(data, task, expect, epochs):
            return None
        return data

    def put(self, key: str, result: dict[str, Any]) -> None:
        if self.dir is not None:
            write_json_atomic(self.dir / f"{key}.json", {**result, "key": key})


def valid_result(data: Mapping[str, Any], task: str, expect: Mapping[str, Any] | None = None,
                 epochs: int | None = None) -> bool:
    """Whether a cached run of ``task`` holds what the evaluation reads (see :meth:`RunCache.get`)."""
    fields = RESULT_FIELDS.get(task)
    if fields is None or not all(k in data and json_type_matches(data[k], tp) for k, tp in fields.items()):
        return False
    if any(data.get(k) != v for k, v in (expect or {}).items()):
        return False
    per_epoch = data["per_epoch"]
    if not per_epoch or (epochs is not None and len(per_epoch) != epochs):
        return False
    if task == "classify" and not all(json_type_matches(e.get("test_acc"), float) for e in per_epoch):
        return False  # the summary averages every epoch's test accuracy
    return task != "clip" or all(k in data[d] for d in ("i2t", "t2i") for k in _RETRIEVAL)
