"""Files written whole or not at all: a temporary name in the same directory, fsync, rename.

Every writer in the package goes through :class:`AtomicFile` (or :func:`atomic_open` /
:func:`atomic_write` built on it), so a reader never sees a half-written file and an
interrupted write leaves at most a temporary file that :func:`temp_owner` recognises.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import IO, Any, Iterator

#: Temporary names: ``.<final name>.tmp-<pid>`` with nothing after the pid. Every output
#: name ends in ``.tar``, ``.parquet`` or ``.json`` (or is ``.lock``), so no output, whatever
#: its shard is called (``.x.tmp-1.tar``, ``a.tar.tmp-1.tar``), can ever match.
_TEMP_NAME = re.compile(r"\..+\.tmp-([0-9]+)")


def temp_path(path: Path, pid: int | None = None) -> Path:
    """The temporary name that ``path`` is written under before its atomic rename.

    Every atomic write uses this, so :func:`temp_owner` recognises all of them and nothing else.
    """
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def temp_owner(name: str) -> int | None:
    """The pid in a temporary file name made by :func:`temp_path`, or None for any other name."""
    match = _TEMP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


class AtomicFile:
    """A binary file open under :func:`temp_path` of ``path``: :meth:`commit` flushes, fsyncs and
    renames it into place, :meth:`abort` closes and deletes it. For writers that keep a file
    open across calls (a shard written batch by batch); otherwise use :func:`atomic_open`.

    The file is created afresh with permission bits ``mode`` (less the umask, so 0o600 is
    never wider), whatever a stale temporary file of the same name had.
    """

    def __init__(self, path: str | os.PathLike, *, mode: int = 0o666, buffering: int = -1):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.tmp.unlink(missing_ok=True)  # O_EXCL below: ``mode`` applies to a file we create
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_BINARY", 0)
        fd = os.open(self.tmp, flags, mode)
        try:
            self.file: io.BufferedWriter = os.fdopen(fd, "wb", buffering=buffering)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> None:
        """Make the written bytes durable and publish them at ``path`` (the temporary file is
        removed if that fails)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the temporary file; ``path`` keeps whatever it held before."""
        try:
            self.file.close()
        except OSError:
            pass  # e.g. a full disk failing the final flush: the file goes anyway
        finally:
            self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, text: bool = False, *, mode: int = 0o666,
                encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """A file to write ``path`` through: published when the block ends, deleted if it raises.

    Binary unless ``text`` (then ``encoding``); ``mode`` as in :class:`AtomicFile`.
    """
    out = AtomicFile(path, mode=mode)
    f = io.TextIOWrapper(out.file, encoding=encoding, newline="") if text else out.file
    try:
        yield f
        if text:
            f.detach()  # flushes the text layer; the binary file stays open for commit()
    except BaseException:
        if text:
            with contextlib.suppress(Exception):
                f.detach()
        out.abort()
        raise
    out.commit()


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int = 0o666) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` whole or not at all."""
    with atomic_open(path, mode=mode) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
