"""Finding input shards: paths, globs, brace patterns, directories, URLs."""

from __future__ import annotations

import pytest

from uge_protect.errors import UserError
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.shards.discover import expand_inputs, shard_name
from uge_protect.shards.layout import OutputLayout
from uge_protect.methods.registry import create_method


def test_paths_globs_braces_and_directories(make_shards):
    shards = make_shards(n_shards=3, per_shard=1)
    d = shards[0].parent
    expected = [str(p) for p in shards]
    assert expand_inputs([str(d / "data-{000000..000002}.tar")]) == expected
    assert expand_inputs([str(d / "*.tar")]) == expected
    assert expand_inputs([str(d)]) == expected
    assert expand_inputs([str(shards[2]), str(shards[0]), str(shards[2])]) == [expected[0], expected[2]]


def test_errors_name_the_problem(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=1)
    with pytest.raises(UserError, match="input shard not found: .*nope.tar"):
        expand_inputs([str(tmp_path / "nope.tar")])
    with pytest.raises(UserError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.tgz")])
    with pytest.raises(UserError, match="no input shards"):
        expand_inputs([])
    other = tmp_path / "other"
    other.mkdir()
    (other / shards[0].name).write_bytes(shards[0].read_bytes())
    with pytest.raises(UserError, match="share the shard name"):
        expand_inputs([str(shards[0]), str(other / shards[0].name)])
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(UserError, match="not a .tar shard"):
        expand_inputs([str(tmp_path / "x.zip")])


def test_remote_specs_pass_through_and_are_named_by_their_last_path_part():
    assert expand_inputs(["https://host/d/data-{000..001}.tar"]) == [
        "https://host/d/data-000.tar", "https://host/d/data-001.tar"]
    assert shard_name("pipe:curl -s https://host/d/data-007.tar") == "data-007.tar"


def test_pipe_input_is_read_through_webdataset_opener(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=3)
    out = tmp_path / "out"
    cfg = ShardJobConfig(inputs=[f"pipe:cat {shards[0]}"], output=str(out), num_workers=0, quiet=True)
    summary = run_shard_job(cfg, create_method("random"))
    assert summary["counts"]["written"] == 3
    assert OutputLayout(out).shard(shards[0].name).is_file()
