"""The command line: thin commands, one-line errors, exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from uge_protect.cli.app import app
from uge_protect.shards.layout import OutputLayout

runner = CliRunner()


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_help_lists_commands_and_not_passthrough():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("shard", "inspect", "demo-data"):
        assert command in result.output
    result = runner.invoke(app, ["shard", "--help"])
    assert result.exit_code == 0 and "--method" in result.output


def test_shard_then_inspect(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=4)
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shards[0].parent / "data-{000000..000001}.tar"),
                                 "-o", str(out), "-m", "random", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "protected 8 of 8 samples in 2 shards" in result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["counts"]["written"] == 8 and report["problems"] == []


def test_passthrough_is_not_a_cli_method(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=1)
    result = runner.invoke(app, ["shard", str(shards[0]), "-o", str(tmp_path / "o"), "-m", "passthrough"])
    assert result.exit_code != 0
    assert _error_lines(result) == ["error: unknown method 'passthrough'; choose one of: em, random, t2ue, uge"]
    assert not (tmp_path / "o").exists()


def test_bad_options_give_one_error_line(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=1)
    for extra, needle in (
        (["--image-format", "gif"], "unknown image format"),
        (["--resize-mode", "center_crop"], "needs --image-size"),
        (["--image-format", "jpeg"], "--allow-lossy"),
    ):
        result = runner.invoke(app, ["shard", str(shards[0]), "-o", str(tmp_path / "o"), "-m", "random", *extra])
        assert result.exit_code != 0
        lines = _error_lines(result)
        assert len(lines) == 1 and needle in lines[0], result.output
        assert "Traceback" not in result.output


def test_inspect_fails_on_mismatch_and_on_non_output(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=3)
    out = tmp_path / "out"
    assert runner.invoke(app, ["shard", str(shards[0]), "-o", str(out), "-m", "random", "-q", "--workers", "0"]).exit_code == 0
    sizes = OutputLayout(out).sizes_file
    sizes.write_text(json.dumps({shards[0].name: 2}))
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1 and "verification FAILED" in result.output and "sizes.json says 2" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "not a uge-protect output directory" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code != 0 and _error_lines(result)
