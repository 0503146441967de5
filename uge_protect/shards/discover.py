"""Find input shards from paths, globs, brace patterns and URLs."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import braceexpand

from uge_protect.errors import UserError

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
                matches = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not matches:
                    raise UserError(f"input directory holds no .tar shard: {item}")
                found.extend(matches)
            elif os.path.isfile(item):
                found.append(item)
            else:
                raise UserError(f"input shard not found: {item}")
    unique = sorted(set(os.path.abspath(p) if not is_remote(p) else p for p in found))
    names: dict[str, str] = {}
    for spec in unique:
        name = shard_name(spec)
        if not name.endswith(".tar"):
            raise UserError(f"input is not a .tar shard: {spec}")
        if name in names:
            raise UserError(f"two inputs share the shard name {name!r}: {names[name]} and {spec}")
        names[name] = spec
    return unique


def open_shard(spec: str):
    """Open a local shard or a remote one through webdataset's opener; returns a binary stream."""
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
    out = os.path.realpath(output)
    local = [s for s in shards if not is_remote(s)]
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
