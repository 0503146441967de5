"""uge_protect.logs: one stderr handler, plain or JSON lines, found again at every emit."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from uge_protect.logs import ROOT, configure


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


def test_json_lines(capsys):
    configure(json_lines=True)
    logging.getLogger("uge_protect.x").info("done", extra={"rank": 1, "shard": "a.tar"})
    logging.getLogger("uge_protect.x").warning("late")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"level": "info", "logger": "uge_protect.x", "message": "done", "rank": 1, "shard": "a.tar"},
        {"level": "warning", "logger": "uge_protect.x", "message": "late"},
    ]
