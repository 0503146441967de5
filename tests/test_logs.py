"""uge_protect.logs: one stderr handler found again at every emit, and JSON lines to a file."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from uge_protect.logs import ROOT, configure, event, json_log


@pytest.fixture(autouse=True)
def _restore_logger():
    logger = logging.getLogger(ROOT)
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_plain_lines_on_the_current_stderr_and_idempotent(monkeypatch):
    configure()
    configure()
    assert len(logging.getLogger(ROOT).handlers) == 1
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)  # as CliRunner does, after configure
    logging.getLogger("uge_protect.eval.runner").info("epoch %d/%d", 2, 2)
    assert swapped.getvalue() == "epoch 2/2\n"


def test_quiet_keeps_warnings_only(capsys):
    configure(quiet=True)
    log = logging.getLogger("uge_protect.x")
    log.info("progress")
    log.warning("something")
    log.error("broken")
    assert capsys.readouterr().err == "warning: something\nerror: broken\n"


def test_json_lines_to_a_file_whatever_quiet_says(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    configure(quiet=True, log_json=str(path))
    log = logging.getLogger("uge_protect.x")
    log.info("done", extra={"shard": "a.tar"})
    log.warning("late")
    event(log, "shard_done", shard="b.tar", written=3)  # machines only: not on stderr
    event(log, "end", "all done", written=5)
    assert capsys.readouterr().err == "warning: late\n"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        assert isinstance(line.pop("time"), float)
    assert lines == [
        {"level": "info", "logger": "uge_protect.x", "message": "done", "rank": 0, "event": "log", "shard": "a.tar"},
        {"level": "warning", "logger": "uge_protect.x", "message": "late", "rank": 0, "event": "log"},
        {"level": "info", "logger": "uge_protect.x", "message": "shard_done", "rank": 0, "event": "shard_done",
         "shard": "b.tar", "written": 3},
        {"level": "info", "logger": "uge_protect.x", "message": "all done", "rank": 0, "event": "end", "written": 5},
    ]


def test_event_message_on_stderr_and_other_ranks_write_their_own_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    path = tmp_path / "log.jsonl"
    configure(log_json=str(path))
    event(logging.getLogger("uge_protect.x"), "end", "finished", written=2)
    assert capsys.readouterr().err == "finished\n"
    assert not path.exists()
    (line,) = Path(f"{path}.rank1").read_text().splitlines()
    assert json.loads(line)["rank"] == 1 and json.loads(line)["written"] == 2


def test_json_log_for_one_call_in_library_use(tmp_path):
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = []
    logger.setLevel(logging.NOTSET)  # nothing configured: records below WARNING are dropped
    path = tmp_path / "log.jsonl"
    with json_log(str(path)):
        logging.getLogger("uge_protect.x").info("inside")
    logging.getLogger("uge_protect.x").info("after")
    assert [json.loads(line)["message"] for line in path.read_text().splitlines()] == ["inside"]
    assert logger.handlers == [] and logger.level == logging.NOTSET
