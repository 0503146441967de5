"""Low-level tar reading and writing for WebDataset shards.

Reading groups consecutive tar members into samples the way WebDataset does (the key is
the member path up to the first dot of its base name). It is stricter than ``tarfile``,
which ends an archive silently at a damaged or missing header: any truncation or corruption
is reported, so no sample after the damage vanishes unnoticed. Writing produces
reproducible archives: fixed mtime, owner and mode, so equal inputs give byte-identical tars.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from uge_protect.atomic import atomic_open

#: Fixed modification time written into every tar header (reproducible output).
TAR_MTIME = 0


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) as WebDataset does.

    ``"a/b/000001.jpg"`` → ``("a/b/000001", "jpg")``; ``"x.seg.png"`` → ``("x", "seg.png")``.
    A name without a dot in its base name has an empty extension.
    """
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext if dot else ""


@dataclass
class RawSample:
    """One sample as read from a tar: its key and its fields (extension → bytes), in order."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    #: Set when the sample could not be read whole (e.g. the tar ends inside it).
    error: str | None = None
    #: Members left unread because the sample would exceed its byte limit; each has an empty
    #: placeholder in ``fields`` (so it is counted), and the sample must fail.
    oversized: list[str] = field(default_factory=list)


#: Most bytes the members of one sample may hold together. A member's size is known from its
#: header, so a larger one is skipped unread: a small compressed tar cannot make a reader
#: hold gigabytes.
DEFAULT_MAX_SAMPLE_BYTES = 256 << 20


@dataclass
class MemberCounts:
    """What a reader saw: whole regular-file members, and the other members it skipped by
    kind (``symlink``, ``hardlink``, ``directory``, ``fifo``, ``character_device``,
    ``block_device``, ``other``), which belong to no sample."""

    files: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Every member read: files plus skipped ones."""
        return self.files + sum(self.skipped.values())


def member_kind(member: tarfile.TarInfo) -> str:
    """The kind of a tar member that is not a regular file."""
    for kind, test in (
        ("directory", member.isdir), ("symlink", member.issym), ("hardlink", member.islnk),
        ("character_device", member.ischr), ("block_device", member.isblk), ("fifo", member.isfifo),
    ):
        if test():
            return kind
    return "other"


class TarReadError(Exception):
    """The tar stream is truncated or corrupt; samples before it were delivered."""


class _DamagedHeader(tarfile.ReadError):
    """A header block that is cut short or fails its checksum.

    :class:`tarfile.TarFile` treats these, after the first member, as the end of the archive
    and silently stops; raising an exception that is not a ``HeaderError`` makes it propagate.
    """


class _StrictTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the end-of-archive marker (what follows is checked after)
        except tarfile.EmptyHeaderError:
            if tar.offset == 0:
                raise _DamagedHeader("empty file (0 bytes), not a tar archive") from None
            raise _DamagedHeader("the archive ends without an end-of-archive marker (truncated)") from None
        except tarfile.TruncatedHeaderError:
            raise _DamagedHeader("the archive ends inside a member header (truncated)") from None
        except tarfile.InvalidHeaderError as exc:
            raise _DamagedHeader(f"invalid member header at byte {tar.offset} ({exc})") from None


#: Read size when checking what follows the end-of-archive marker.
_TRAILER_CHUNK = 1 << 16


def _check_trailer(tar: tarfile.TarFile) -> None:
    """After the end-of-archive marker only zero padding may follow; anything else is damage
    (a zeroed header in the middle, or concatenated archives) that would hide samples."""
    while True:
        chunk = tar.fileobj.read(_TRAILER_CHUNK)
        if not chunk:
            return
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(
                "data after the end-of-archive marker (a zeroed header or concatenated archives)"
            )


def iter_tar_samples(
    stream: BinaryIO, counts: MemberCounts | None = None, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
) -> Iterator[RawSample]:
    """Yield samples from a tar stream, grouping consecutive members that share a key.

    A member whose extension already exists in the current sample starts a new sample with
    the same key (a duplicate, for the caller to reject). If the archive is truncated or
    corrupt (a member cut short, a damaged header, a missing end-of-archive marker, data
    after that marker), the sample being assembled — the damaged member's own sample when
    its header was readable — is yielded with ``error`` set and then :class:`TarReadError`
    is raised. Samples completed before the damage are yielded intact.

    Members that are not regular files (links, directories, devices, FIFOs) belong to no
    sample; when ``counts`` is given they are counted there by kind, and every whole file
    member in ``counts.files``, so that no member vanishes without a trace.

    A member that would take its sample past ``max_sample_bytes`` is not read: it is listed in
    the sample's ``oversized`` with an empty placeholder in ``fields``.

    An :class:`OSError` from the stream itself (a file that cannot be read, a connection
    reset, a download command that failed) is not damage in the data: it propagates as it
    is, so the caller can retry the shard instead of recording it as corrupt.
    """
    current: RawSample | None = None
    sample_bytes = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    if counts is not None:
                        counts.skipped[member_kind(member)] += 1
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and (current.key != key or ext in current.fields):
                    yield current  # complete: a member of another sample follows
                    current = None
                if current is None:
                    current, sample_bytes = RawSample(key=key), 0
                if sample_bytes + member.size > max_sample_bytes:
                    current.oversized.append(f"{member.name!r} ({member.size} bytes)")
                    current.fields[ext] = b""  # tarfile skips the unread data
                    if counts is not None:
                        counts.files += 1
                    continue
                sample_bytes += member.size
                fobj = tar.extractfile(member)
                try:
                    data = fobj.read() if fobj is not None else b""
                except tarfile.ReadError as exc:
                    raise tarfile.ReadError(f"member {member.name!r} is cut short ({exc})") from exc
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r} is cut short")
                current.fields[ext] = data
                if counts is not None:
                    counts.files += 1
            _check_trailer(tar)
    except (tarfile.TarError, EOFError, ValueError) as exc:
        if current is not None:
            current.error = f"corrupt_tar: {exc}"
            yield current
        raise TarReadError(str(exc) or type(exc).__name__) from exc
    if current is not None:
        yield current


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ReproducibleTarWriter:
    """Write members to a tar with reproducible headers (PAX format, fixed metadata)."""

    def __init__(self, fileobj: BinaryIO):
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        """Append one member with the given name and content."""
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    def close(self) -> None:
        """Finish the archive (writes the end-of-archive blocks)."""
        self._tar.close()

    def abort(self) -> None:
        """Give up on the archive without writing anything more (not even buffered bytes).

        Without this, the stream's finalizer later flushes into a file already closed.
        """
        stream = self._tar.fileobj
        stream.buf = b""
        stream.closed = True
        self._tar.closed = True


def write_tar_atomic(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``members`` to ``path`` through a temporary file renamed into place."""
    with atomic_open(path) as f:
        writer = ReproducibleTarWriter(f)
        try:
            for name, data in members:
                writer.add(name, data)
        except BaseException:
            writer.abort()
            raise
        writer.close()
