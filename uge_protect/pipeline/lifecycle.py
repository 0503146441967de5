"""How the processes of a run start and stop: stop signals, reader processes, children that
die with their parent.

* SIGTERM (``timeout``, docker, systemd, a Slurm preemption), SIGINT (Ctrl-C) and SIGHUP (the
  terminal closed) stop a run cleanly: :class:`~uge_protect.errors.Terminated` (a
  ``KeyboardInterrupt``) is raised in the main process, partial files are removed, the lock is
  released, a rerun resumes; the CLI exits ``128 + signal``. It is raised between batches, in a
  wait for the next batch, and in a blocking read of an input shard, never at arbitrary points
  (an exception in the middle of an at-fork hook left logging's lock held and hung the run).
  The first signal decides; later ones add nothing. A signal the process ignored when the run
  began (``nohup``, a background job) stays ignored.
* The DataLoader workers that read the shards (:func:`reader_processes`) leave these signals to
  the main process while it lives (Ctrl-C in a terminal, or systemd, signals the whole process
  group). The main process stops them itself whenever it leaves its loop: after a grace second
  it sends SIGTERM, which they then obey at once, even in a read that never returns, ending
  their own ``pipe:`` or download commands; then SIGKILL. A worker that dies (``kill -9``, the
  out-of-memory killer) stops the run with :class:`~uge_protect.errors.ReaderDied`.
* Workers ask the kernel to SIGKILL them when their parent dies (Linux ``PR_SET_PDEATHSIG``),
  so ``kill -9`` of the main process leaves no worker behind.
* Ranks started by ``torchrun`` / ``accelerate launch`` get SIGTERM when their launcher dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TypeVar

from uge_protect.errors import ReaderDied, Terminated

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1

#: The signals that stop a run (SIGHUP does not exist on Windows).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

#: Seconds reader processes get to leave on their own, then again after SIGTERM.
READER_GRACE_S = 1.0


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent thread ends (Linux only).

    Returns False where this is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


#: How much lower the reader processes and encoder threads run than the main thread (nice
#: steps): the main thread is the one serial stage (the method's pass, writing), so on a
#: machine whose cores are all busy it must not wait for its turn behind the others.
HELPER_NICENESS = 10


def lower_priority(steps: int = HELPER_NICENESS) -> None:
    """Make the calling thread ``steps`` nice levels lower in priority (Linux: per thread;
    elsewhere, where available, the whole process). Never fails."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        tid = threading.get_native_id() if sys.platform.startswith("linux") else 0
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))


