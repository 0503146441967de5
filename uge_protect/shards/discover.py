"""Find input shards from paths, globs, brace patterns and URLs."""

from __future__ import annotations

import glob
import os
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
