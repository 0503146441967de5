"""Multi-process runs and hard kills, through real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from uge_protect.pipeline.inspect import inspect_output
from uge_protect.shards.layout import OutputLayout
from tests.pipeline.test_shard_run import output_bytes, run

CLI = [sys.executable, "-m", "uge_protect"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_two_processes_split_shards_and_match_single_process(make_shards, tmp_path):
    shards = make_shards(n_shards=5, per_shard=6)
    run(shards, tmp_path / "single")
    out = tmp_path / "multi"
    log = tmp_path / "log.jsonl"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "uge_protect", "shard", *map(str, shards), "--output", str(out), "--method", "random",
        "--workers", "1", "--quiet", "--log-json", str(log),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output_bytes(out) == output_bytes(tmp_path / "single")
    per_rank = {}
    for path in (log, Path(f"{log}.rank1")):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        per_rank[events[0]["rank"]] = sorted(e["shard"] for e in events if e["event"] == "shard_done")
    names = sorted(p.name for p in shards)
    assert per_rank == {0: names[0::2], 1: names[1::2]}
    protection = json.loads(OutputLayout(out).protection_file.read_text())
    assert protection["timings"]["world_size"] == 2 and protection["counts"]["written"] == 30
    assert inspect_output(out)["problems"] == []


def _wait_for(predicate, proc, timeout=120.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def test_kill_9_then_rerun_gives_identical_output(make_shards, tmp_path):
    shards = make_shards(n_shards=6, per_shard=25, size=(40, 40))
    run(shards, tmp_path / "ref")
    out = tmp_path / "out"
    layout = OutputLayout(out)
    cmd = [*CLI, "shard", *map(str, shards), "-o", str(out), "-m", "random", "--quiet",
           "--workers", "0", "--batch-size", "2"]

    def n_done() -> int:
        return len(list(layout.stats_dir.glob("*.json"))) if layout.stats_dir.is_dir() else 0

    def writing() -> bool:
        return layout.shards_dir.is_dir() and any(p.name.startswith(".") for p in layout.shards_dir.iterdir())

    # Kill in the middle of the first shard, then in the middle of a later one.
    for moment in (writing, lambda: n_done() >= 2):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reached = _wait_for(moment, proc)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert reached, "the run finished before it could be killed"
        assert n_done() < len(shards)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output_bytes(out) == output_bytes(tmp_path / "ref")
    assert inspect_output(out)["problems"] == []
