"""Stop signals at hostile moments, through real subprocesses: a read that blocks forever (a
``pipe:cat FIFO`` input whose writer never writes), Ctrl-C to the whole process group, a
DataLoader worker killed with ``kill -9``, SIGTERM during the merge, SIGTERM twice, SIGHUP.

Each run must end with one ``error:`` line and its exit status, leave no temporary file and
no process behind (DataLoader workers, their ``pipe:`` commands), and a rerun must resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import simple_samples, write_shard
from tests.pipeline.test_kill_resume import CLI, INTERRUPTED, _descendants, _env, _wait_gone
from tests.pipeline.test_kill_resume import _wait as _wait_until
from tests.pipeline.test_shard_run import output_bytes, run
from uge_protect.shards.layout import OutputLayout

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and PR_SET_PDEATHSIG")

#: Generous: a run that does not stop hangs forever (what these tests guard against).
STOPS_WITHIN_S = 30
RERUN = "rerun the same command to resume"


def _as_from_a_terminal() -> None:
    """``preexec_fn``: the stop signals at their default action, as in a shell started from a
    terminal, whatever this test process inherited (under ``nohup`` SIGHUP is ignored, and a
    run started with it ignored rightly keeps ignoring it)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class BlockedRun:
    """A ``shard`` run over a real shard and a ``pipe:cat FIFO`` shard whose FIFO is opened
    for writing but never written: the reader of the second shard blocks in ``read``."""

    def __init__(self, tmp_path: Path, workers: int, **popen):
        popen.setdefault("preexec_fn", _as_from_a_terminal)
        self.tmp = tmp_path
        self.shard = write_shard(tmp_path / "a.tar", simple_samples("a", 4, seed=1))
        self.fifo = tmp_path / "b.tar"
        os.mkfifo(self.fifo)
        self.out = tmp_path / "out"
        self.layout = OutputLayout(self.out)
        self.cmd = [*CLI, "shard", str(self.shard), f"pipe:cat {self.fifo}", "-o", str(self.out), "-m", "random",
                    "-q", "--workers", str(workers), "--batch-size", "2"]
        self.err_path = tmp_path / "stderr.txt"
        with open(self.err_path, "w") as err:  # a file: a surviving child would hold a pipe open
            self.proc = subprocess.Popen(self.cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True, **popen)
        self.writer = self._open_writer()
        self.family = _descendants(self.proc.pid)

    def _open_writer(self) -> int:
        """Wait until ``cat`` has opened the FIFO, then hold its write end open (no data)."""
        end = time.monotonic() + 120
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.02)
        self.kill()
        raise AssertionError(f"the run never opened the FIFO: {self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self) -> int:
        """The exit status; fails (and kills the run) when it does not stop."""
        try:
            return self.proc.wait(timeout=STOPS_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not stop: {self.stderr()[-2000:]}") from None

    def close_writer(self) -> None:
        if getattr(self, "writer", None) is not None:
            os.close(self.writer)
            self.writer = None

    def kill(self) -> None:
        """End whatever is left of the run."""
        for pid, _ in _descendants(self.proc.pid) | getattr(self, "family", set()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.close_writer()

    def assert_clean_stop(self, returncode: int, line: str) -> None:
        """Exit status, one stderr line, no temporary file, no process of the run left."""
        try:
            assert self.wait() == returncode, self.stderr()
            assert self.stderr().strip().splitlines() == [line]
            assert self.layout.temp_files() == []
            left = _wait_gone(self.family)
            assert not left, f"processes of the run outlived it: {sorted(left)}"
        finally:
            self.kill()

    def workers(self) -> list[int]:
        """The main process's children (DataLoader workers), the one blocked in the read last."""
        kids = {pid for pid, _ in self.family if _parent(pid) == self.proc.pid}
        return sorted(kids, key=lambda pid: any(_parent(p) == pid for p, _ in self.family))


def _parent(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def _feed(fifo: Path, data: bytes) -> threading.Thread:
    """Write ``data`` into ``fifo`` once a reader opens it (in a thread)."""

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("workers", [2, 0])
def test_sigterm_stops_a_run_whose_reader_blocks_forever_and_a_rerun_resumes(tmp_path, workers):
    blocked = BlockedRun(tmp_path, workers)
    blocked.proc.send_signal(signal.SIGTERM)
    blocked.assert_clean_stop(143, INTERRUPTED)
    # The rerun, with the FIFO now fed a shard, ends as an uninterrupted run would.
    data = write_shard(tmp_path / "b-src.tar", simple_samples("b", 3, seed=2)).read_bytes()
    spec = f"pipe:cat {blocked.fifo}"
    _feed(blocked.fifo, data)
    run([blocked.shard, spec], tmp_path / "ref", batch_size=2)
    _feed(blocked.fifo, data)
    proc = subprocess.run(blocked.cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output_bytes(blocked.out) == output_bytes(tmp_path / "ref")
    assert len(output_bytes(blocked.out)) == 4


def test_ctrl_c_to_the_process_group_exits_130(tmp_path):
    """Ctrl-C in a terminal reaches the workers too, in the middle of their work."""
    src = tmp_path / "in"
    src.mkdir()
    for s in range(4):
        write_shard(src / f"d{s}.tar", simple_samples(f"d{s}", 24, seed=s, size=(128, 128)))
    out = tmp_path / "out"
    layout = OutputLayout(out)
    cmd = [*CLI, "shard", str(src), "-o", str(out), "-m", "random", "-q", "--workers", "2", "--batch-size", "2"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=_as_from_a_terminal)
    family: set = set()
    try:
        assert _wait_until(lambda: layout.shards_dir.is_dir() and layout.temp_files() != [], proc), err_path.read_text()
        family = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        assert proc.wait(timeout=STOPS_WITHIN_S) == 130, err_path.read_text()
        assert err_path.read_text().strip().splitlines() == [f"error: interrupted; {RERUN}"]
        assert layout.temp_files() == []
        assert not _wait_gone(family)
    finally:
        for pid, _ in family | _descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run(sorted(src.glob("*.tar")), out, batch_size=2)  # the rerun resumes
    assert layout.temp_files() == [] and len(list(layout.stats_dir.glob("*.json"))) == 4


def test_a_worker_killed_with_kill_9_stops_the_run_with_one_error_line(tmp_path):
    blocked = BlockedRun(tmp_path, workers=2)
    idle, reading = blocked.workers()
    os.kill(idle, signal.SIGKILL)  # e.g. the out-of-memory killer
    try:
        rc = blocked.wait()
        lines = blocked.stderr().strip().splitlines()
        assert rc == 2 and len(lines) == 1, blocked.stderr()
        assert lines[0].startswith("error: a reader process") and "SIGKILL" in lines[0] and RERUN in lines[0]
        assert blocked.layout.temp_files() == []
        assert not _wait_gone(blocked.family)  # the other worker and its pipe: command too
    finally:
        blocked.kill()


def test_sigterm_twice_and_again_while_exiting_still_exits_143(tmp_path):
    blocked = BlockedRun(tmp_path, workers=2)
    blocked.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    blocked.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + STOPS_WITHIN_S
    while "error:" not in blocked.stderr() and blocked.proc.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    if blocked.proc.poll() is None:
        blocked.proc.send_signal(signal.SIGTERM)  # the line is out: the process is on its way out
    blocked.assert_clean_stop(143, INTERRUPTED)


def test_sighup_to_the_process_group_stops_like_sigterm_with_exit_129(tmp_path):
    blocked = BlockedRun(tmp_path, workers=2)
    os.killpg(blocked.proc.pid, signal.SIGHUP)  # the terminal was closed
    blocked.assert_clean_stop(129, f"error: interrupted by SIGHUP; {RERUN}")


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """``nohup`` (SIGHUP ignored at start): closing the terminal does not stop the run."""
    blocked = BlockedRun(tmp_path, workers=2, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        os.killpg(blocked.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert blocked.proc.poll() is None, blocked.stderr()
        os.set_blocking(blocked.writer, True)
        os.write(blocked.writer, write_shard(tmp_path / "b-src.tar", simple_samples("b", 3, seed=2)).read_bytes())
        blocked.close_writer()  # the pipe's shard is complete: the run finishes
        assert blocked.wait() == 0, blocked.stderr()
        assert blocked.stderr() == ""
    finally:
        blocked.kill()


_SIGTERM_IN_MERGE = """
import os, signal, sys
import uge_protect.pipeline.run as run
merge = run.merge_outputs
def merge_outputs(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return merge(*args, **kwargs)
run.merge_outputs = merge_outputs
from uge_protect.cli.app import main
sys.argv = ["uge-protect", "shard", *sys.argv[1:]]
main()
"""


def test_sigterm_during_the_merge_finishes_it_then_exits_143(tmp_path):
    shards = [write_shard(tmp_path / f"s{i}.tar", simple_samples(f"s{i}", 3, seed=i)) for i in range(2)]
    out = tmp_path / "out"
    args = [*map(str, shards), "-o", str(out), "-m", "random", "-q", "--workers", "0"]
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN_MERGE, *args], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines() == [INTERRUPTED]
    layout = OutputLayout(out)
    assert layout.protection_file.is_file() and layout.temp_files() == []  # the merge was finished
    assert run(shards, out)["counts"]["written"] == 6  # the rerun finds it complete
