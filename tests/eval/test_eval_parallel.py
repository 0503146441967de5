"""Evaluation spread over two processes, and reuse of finished runs through the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.eval.test_eval_run import _cfg, data  # noqa: F401  (module-scoped fixture)
from uge_protect.eval.cache import RunCache
from uge_protect.eval.runner import run_evaluation
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.methods.registry import create_method


def _finals(report: dict) -> list[tuple]:
    return [(r["defense"], r["arch"], r["train_data"], r["seed"], r["final_test_acc"], r["confusion"])
            for r in report["tasks"]["classify"]["runs"]]


def _eval_cmd(data, out, *launcher):  # noqa: F811
    return [*launcher, "-m", "uge_protect", "eval", "--protected", str(data / "prot"),
            "--clean-train", str(data / "train" / "*.tar"), "--test", str(data / "test" / "*.tar"),
            "--arch", "small_cnn", "--defense", "none", "--defense", "grayscale", "--epochs", "1",
            "--batch-size", "32", "-q", "-o", str(out)]


def test_two_processes_give_the_single_process_report(data, tmp_path):  # noqa: F811
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    single = subprocess.run(_eval_cmd(data, tmp_path / "one", sys.executable),
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    multi = subprocess.run(_eval_cmd(data, tmp_path / "two", *launch), env=env, capture_output=True,
                           text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    assert len(_finals(two)) == 4
    assert _finals(two) == _finals(one)  # same runs, same seeds: the same numbers
    assert (tmp_path / "two" / "samples_grid.png").is_file()


def test_cache_reuses_runs_and_retrains_what_changed(data, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    first = run_evaluation(_cfg(data, tmp_path / "a", cache_dir=str(cache), figures=False))
    assert first["cached_runs"] == 0 and len(list(cache.glob("*.json"))) == 2
    again = run_evaluation(_cfg(data, tmp_path / "b", cache_dir=str(cache), figures=False))
    assert again["cached_runs"] == 2 and all(r["cached"] for r in again["tasks"]["classify"]["runs"])
    assert _finals(again) == _finals(first)
    # another protection of the same clean data: the clean run is reused, the protected one is not
    run_shard_job(ShardJobConfig(inputs=[str(data / "train" / "*.tar")], output=str(tmp_path / "prot2"),
                                 num_workers=0, encode_threads=0, quiet=True, seed=7), create_method("random"))
    other = run_evaluation(_cfg(data, tmp_path / "c", protected=str(tmp_path / "prot2"), cache_dir=str(cache),
                                figures=False))
    cached = {r["train_data"]: r["cached"] for r in other["tasks"]["classify"]["runs"]}
    assert cached == {"clean": True, "protected": False}
    # a change of settings (epochs) retrains everything
    longer = run_evaluation(_cfg(data, tmp_path / "d", epochs=2, cache_dir=str(cache), figures=False))
    assert longer["cached_runs"] == 0


def test_damaged_cache_entry_is_retrained(tmp_path):
    cache = RunCache(tmp_path)
    cache.put("k1", {"final_test_acc": 0.5})
    assert cache.get("k1") == {"final_test_acc": 0.5, "key": "k1"}
    (tmp_path / "k1.json").write_text("{not json")
    assert cache.get("k1") is None
    assert RunCache(None).get("k1") is None
