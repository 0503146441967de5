"""What the commands tell their user: one handler on the ``uge_protect`` logger.

Modules log through ``logging.getLogger(__name__)``; a command calls :func:`configure` once
when it starts. Plain mode writes each message as one line on stderr, a warning as
``warning: message`` and an error as ``error: message`` (so a record's text never repeats its
level); ``json_lines`` writes one JSON object per record instead (``level``, ``logger``,
``message`` and any ``extra=`` fields). Library use configures nothing, so a program that
embeds the package keeps control of its logging.
"""

from __future__ import annotations

import json
import logging
import sys

ROOT = "uge_protect"

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when it was created
    (test runners and typer's CliRunner swap it for each command)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging's own policy: report, never raise
            self.handleError(record)


class PlainFormatter(logging.Formatter):
    """The message, after ``warning: `` or ``error: `` for records at those levels."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            text = "error: " + text
        elif record.levelno >= logging.WARNING:
            text = "warning: " + text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS and k not in out)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(quiet: bool = False, json_lines: bool = False) -> None:
    """Send the package's log records to stderr: INFO and up (WARNING and up when ``quiet``),
    as plain message lines or as JSON lines. Calling it again replaces the previous settings."""
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonLineFormatter() if json_lines else PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
