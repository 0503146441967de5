"""The run cache is untrusted: a damaged entry is retrained and overwritten, never a traceback."""

from __future__ import annotations

import json

import pytest

from tests.eval.test_eval_run import _cfg, data  # noqa: F401  (module-scoped fixture)
from uge_protect.eval.cache import RunCache
from uge_protect.eval.runner import run_evaluation

CLASSIFY = {"defense": "none", "arch": "small_cnn", "repeat": 0, "seed": 0, "train_data": "clean",
            "per_epoch": [{"epoch": 1, "test_acc": 0.5}], "final_test_acc": 0.5, "best_test_acc": 0.5}
CLIP = {"defense": "none", "repeat": 0, "seed": 0, "train_data": "clean", "per_epoch": [{"epoch": 1, "loss": 2.0}],
        "i2t": {"R@1": 0.1, "R@5": 0.2, "R@10": 0.3, "median_rank": 4.0},
        "t2i": {"R@1": 0.1, "R@5": 0.2, "R@10": 0.3, "median_rank": 4.0},
        "zero_shot_accuracy": None, "seconds": 1.0, "crop_pad": 2}


@pytest.mark.parametrize("task, good", [("classify", CLASSIFY), ("clip", CLIP)])
def test_an_entry_missing_a_field_or_of_a_wrong_type_is_a_miss(tmp_path, task, good):
    cache = RunCache(tmp_path)
    cache.put("k", good)
    assert cache.get("k", task) == {**good, "key": "k"}
    for field in good:
        cache.put("k", {k: v for k, v in good.items() if k != field})
        assert cache.get("k", task) is None, field
        cache.put("k", {**good, field: 1 if isinstance(good[field], str) else "0.5"})
        assert cache.get("k", task) is None, field


def test_an_entry_of_another_job_or_length_is_a_miss(tmp_path):
    cache = RunCache(tmp_path)
    cache.put("k", CLASSIFY)
    assert cache.get("k", "classify", {"arch": "small_cnn", "seed": 0}, epochs=1) is not None
    assert cache.get("k", "classify", {"arch": "vgg11"}) is None
    assert cache.get("k", "classify", epochs=2) is None  # the summary averages every epoch
    cache.put("k", {**CLASSIFY, "per_epoch": [{"epoch": 1}]})
    assert cache.get("k", "classify") is None
    cache.put("k", {**CLASSIFY, "per_epoch": []})
    assert cache.get("k", "classify") is None


def test_the_evaluation_retrains_a_damaged_entry_and_overwrites_it(data, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    first = run_evaluation(_cfg(data, tmp_path / "a", cache_dir=str(cache), figures=False))
    assert first["cached_runs"] == 0
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 2
    damaged = json.loads(entries[0].read_text())
    del damaged["final_test_acc"]
    entries[0].write_text(json.dumps(damaged))
    again = run_evaluation(_cfg(data, tmp_path / "b", cache_dir=str(cache), figures=False))
    assert again["cached_runs"] == 1  # the damaged run was trained again ...
    assert "final_test_acc" in json.loads(entries[0].read_text())  # ... and its entry rewritten
    finals = lambda r: sorted((x["train_data"], x["final_test_acc"]) for x in r["tasks"]["classify"]["runs"])  # noqa: E731
    assert finals(again) == finals(first)
