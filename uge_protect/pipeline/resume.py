"""Owning an output directory: the lock, the run configuration check, and completion markers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from uge_protect.atomic import temp_owner, temp_path
from uge_protect.errors import UserError
from uge_protect.shards.layout import OutputLayout, read_json, write_json_atomic
from uge_protect.shards.lock import DirectoryLock

#: Reason prefix of a shard that could not be read (a transient failure: never complete).
UNREADABLE = "unreadable_shard"


def check_writable(root: Path) -> None:
    """Create ``root`` and prove it is writable, or raise a one-line :class:`UserError`."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = temp_path(root / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output directory {root}: {exc.strerror or exc}") from None


def claim_output(layout: OutputLayout, run_config: dict[str, Any], overwrite: bool) -> DirectoryLock:
    """Lock ``layout.root`` for this run and make sure it holds nothing of another config.

    With ``overwrite`` the previous outputs are removed; otherwise a directory with output of a
    different configuration is refused. Temporary files of interrupted runs are removed.
    """
    check_writable(layout.root)
    lock = DirectoryLock(layout.lock_file)
    lock.acquire()
    try:
        previous = _previous_config(layout)
        if previous is not None and previous.get("fingerprint") != run_config["fingerprint"]:
            if not overwrite:
                changed = _differences(previous.get("settings", {}), run_config["settings"])
                raise UserError(
                    f"{layout.root} holds output of a different configuration"
                    f" ({changed or 'settings differ'}); pass --overwrite to replace it"
                    " or choose another --output"
                )
        if overwrite or (previous is not None and previous.get("fingerprint") != run_config["fingerprint"]):
            clear_outputs(layout)
        for tmp in layout.temp_files():
            if not _alive_elsewhere(temp_owner(tmp.name)):
                tmp.unlink(missing_ok=True)
        layout.make_dirs()
        write_json_atomic(layout.run_file, run_config)
    except BaseException:
        lock.release()
        raise
    return lock


def _alive_elsewhere(pid: int | None) -> bool:
    """True when ``pid`` is another process that is still running (its temporary files may be
    in use: never delete them)."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _previous_config(layout: OutputLayout) -> dict[str, Any] | None:
    if layout.run_file.is_file():
        try:
            return read_json(layout.run_file)
        except (OSError, ValueError):
            return {"fingerprint": None}
    if layout.stats_dir.is_dir() and any(layout.stats_dir.iterdir()):
        return {"fingerprint": None}  # outputs without a run file: unknown configuration
    return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys[:4])


def clear_outputs(layout: OutputLayout) -> None:
    """Remove everything a previous run wrote (only the paths this tool owns)."""
    for d in (layout.shards_dir, layout.manifests_dir, layout.stats_dir):
        shutil.rmtree(d, ignore_errors=True)
    for f in (layout.run_file, layout.protection_file):
        f.unlink(missing_ok=True)


def discard_shard_outputs(layout: OutputLayout, name: str) -> None:
    """Remove whatever an earlier, interrupted run left for shard ``name`` (it is not complete)."""
    for path in (layout.stats(name), layout.manifest(name), layout.shard(name)):
        path.unlink(missing_ok=True)


def is_complete(layout: OutputLayout, name: str, fingerprint: str) -> bool:
    """A shard is complete when its stats marker exists for this configuration and its
    tar and manifest are in place."""
    stats_path = layout.stats(name)
    if not stats_path.is_file():
        return False
    try:
        stats = read_json(stats_path)
    except (OSError, ValueError):
        return False
    return (
        stats.get("config_fingerprint") == fingerprint
        # older versions marked shards that could not be read as complete: retry them
        and not str(stats.get("tar_error") or "").startswith(UNREADABLE)
        and layout.shard(name).is_file()
        and layout.manifest(name).is_file()
        and layout.shard(name).stat().st_size == stats.get("bytes")
    )
