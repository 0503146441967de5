"""Find input shards from paths, globs, brace patterns and URLs."""

from __future__ import annotations

import glob
import http.client
import os
import re
import shlex
import urllib.request
from pathlib import Path

import braceexpand

from uge_protect.errors import UserError
from uge_protect.shards.layout import OutputLayout

#: Longest shard name (UTF-8 bytes) whose longest derived name, the manifest's temporary file
#: ``.<stem>.parquet.tmp-<pid>`` (pids have at most 7 digits on Linux), fits the usual
#: 255-byte limit of a file name.
MAX_NAME_BYTES = 255 - (len(".parquet") - len(".tar")) - len("..tmp-") - 7

#: Seconds an HTTP(S) read may wait for bytes before the shard counts as unreadable.
HTTP_TIMEOUT = 60.0

_REMOTE_PREFIXES = ("http://", "https://", "pipe:", "gs://", "s3://", "hf://", "ais://")


def is_remote(spec: str) -> bool:
    """True when ``spec`` is a URL or pipe that webdataset's opener handles."""
    return spec.startswith(_REMOTE_PREFIXES)


def shard_name(spec: str) -> str:
    """The base name of a shard path or URL (``.../data-000001.tar`` → ``data-000001.tar``)."""
    tail = spec.rstrip("/").rsplit("/", 1)[-1]
    if spec.startswith("pipe:"):
        # e.g. "pipe:curl -s https://host/x.tar" → last word's base name
        tail = spec.split()[-1].rsplit("/", 1)[-1]
    return tail


def expand_inputs(specs: list[str]) -> list[str]:
    """Expand paths, globs and ``{000..099}`` brace patterns into a sorted, unique shard list.

    Local files must exist and end in ``.tar``; remote specs are passed through unchecked.
    Raises :class:`UserError` for a missing input, a pattern that matches nothing, or two
    inputs that share a base name (their outputs would collide).
    """
    if not specs:
        raise UserError("no input shards given: pass tar paths, globs or brace patterns")
    found: list[str] = []
    for spec in specs:
        for item in braceexpand.braceexpand(spec):
            if is_remote(item):
                found.append(item)
            elif glob.has_magic(item):
                matches = sorted(p for p in glob.glob(item) if os.path.isfile(p))
                if not matches:
                    raise UserError(f"input pattern matches no file: {item}")
                found.extend(matches)
            elif os.path.isdir(item):
                # Only regular files: a FIFO or device named x.tar would block its reader.
                matches = sorted(str(p) for p in Path(item).glob("*.tar") if p.is_file())
                if not matches:
                    raise UserError(f"input directory holds no .tar shard: {item}")
                found.extend(matches)
            elif os.path.isfile(item):
                found.append(item)
            elif os.path.exists(item):
                raise UserError(f"input is not a regular file (a FIFO, device or socket?): {item}")
            else:
                raise UserError(f"input shard not found: {item}")
    unique = sorted(set(os.path.abspath(p) if not is_remote(p) else p for p in found))
    names: dict[str, str] = {}
    for spec in unique:
        name = shard_name(spec)
        if not name.endswith(".tar"):
            raise UserError(f"input is not a .tar shard: {spec}")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise UserError(f"input shard name is longer than {MAX_NAME_BYTES} bytes (its temporary"
                            f" files would not fit a file name): {spec}; rename it")
        if name in names:
            raise UserError(f"two inputs share the shard name {name!r}: {names[name]} and {spec}")
        names[name] = spec
    return unique


class _HttpStream:
    """An HTTP(S) response body whose failures are all :class:`OSError`: a body cut short
    (``http.client.IncompleteRead``) is a read failure like a reset connection, so the shard
    is retried rather than recorded as damaged."""

    def __init__(self, response):
        self._response = response
        length = response.headers.get("Content-Length")
        self._expected = int(length) if length and length.isdigit() else None
        self._got = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._response.read(n)
        except http.client.HTTPException as exc:
            raise OSError(f"the download was cut short ({type(exc).__name__})") from exc
        self._got += len(data)
        if not data and n != 0 and self._expected is not None and self._got < self._expected:
            raise OSError(f"the download was cut short ({self._got} of {self._expected} bytes)")
        return data

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> "_HttpStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_shard(spec: str):
    """Open a local shard, an HTTP(S) URL (in this process, with a read timeout: a server
    that stalls makes the shard unreadable instead of hanging the run), or another remote one
    through webdataset's opener; returns a binary stream."""
    if spec.startswith(("http://", "https://")):
        try:
            return _HttpStream(urllib.request.urlopen(spec, timeout=HTTP_TIMEOUT))
        except http.client.HTTPException as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from exc
    if is_remote(spec):
        from webdataset.gopen import gopen  # present in webdataset 0.2.86 and 1.x

        return gopen(spec, "rb")
    return open(spec, "rb", buffering=1 << 20)