def init_worker(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of the reading DataLoader (``functools.partial(init_worker, os.getpid())``).

    The worker dies with the main process, even on ``kill -9``. SIGTERM, SIGINT and SIGHUP
    are left to the main process while it lives (they reach the worker when they are sent to
    the whole process group), except once the main process is stopping its readers (see
    :func:`reader_processes`): then the worker ends its own child processes (``pipe:`` and
    download commands) and exits at once, even from a read that never returns.
    """
    global _stop
    _stop = None  # the main process's stop request (copied by fork) is not this process's
    die_with_parent(signal.SIGKILL)
    lower_priority()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)
    stopping = _readers_stopping

    def on_signal(signum, frame) -> None:
        if os.getppid() != parent_pid or (stopping is not None and stopping[0]):
            kill_tree(os.getpid(), include_root=False)
            os._exit(0)

    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup, background jobs: stays ignored
            signal.signal(sig, on_signal)
    sys.excepthook = _quiet_when_the_peer_left(sys.excepthook)


def kill_tree(pid: int, include_root: bool = True) -> None:
    """SIGKILL every descendant of ``pid`` (found in ``/proc``; none elsewhere), and ``pid``
    itself unless ``include_root`` is False. Processes already gone are skipped."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (parent := _parent_pid(int(entry))) is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    # Parents first: a shell whose child is killed under it would report "Killed" on stderr.
    for victim in ([pid] if include_root else []) + found:
        with contextlib.suppress(OSError):
            os.kill(victim, signal.SIGKILL)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    return int(text[text.rindex(b")") + 2 :].split()[1])


def _quiet_when_the_peer_left(hook):
    """An excepthook that drops connection errors: multiprocessing's resource-sharer thread
    (which hands tensors' file descriptors to the main process) reports through it when the
    main process stops in the middle of a transfer. Anything else goes to ``hook``."""

    def excepthook(kind, value, tb) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            hook(kind, value, tb)

    return excepthook


def follow_launcher() -> None:
    """In a rank started by torchrun / ``accelerate launch`` (torch elastic), get SIGTERM when
    the launcher dies, so a ``kill -9`` of the launcher stops the ranks cleanly instead of
    leaving them running unattended. Elsewhere, do nothing."""
    # (No check for a launcher that died before this call: the parent pid cannot tell, since
    # a launcher may itself be pid 1 in a container.)
    if "TORCHELASTIC_RUN_ID" in os.environ and threading.current_thread() is threading.main_thread():
        die_with_parent(signal.SIGTERM)


class _StopRequest:
    """What stops the run (the first stop signal, or a reader process that died), and whether
    the main thread is in a wait it may leave at once (``waiting``)."""

    def __init__(self, at_once: bool) -> None:
        self.signum: int | None = None
        self.death: str | None = None
        self.waiting = at_once

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None and self.death is None:
            self.signum = signum
            self._raise_if_waiting()

    def reader_died(self, death: str) -> None:
        if self.signum is None and self.death is None:
            self.death = death
            self._raise_if_waiting()

    def _raise_if_waiting(self) -> None:
        if self.waiting:
            self.waiting = False
            self.raise_if_requested()

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Terminated(self.signum)
        if self.death is not None:
            raise ReaderDied(self.death)


_stop: _StopRequest | None = None


def stop_point() -> None:
    """Raise :class:`Terminated` if a stop signal arrived (:class:`ReaderDied` if a reader
    process died): the run calls this between batches, where stopping leaves nothing
    half-done that the abort path cannot clean up."""
    if _stop is not None:
        _stop.raise_if_requested()


def stop_requested() -> int | None:
    """The stop signal received by the active run or command, if any."""
    return _stop.signum if _stop is not None else None


@contextlib.contextmanager
def _may_leave_at_once() -> Iterator[None]:
    stop = _stop
    if stop is None or threading.current_thread() is not threading.main_thread():
        yield  # the handler raises in the main thread only: another thread's wait is not one
        return
    saved, stop.waiting = stop.waiting, True
    try:
        stop.raise_if_requested()  # one that came just before
        yield
    finally:
        stop.waiting = saved


@contextlib.contextmanager
def interruptible(allowed: bool = True) -> Iterator[None]:
    """A stop point, then a wait (for the next batch from DataLoader workers) that a stop
    request may end at once. ``allowed=False`` (the wait runs decoding code in this thread)
    only checks; the reads in it are interruptible themselves (:func:`blocking_read`)."""
    stop_point()
    if not allowed:
        yield
        return
    with _may_leave_at_once():
        yield


@contextlib.contextmanager
def blocking_read() -> Iterator[None]:
    """Around a call that may wait for input indefinitely (opening or reading an input shard:
    a FIFO, a stalled download): in the main thread of a run, a stop request ends it at once.
    Nothing may fork inside (see the module's notes); elsewhere this does nothing."""
    with _may_leave_at_once():
        yield


class InterruptibleStream:
    """An input stream whose reads are :func:`blocking_read` calls. When the reading stops
    early (a stop request, the consumer gone), a ``pipe:`` or download command behind the
    stream (``stream.proc``) is killed with its children before the stream is closed, instead
    of being waited for; otherwise closing is the stream's own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def read(self, *args: Any) -> bytes:
        with blocking_read():
            return self._stream.read(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __enter__(self) -> "InterruptibleStream":
        return self

    def __exit__(self, kind, value, tb) -> bool | None:
        if kind is None or issubclass(kind, Exception):
            return self._stream.__exit__(kind, value, tb)
        proc = getattr(self._stream, "proc", None)  # webdataset's Pipe
        if isinstance(proc, subprocess.Popen):
            kill_tree(proc.pid)
        with contextlib.suppress(Exception):  # its exit status (killed) is not the news
            self._stream.__exit__(kind, value, tb)
        return None


@contextlib.contextmanager
def sigterm_stops_the_run(at_once: bool = False, ignore_when_done: bool = False) -> Iterator[None]:
    """While active, SIGTERM, SIGINT and SIGHUP (those not ignored) stop the run like Ctrl-C:
    :class:`Terminated` is raised at the next :func:`stop_point` or inside an
    :func:`interruptible` wait or a :func:`blocking_read`, never in the middle of arbitrary
    code (a lock left held there could hang the cleanup); with ``at_once`` (code that may stop
    anywhere, like before a run begins) at once. Later signals add nothing; ``kill -9`` still
    works. Nested, it shares the outer request (a signal that came before counts) and sets
    only where it may raise. ``ignore_when_done`` (a process that ends with this, like the
    CLI): on leaving, the signals are ignored instead of the previous handlers coming back;
    the command has decided how it ends, and a signal while the interpreter shuts down (which
    puts Python's handlers back to the default action) must not kill it. Outside the main
    thread (where Python cannot install handlers) this does nothing."""
    global _stop
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _stop is not None:
        saved, _stop.waiting = _stop.waiting, at_once
        try:
            stop_point()
            yield
        finally:
            _stop.waiting = saved
        return
    _stop = stop = _StopRequest(at_once)
    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, stop.on_signal)
    try:
        yield
    finally:
        stop.waiting = False
        for sig, handler in previous.items():
            if ignore_when_done:
                handler = signal.SIG_IGN
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _stop = None


#: Set to 1 by the main process when it stops its reader processes; shared with them (fork).
_readers_stopping: mmap.mmap | None = None


@contextlib.contextmanager
def reader_processes(loader: Iterable[T]) -> Iterator[Iterator[T]]:
    """Iterate ``loader`` (a DataLoader) with its worker processes under control.

    Starting the iteration forks the workers: not a point to stop at. While it runs, a worker
    that dies stops the run (:class:`ReaderDied`, raised like a stop signal: in a wait for a
    batch or at the next stop point) instead of torch's exception at an arbitrary point. On
    leaving, for any reason, the workers are stopped within about two grace periods even if
    one is stuck in a read: torch's own shutdown runs (its pin-memory thread first) while the
    workers that have not left after :data:`READER_GRACE_S` get SIGTERM, then SIGKILL.
    """
    readers = _Readers(loader)
    try:
        yield readers
    finally:
        readers.close()


class _Readers:
    def __init__(self, loader: Iterable[T]) -> None:
        global _readers_stopping
        self._flag = _readers_stopping = mmap.mmap(-1, 1)
        before = set(multiprocessing.active_children())
        self._it: Iterator[T] | None = iter(loader)
        self._workers = [p for p in multiprocessing.active_children() if p not in before]
        self._stop = _stop
        self._watching = False
        self._previous_sigchld: Any = None
        if self._workers and self._stop is not None and threading.current_thread() is threading.main_thread():
            self._previous_sigchld = signal.signal(signal.SIGCHLD, self._on_child)
            self._watching = True

    def __iter__(self) -> "_Readers":
        return self

    def __next__(self) -> T:
        try:
            return next(self._it)
        except Exception as exc:  # torch's report of a worker that died (or ours, wrapped), ...
            # ... or a symptom of one dying: its end of a connection closed before it can be
            # waited for (EOFError receiving a tensor's file descriptor from it).
            death = _death(self._workers, wait_s=READER_GRACE_S if isinstance(exc, (EOFError, OSError)) else 0)
            if death is None:
                raise
            raise ReaderDied(death) from None

    def _on_child(self, signum: int, frame: Any) -> None:
        if self._watching and (death := _death(self._workers)) is not None:
            self._watching = False
            self._stop.reader_died(death)

    def close(self) -> None:
        self._watching = False
        self._flag[0] = 1  # from now on the workers obey SIGTERM at once
        done = threading.Event()
        pids = [w.pid for w in self._workers]
        watchdog = threading.Thread(target=_stop_stragglers, args=(pids, done), name="reader-stop", daemon=True)
        if pids:
            watchdog.start()
        try:
            it, self._it = self._it, None
            shutdown = getattr(it, "_shutdown_workers", None)  # torch's orderly shutdown
            if callable(shutdown):
                shutdown()
            del it, shutdown  # the last reference: a single-process iterator's readers close now
            for w in self._workers:
                w.join(2 * READER_GRACE_S + 1)
        finally:
            done.set()
            if pids:
                watchdog.join()
            if self._previous_sigchld is not None:
                signal.signal(signal.SIGCHLD, self._previous_sigchld)


def _stop_stragglers(pids: list[int], done: threading.Event) -> None:
    """Watchdog of :meth:`_Readers.close`: SIGTERM the workers still running after the grace
    period, SIGKILL them (with their children) after another."""
    if done.wait(READER_GRACE_S):
        return
    for pid in _running(pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    if done.wait(READER_GRACE_S):
        return
    for pid in _running(pids):
        kill_tree(pid)


def _running(pids: list[int]) -> list[int]:
    """The child processes among ``pids`` that have not exited (none is reaped here)."""
    out = []
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                out.append(pid)
    return out


def _death(workers: list, wait_s: float = 0) -> str | None:
    """How a worker among ``workers`` (multiprocessing processes) died, killed by a signal or
    exiting with a failure, as the one-line error message; None when none did (running,
    exited normally), after looking again for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while (death := _death_now(workers)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return death


def _death_now(workers: list) -> str | None:
    for w in workers:
        try:
            info = os.waitid(os.P_PID, w.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped, by torch's own checks: the process object knows
            code = w.exitcode
        else:
            if info is None:
                continue
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        if code:
            if code > 0:
                how = f"exited with status {code}"
            else:
                how = f"was killed by {_signal_name(-code)}"
                if -code == signal.SIGKILL:
                    how += " (out of memory? then try fewer --workers or a lower --max-batch-pixels)"
            return (f"a reader process (DataLoader worker, pid {w.pid}) {how}; nothing partial was kept:"
                    " rerun the same command to resume")
    return None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
