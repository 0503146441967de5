"""How the processes of a run start and stop: SIGTERM, and children that die with their parent.

* The main process turns SIGTERM into :class:`~uge_protect.errors.Terminated` (a
  ``KeyboardInterrupt``) for the duration of a run, so ``timeout``, docker, systemd or a Slurm
  preemption stop it like Ctrl-C: partial files are removed, the lock is released, a rerun
  resumes. It is raised between batches (or while waiting for one), not at arbitrary points.
* DataLoader workers ask the kernel to SIGKILL them when their parent dies (Linux
  ``PR_SET_PDEATHSIG``), so ``kill -9`` of the main process leaves no orphan behind. They leave
  a SIGTERM sent to the whole process group to the main process, which stops them itself.
* Ranks started by ``torchrun`` / ``accelerate launch`` get SIGTERM when their launcher dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Iterator

from uge_protect.errors import Terminated

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent thread ends (Linux only).

    Returns False where this is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def init_worker(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of the reading DataLoader (``functools.partial(init_worker, os.getpid())``).

    The worker dies with the main process, even on ``kill -9``; a SIGTERM that reaches it
    while the main process lives is left to the main process, which shuts its workers down
    as it stops (no worker traceback).
    """
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)

    def on_sigterm(signum, frame) -> None:
        if os.getppid() != parent_pid:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    sys.excepthook = _quiet_when_the_peer_left(sys.excepthook)


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
    """Whether SIGTERM arrived, and whether the main thread is in a wait it may leave at once."""

    def __init__(self) -> None:
        self.requested = False
        self.waiting = False

    def on_sigterm(self, signum, frame) -> None:
        self.requested = True
        if self.waiting:
            self.waiting = False
            raise Terminated("SIGTERM")


_stop: _StopRequest | None = None


def stop_point() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived: the run calls this between batches, where
    stopping leaves nothing half-done that the abort path cannot clean up."""
    if _stop is not None and _stop.requested:
        raise Terminated("SIGTERM")


@contextlib.contextmanager
def interruptible(allowed: bool = True) -> Iterator[None]:
    """A stop point, then a wait (for the next batch from DataLoader workers) that SIGTERM may
    end at once. ``allowed=False`` (the wait runs decoding code in this thread) only checks."""
    stop_point()
    if _stop is None or not allowed:
        yield
        return
    _stop.waiting = True
    try:
        yield
    finally:
        _stop.waiting = False


@contextlib.contextmanager
def sigterm_stops_the_run() -> Iterator[None]:
    """While active, SIGTERM stops the run like Ctrl-C: :class:`Terminated` is raised at the
    next :func:`stop_point` or inside an :func:`interruptible` wait, never in the middle of
    arbitrary code (a lock left held there could hang the cleanup). Later SIGTERMs add nothing;
    ``kill -9`` still works. Outside the main thread (where Python cannot install handlers)
    this does nothing."""
    global _stop
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _stop = _stop, _StopRequest()
    previous = signal.signal(signal.SIGTERM, _stop.on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _stop = outer
