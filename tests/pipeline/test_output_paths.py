"""Output directories that would make writes land on the inputs or on another run's files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import simple_samples, write_shard
from tests.pipeline.test_shard_run import run
from uge_protect.atomic import temp_path
from uge_protect.errors import UserError
from uge_protect.shards.discover import MAX_NAME_BYTES, expand_inputs
from uge_protect.shards.layout import OutputLayout


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_shard(d / "s0.tar", simple_samples("a", 3))
    write_shard(d / "s1.tar", simple_samples("b", 3, seed=1))
    return d


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("link", ["shards", "manifests", "stats", ".lock", "run.json"])
def test_symlinks_in_the_output_are_refused_and_their_targets_untouched(inputs, tmp_path, link):
    before = _snapshot(inputs)
    out = tmp_path / "out"
    out.mkdir()
    target = inputs if link in ("shards", "manifests", "stats") else inputs / "s0.tar"
    (out / link).symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="symbolic link"):
            run([inputs / "s0.tar", inputs / "s1.tar"], out, overwrite=overwrite)
    assert _snapshot(inputs) == before


def test_the_lock_never_follows_a_symlink(inputs, tmp_path):
    from uge_protect.shards.lock import DirectoryLock

    before = (inputs / "s0.tar").read_bytes()
    (tmp_path / ".lock").symlink_to(inputs / "s0.tar")
    with pytest.raises(UserError, match="symbolic link"):
        DirectoryLock(tmp_path / ".lock").acquire()
    assert (inputs / "s0.tar").read_bytes() == before


def test_outputs_nested_in_one_another_are_refused(inputs, tmp_path):
    out = tmp_path / "out"
    run([inputs / "s0.tar"], out)
    with pytest.raises(UserError, match="lies inside the uge-protect output directory"):
        run([inputs / "s1.tar"], out / "shards")
    with pytest.raises(UserError, match="lies inside the uge-protect output directory"):
        run([inputs / "s1.tar"], out / "shards" / "deeper")
    outer = tmp_path / "outer"
    run([inputs / "s1.tar"], outer / "stats")
    with pytest.raises(UserError, match="holds another uge-protect output directory"):
        run([inputs / "s0.tar"], outer)


def test_temporary_files_of_a_live_process_are_left_alone(inputs, tmp_path):
    out = tmp_path / "out"
    run([inputs / "s0.tar"], out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = OutputLayout(out).shards_dir / f".x.tar.tmp-{sleeper.pid}"
        live.write_bytes(b"in use")
        dead = temp_path(OutputLayout(out).shards_dir / "y.tar")
        dead = dead.with_name(dead.name.rsplit("-", 1)[0] + "-4194303")  # no such pid
        dead.write_bytes(b"left over")
        run([inputs / "s0.tar"], out)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pipe_input_that_reads_a_file_under_the_output_is_refused(inputs, tmp_path):
    out = tmp_path / "out"
    run([inputs / "s0.tar"], out)
    produced = OutputLayout(out).shard("s0.tar")
    before = produced.read_bytes()
    with pytest.raises(UserError, match="contains the input shard"):
        run([f"pipe:cat {produced}"], out, overwrite=True)
    assert produced.read_bytes() == before


def test_shard_names_too_long_for_their_temporary_files_are_refused_up_front(tmp_path):
    name = "n" * (MAX_NAME_BYTES - 4 + 1) + ".tar"
    write_shard(tmp_path / name, simple_samples("a", 1))
    with pytest.raises(UserError, match="longer than"):
        expand_inputs([str(tmp_path / name)])
    ok = "m" * (MAX_NAME_BYTES - 4) + ".tar"
    write_shard(tmp_path / ok, simple_samples("a", 1))
    run([tmp_path / ok], tmp_path / "out")  # the longest name that fits works end to end


def test_fifos_and_devices_are_not_inputs(inputs, tmp_path):
    os.mkfifo(inputs / "x.tar")
    assert [os.path.basename(p) for p in expand_inputs([str(inputs)])] == ["s0.tar", "s1.tar"]
    with pytest.raises(UserError, match="not a regular file"):
        expand_inputs([str(inputs / "x.tar")])
    with pytest.raises(UserError, match="not a regular file"):
        expand_inputs(["/dev/zero"])
