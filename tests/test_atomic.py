"""uge_protect.atomic: a file is published whole or not at all, never through a planted link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uge_protect.atomic import AtomicFile, atomic_open, atomic_write, temp_owner, temp_path


def test_atomic_write_publishes_bytes_and_text(tmp_path):
    atomic_write(tmp_path / "a.bin", b"\x00\x01")
    atomic_write(tmp_path / "b.txt", "é\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "é\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt"]


@pytest.mark.parametrize("text", [False, True])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, text):
    path = tmp_path / "x.json"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_open(path, text=text) as f:
            f.write("new" if text else b"new")
            raise RuntimeError("disk on fire")
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_abort_of_a_long_lived_file(tmp_path):
    path = tmp_path / "s.tar"
    out = AtomicFile(path, buffering=1 << 20)
    out.file.write(b"partial")
    assert out.tmp.exists() and not path.exists()
    out.abort()
    assert list(tmp_path.iterdir()) == []
    out = AtomicFile(path)
    out.file.write(b"whole")
    out.commit()
    assert path.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [path]


def test_private_mode_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "secret", b"k", mode=0o600)
        atomic_write(tmp_path / "plain", b"p")
    finally:
        os.umask(old)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o666


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "a.json"
    temp_path(path).symlink_to(victim)
    atomic_write(path, "{}")
    assert victim.read_bytes() == b"untouched" and path.read_text() == "{}"
    assert not path.is_symlink()


def test_temporary_names_are_recognised():
    path = temp_path(Path("/x/shard-000001.tar"), pid=4242)
    assert path.name == ".shard-000001.tar.tmp-4242" and temp_owner(path.name) == 4242
    assert temp_owner("shard-000001.tar") is None and temp_owner(".a.tar.tmp-1.tar") is None
