"""`--quiet` and `--log-json` behave the same in every command: stderr keeps only warnings
and errors under `--quiet`; the JSON file frames each run with `start` and `end` events
(exit status included) and holds every progress line as a record, whatever `--quiet` says."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from uge_protect.cli.app import app

runner = CliRunner()
#: Commands whose output is their stdout report, with no progress to silence.
REPORT_ONLY = {("inspect",)}


def _leaf_commands(command=None, path=()):
    command = command or typer.main.get_command(app)
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


def _events(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_command_takes_quiet_and_log_json():
    paths = []
    for path, command in _leaf_commands():
        if path in REPORT_ONLY:
            continue
        opts = {o for p in command.params for o in p.opts}
        assert {"--quiet", "-q", "--log-json"} <= opts, path
        paths.append(path)
    assert {("shard",), ("eval",), ("push",), ("fit", "em"), ("fit", "t2ue"), ("fit", "uge"), ("noise",),
            ("apply-noise",), ("demo-data",), ("photo-data",)} <= set(paths)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("logdemo")
    result = runner.invoke(app, ["demo-data", str(root / "data"), "--train", "48", "--test", "24", "--image-size",
                                 "16", "--per-shard", "24", "--log-json", str(root / "demo.jsonl")])
    assert result.exit_code == 0, result.output
    return root


def test_demo_data_logs_its_result_line(demo):
    events = _events(demo / "demo.jsonl")
    assert [e["event"] for e in (events[0], events[-1])] == ["start", "end"]
    assert events[0]["command"] == "demo-data" and events[-1]["exit_code"] == 0
    assert any(e["event"] == "log" and e["message"].startswith("wrote 48 train and 24 test") for e in events)


@pytest.mark.parametrize("quiet", [False, True])
def test_shard_fit_and_eval_log_the_same_way(demo, tmp_path, quiet):
    q = ["--quiet"] if quiet else []
    train = str(demo / "data" / "train" / "*.tar")
    steps = [
        ("shard", ["shard", train, "-o", str(tmp_path / "prot"), "-m", "random", "--workers", "0"], "run_end"),
        ("fit em", ["fit", "em", train, "-o", str(tmp_path / "art"), "--surrogate-width", "4", "--train-batches",
                    "1", "--max-rounds", "1", "--pgd-steps", "1", "--batch-size", "16"], "fit_saved"),
        ("eval", ["eval", "--protected", str(tmp_path / "prot"), "--clean-train", train, "--test",
                  str(demo / "data" / "test" / "*.tar"), "-o", str(tmp_path / "report"), "--arch", "mlp",
                  "--epochs", "1"], "log"),
    ]
    for name, args, expected in steps:
        log = tmp_path / f"{name}.jsonl"
        result = runner.invoke(app, [*args, *q, "--log-json", str(log)])
        assert result.exit_code == 0, result.output
        events = _events(log)
        assert (events[0]["event"], events[0]["command"]) == ("start", name)
        assert (events[-1]["event"], events[-1]["exit_code"]) == ("end", 0)
        assert any(e["event"] == expected for e in events), (name, [e["event"] for e in events])
        assert sum(e["level"] == "info" and e["event"] not in ("start", "end") for e in events) >= 1, name
        if quiet:  # progress and summary lines went to the file only
            assert result.stderr == "", (name, result.stderr)
        else:
            assert result.stderr.strip(), name
    assert "clean" in result.stdout  # eval's headline is on stdout under --quiet too


def test_a_refused_command_records_its_error_and_exit_status(tmp_path):
    log = tmp_path / "log.jsonl"
    result = runner.invoke(app, ["shard", str(tmp_path / "none-*.tar"), "-o", str(tmp_path / "out"), "-m", "random",
                                 "--quiet", "--log-json", str(log)])
    assert result.exit_code == 2
    (line,) = [x for x in result.stderr.splitlines() if x]
    assert line.startswith("error: ")
    events = _events(log)
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["level"] == "error" and errors[0]["error"] == line[len("error: "):]
    assert (events[-1]["event"], events[-1]["exit_code"]) == ("end", 2)
