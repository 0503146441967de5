"""The lock on an output directory's ``.lock`` file: exclusive for a ``shard`` run, shared for
readers that must not see a run half-way (``push``).

Both are POSIX record locks (``lockf``/``fcntl``): a record lock belongs to the process, so
forked children (DataLoader workers) never inherit it and it ends with the process, even on
``kill -9``; an ``flock`` would live on in any child that outlives the process. Record locks
never conflict within one process, and closing any descriptor of the file drops them all, so
the locks this process holds are tracked here too and a second one on the same file is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

from uge_protect.errors import UserError
from uge_protect.shards.layout import OutputLayout


class DirectoryLock:
    """A non-blocking lock on ``path`` held by this process (exclusive unless ``shared``).

    A shared lock with ``missing_ok`` is not taken when ``path`` is no file: no run ever wrote
    there, and a reader must not create one.
    """

    _held: set[tuple[int, int]] = set()
    _guard = threading.Lock()

    def __init__(self, path: Path, *, shared: bool = False, busy_message: str | None = None,
                 missing_ok: bool = False):
        self.path = path
        self.shared = shared
        self.busy_message = busy_message
        self.missing_ok = missing_ok and shared
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`UserError` when another run holds it."""
        with self._guard:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) in self._held:
                self._refuse(str(os.getpid()))
            if self.missing_ok and not self.path.is_file():
                return
            flags = os.O_RDONLY if self.shared else os.O_RDWR | os.O_CREAT
            try:  # never through a symlink: the pid written here would overwrite its target
                fd = os.open(self.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise UserError(f"{self.path} is a symbolic link; remove it (uge-protect never"
                                " writes through links in its output directory)") from None
            try:
                fcntl.lockf(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                try:
                    holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                self._refuse(holder)
            if not self.shared:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode("ascii"))
            st = os.fstat(fd)
            self._fd, self._id = fd, (st.st_dev, st.st_ino)
            self._held.add(self._id)

    def _refuse(self, holder: str) -> None:
        if self.busy_message:
            raise UserError(self.busy_message)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise UserError(
            f"another uge-protect run is writing to {self.path.parent}{who}; "
            "wait for it to finish or choose another --output"
        )

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        with self._guard:
            if self._fd is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._held.discard(self._id)
                self._fd = self._id = None

    def __enter__(self) -> "DirectoryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock(root: Path, action: str) -> DirectoryLock:
    """The shared lock a reader of the output directory ``root`` holds while it reads: no
    ``shard`` run can start writing meanwhile, and taking it fails while one is writing
    (the error says to wait, then ``action``)."""
    path = OutputLayout(root).lock_file
    return DirectoryLock(path, shared=True, missing_ok=True,
                         busy_message=f"a uge-protect run is writing to {root}; wait for it to finish, then {action}")
