"""Killing the main process at random moments: no process of the run outlives it, the lock
goes with it, SIGTERM stops cleanly, and reruns end byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import simple_samples, write_shard
from tests.pipeline.test_shard_run import output_bytes, run
from uge_protect.atomic import temp_owner
from uge_protect.errors import Terminated
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.pipeline.lifecycle import interruptible, sigterm_stops_the_run, stop_point
from uge_protect.shards.layout import OutputLayout

CLI = [sys.executable, "-m", "uge_protect"]
INTERRUPTED = "error: interrupted by SIGTERM; rerun the same command to resume"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``root``."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append((int(entry), stat[2]))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child[0])
    return found


def _alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    out = set()
    for pid, start in procs:
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == start and stat[1] not in ("Z", "X"):
            out.add((pid, start))
    return out


def _wait_gone(procs: set[tuple[int, int]], timeout: float = 3.0) -> set[tuple[int, int]]:
    end = time.monotonic() + timeout
    while (left := _alive(procs)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def _n_done(layout: OutputLayout) -> int:
    return len(list(layout.stats_dir.glob("*.json"))) if layout.stats_dir.is_dir() else 0


def _writing(layout: OutputLayout) -> bool:
    return layout.shards_dir.is_dir() and any(temp_owner(p.name) for p in layout.shards_dir.iterdir())


def _wait(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")
def test_random_kills_and_sigterms_then_rerun_is_byte_identical(tmp_path):
    n_shards = 10
    src = tmp_path / "in"
    src.mkdir()
    shards = [write_shard(src / f"d-{s:02d}.tar", simple_samples(f"s{s}", 16, seed=s, size=(64, 64)))
              for s in range(n_shards)]
    run(shards, tmp_path / "ref")
    out = tmp_path / "out"
    layout = OutputLayout(out)
    cmd = [*CLI, "shard", *map(str, shards), "-o", str(out), "-m", "random", "-q",
           "--workers", "2", "--batch-size", "2"]
    rng = random.Random(20240611)
    # Signals: kill -9 of the main process; SIGTERM to it alone (timeout, docker); SIGTERM to
    # the whole process group (systemd, Slurm). Moments, each with a random delay or shard
    # count: soon after the run claims the directory, in the middle of writing a shard, just
    # after a shard's completion marker appears.
    plan = [("kill", "writing"), ("kill", "start"), ("term", "writing"), ("kill", "marker"),
            ("group-term", "writing"), ("kill", "writing"), ("term", "marker")]
    interrupted = workers_seen = 0
    for how, moment in plan:
        target = min(_n_done(layout) + rng.randint(0, 2), n_shards - 3)
        err_path = tmp_path / "stderr.txt"
        with open(err_path, "w") as err:  # a file, not a pipe: a surviving child would hold a pipe open
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        claimed = _wait(lambda: layout.lock_file.is_file() and layout.lock_file.read_text() == str(proc.pid), proc)
        if moment == "start":
            time.sleep(rng.uniform(0.0, 0.3))
        elif moment == "writing":
            _wait(lambda: _n_done(layout) >= target and _writing(layout), proc)
            time.sleep(rng.uniform(0.0, 0.02))
        else:
            _wait(lambda: _n_done(layout) >= target + 1, proc)
            time.sleep(rng.uniform(0.0, 0.005))
        family = _descendants(proc.pid)
        running = proc.poll() is None
        if running:
            if how == "kill":
                os.kill(proc.pid, signal.SIGKILL)
            elif how == "term":
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        left = _wait_gone(family)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"{how}: processes of the run outlived it: {sorted(left)}"
        stderr = err_path.read_text()
        assert "another uge-protect run is writing" not in stderr, stderr  # no orphan holds the lock
        assert "Traceback" not in stderr, stderr
        workers_seen += len(family)
        if not running or proc.returncode in (0, -signal.SIGTERM):
            # It had finished its work (a SIGTERM while it exits may meet the default action).
            assert claimed and _complete(layout, n_shards), stderr
            continue
        interrupted += 1
        if how == "kill":
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode == 143, stderr
            assert stderr.strip().splitlines() == [INTERRUPTED]
            assert layout.temp_files() == []  # a clean stop leaves no partial files
    assert interrupted >= 5, "too few runs were still going when they were killed"
    assert workers_seen > 0, "no kill caught the DataLoader workers alive"
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output_bytes(out) == output_bytes(tmp_path / "ref")
    assert layout.temp_files() == []
    assert inspect_output(out)["problems"] == []


def _complete(layout: OutputLayout, n_shards: int) -> bool:
    return layout.protection_file.is_file() and len(list(layout.stats_dir.glob("*.json"))) == n_shards


_HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from uge_protect.pipeline.resume import DirectoryLock
DirectoryLock(Path(sys.argv[1])).acquire()
child = os.fork()
if child == 0:  # a child, like a DataLoader worker, that outlives its parent
    os.close(1)
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
os._exit(0)
"""


def test_the_lock_is_not_inherited_by_children_that_outlive_the_process(tmp_path):
    from uge_protect.pipeline.resume import DirectoryLock

    lock_path = tmp_path / ".lock"
    proc = subprocess.run([sys.executable, "-c", _HOLD_AND_FORK, str(lock_path)], env=_env(),
                          stdout=subprocess.PIPE, text=True, timeout=60)
    child = int(proc.stdout)
    try:
        assert _proc_stat(child) is not None  # the child outlives the process that locked
        lock = DirectoryLock(lock_path)
        lock.acquire()  # and holds no lock
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_sigterm_stops_a_run_at_stop_points_and_in_waits_only():
    previous = signal.getsignal(signal.SIGTERM)
    with sigterm_stops_the_run():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # not raised in the middle of arbitrary code
        with pytest.raises(Terminated):
            stop_point()
    with pytest.raises(Terminated):
        with sigterm_stops_the_run(), interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # a wait for the next batch ends at once
    assert signal.getsignal(signal.SIGTERM) is previous


_RANK = """
import sys, time
from uge_protect.errors import Terminated
from uge_protect.pipeline.lifecycle import follow_launcher, interruptible, sigterm_stops_the_run
try:
    with sigterm_stops_the_run():
        follow_launcher()
        print("ready", flush=True)
        with interruptible():
            time.sleep(60)
except Terminated:
    sys.exit(143)
"""

_LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env, stdout=subprocess.PIPE, text=True)
assert rank.stdout.readline() == "ready\\n"
print(rank.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs PR_SET_PDEATHSIG")
def test_a_rank_stops_when_its_launcher_is_killed():
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _RANK], env=_env(), stdout=subprocess.PIPE,
                                text=True)
    rank = int(launcher.stdout.readline())
    start = _proc_stat(rank)[2]
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    left = _wait_gone({(rank, start)}, timeout=10)
    if left:
        os.kill(rank, signal.SIGKILL)
    assert not left, "the rank outlived its launcher"