def _within(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or lies below it (both real, absolute paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _input_dirs(specs: list[str]) -> list[str]:
    """Real paths of the local directories named as inputs (each stands for its shards)."""
    out = []
    for spec in specs:
        for item in braceexpand.braceexpand(spec):
            if not is_remote(item) and not glob.has_magic(item) and os.path.isdir(item):
                out.append(os.path.realpath(item))
    return out


def check_output_apart(specs: list[str], shards: list[str], output: str | os.PathLike) -> None:
    """Refuse an output directory that overlaps the inputs, before anything is written.

    ``specs`` are the inputs as given, ``shards`` what :func:`expand_inputs` made of them.
    Paths are compared after resolving symlinks. The output overlaps when it holds an input
    shard (directly, through a symlinked path, or as a hard link of it anywhere below it),
    is an input, or lies inside a directory given as input. Raises :class:`UserError`.
    """
    _refuse_links_in_output(Path(output))
    _refuse_nested_outputs(Path(output))
    out = os.path.realpath(output)
    local = [s for s in shards if not is_remote(s)] + _paths_in_pipes(shards)
    problem = None
    for shard in local:
        if _within(os.path.realpath(shard), out):
            problem = f"contains the input shard {shard}"
            break
    else:
        for directory in _input_dirs(specs):
            if _within(out, directory):
                problem = f"lies inside the input directory {directory}"
                break
        else:
            linked = _hard_link_of_input(local, out)
            if linked is not None:
                problem = f"holds {linked[0]}, a hard link of the input shard {linked[1]}"
    if problem:
        raise UserError(
            f"output directory {output} {problem}; writing there would replace or delete the"
            " originals: choose an --output outside the inputs"
        )


def _refuse_links_in_output(output: Path) -> None:
    """The paths written inside an output directory must not be symlinks: a symlinked
    ``shards/`` or ``.lock`` would make every write land on what it points to (the inputs)."""
    layout = OutputLayout(output)
    for path in (layout.shards_dir, layout.manifests_dir, layout.stats_dir, layout.lock_file,
                 layout.run_file, layout.protection_file, layout.sizes_file):
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link; uge-protect never writes through links in"
                            " its output directory: remove it or choose another --output")


def _refuse_nested_outputs(output: Path) -> None:
    """An output directory inside another one, or holding one where this run writes, would
    share files (and temporary-file clean-up) with another run under another lock."""
    real = Path(os.path.realpath(output))
    for parent in real.parents:
        if OutputLayout(parent).run_file.is_file():
            raise UserError(f"output directory {output} lies inside the uge-protect output directory"
                            f" {parent}: choose an --output outside it")
    layout = OutputLayout(real)
    for d in (layout.shards_dir, layout.manifests_dir, layout.stats_dir):
        if OutputLayout(d).run_file.is_file():
            raise UserError(f"output directory {output} holds another uge-protect output directory"
                            f" ({d}): choose another --output")


def _paths_in_pipes(shards: list[str]) -> list[str]:
    """Existing local files named in ``pipe:`` commands (they are read like inputs)."""
    out = []
    for spec in shards:
        if spec.startswith("pipe:"):
            try:
                words = shlex.split(spec[len("pipe:"):])
            except ValueError:
                continue
            out.extend(w for w in words if os.path.isfile(w))
    return out


def _hard_link_of_input(shards: list[str], out: str) -> tuple[str, str] | None:
    """(path under ``out``, input shard) for a file under ``out`` that is an input shard's
    inode, or None. Only inputs with more than one link are looked for (cheap when none)."""
    wanted: dict[tuple[int, int], str] = {}
    for shard in shards:
        try:
            st = os.stat(shard)
        except OSError:
            continue
        if st.st_nlink > 1:
            wanted[(st.st_dev, st.st_ino)] = shard
    if not wanted or not os.path.isdir(out):
        return None
    for dirpath, _, files in os.walk(out):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                return path, wanted[(st.st_dev, st.st_ino)]
    return None


#: curl's exit statuses that say why a download failed.
_CURL_STATUS = {6: "could not resolve the host", 7: "could not connect", 18: "the transfer was cut short",
                22: "the server answered with an HTTP error (such as 404)", 28: "timed out",
                56: "the connection failed while receiving"}
_PIPE_EXIT = re.compile(r"""^\(\(['"](?P<cmd>[^'"\s]+)[^)]*\),.*\): exit (?P<status>-?\d+) \(read\)""")


def read_error_text(exc: OSError) -> str:
    """A short description of why a shard could not be read (webdataset's download pipes
    report a failed command as its whole argument tuple)."""
    match = _PIPE_EXIT.match(str(exc))
    if match is None:
        return str(exc) or type(exc).__name__
    program, status = match["cmd"], int(match["status"])
    why = _CURL_STATUS.get(status, "") if program == "curl" else ""
    return f"{program} exited with status {status}{f': {why}' if why else ''}"
