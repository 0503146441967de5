"""What the commands tell their user: handlers on the ``uge_protect`` logger.

Modules log through ``logging.getLogger(__name__)``, and report machine-readable steps
(a shard done, a fit step, the end of a run) with :func:`event`. A command calls
:func:`configure` once when it starts; every command takes the same two options:

* ``--quiet``: stderr shows warnings and errors only, no progress and no summary (what a
  command prints on stdout, such as ``eval``'s headline, is unchanged);
* ``--log-json FILE``: every record at INFO and up, events included, is appended to FILE as
  one JSON object per line (``time``, ``level``, ``logger``, ``message``, ``rank``,
  ``event``: the event's name, ``log`` for a plain record, and the event's fields), whatever ``--quiet`` says. Under a multi-process launch,
  process ``r > 0`` writes ``FILE.rank<r>``.

Plain stderr lines are the message, a warning as ``warning: message`` and an error as
``error: message``; events that carry no message for people (a shard done: the bar shows
it) are left out of stderr. Library use configures nothing, so a program that embeds the
package keeps control of its logging; :func:`json_log` adds the JSON file for one call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any, Iterator

ROOT = "uge_protect"

#: The help of every command's ``--log-json`` (and of ``ShardJobConfig.log_json``).
LOG_JSON_HELP = ("Append one JSON object per log record and event (start, progress, end, with counts) "
                 "to this file; process r > 0 of a launch writes FILE.rank<r>.")
QUIET_HELP = "Only warnings and errors on stderr (no progress, no summary); stdout is unchanged."

_EVENT = "uge_event"
_FIELDS = "uge_fields"
_SHOWN = "uge_shown"

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def process_rank() -> int:
    """This process's rank under a multi-process launch (torchrun, accelerate), else 0."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def event(logger: logging.Logger, name: str, message: str | None = None, /, *, level: int = logging.INFO,
          **fields: Any) -> None:
    """Log event ``name`` with ``fields`` (at INFO unless ``level``): a JSON line for
    ``--log-json``; on stderr ``message`` when one is given (none: for machines only)."""
    logger.log(level, message if message is not None else name,
               extra={_EVENT: name, _FIELDS: fields, _SHOWN: message is not None})


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when it was created
    (test runners and typer's CliRunner swap it for each command)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, _SHOWN, True):
            return
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging's own policy: report, never raise
            self.handleError(record)


class _JsonFileHandler(logging.FileHandler):
    """Appends JSON lines to a file (see :class:`JsonLineFormatter`)."""

    def __init__(self, path: str, rank: int):
        super().__init__(path if rank == 0 else f"{path}.rank{rank}", mode="a", encoding="utf-8")
        self.setFormatter(JsonLineFormatter(rank))
        self.setLevel(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()


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
    """One JSON object per record: time, level, logger, message, the process's rank, an
    event's name and fields, and any other ``extra=`` fields of the record."""

    def __init__(self, rank: int = 0):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage(), "rank": self.rank}
        out["event"] = getattr(record, _EVENT, "log")  # a plain log record: event "log"
        if hasattr(record, _EVENT):
            out.update((k, v) for k, v in getattr(record, _FIELDS).items() if k not in ("time", "level", "logger", "message"))
        out.update((k, v) for k, v in vars(record).items()
                   if k not in _RECORD_FIELDS and k not in out and not k.startswith("uge_"))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(quiet: bool = False, log_json: str | None = None) -> None:
    """Send the package's log records to stderr (INFO and up; WARNING and up when ``quiet``)
    and, with ``log_json``, every record at INFO and up to that file as JSON lines. Calling
    it again replaces the previous settings."""
    logger = logging.getLogger(ROOT)
    for old in [h for h in logger.handlers if isinstance(h, (_StderrHandler, _JsonFileHandler))]:
        logger.removeHandler(old)
        old.close()
    handler = _StderrHandler(logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(PlainFormatter())
    logger.addHandler(handler)
    if log_json:
        logger.addHandler(_JsonFileHandler(log_json, process_rank()))
    logger.setLevel(logging.INFO)


def json_logging() -> bool:
    """Whether records of the package go to a JSON-lines file now."""
    return any(isinstance(h, _JsonFileHandler) for h in logging.getLogger(ROOT).handlers)


def _json_log_configured(path: str, rank: int) -> bool:
    """Whether :func:`configure` already sends the records to the JSON file ``path``."""
    target = os.path.abspath(path if rank == 0 else f"{path}.rank{rank}")
    return any(isinstance(h, _JsonFileHandler) and h.baseFilename == target
               for h in logging.getLogger(ROOT).handlers)


@contextlib.contextmanager
def json_log(path: str | None, rank: int | None = None) -> Iterator[None]:
    """While inside, also append the package's records at INFO and up to ``path`` (process
    ``rank``, default :func:`process_rank`) as JSON lines; nothing when ``path`` is None or
    :func:`configure` already does."""
    rank = process_rank() if rank is None else rank
    if not path or _json_log_configured(path, rank):
        yield
        return
    logger = logging.getLogger(ROOT)
    handler = _JsonFileHandler(path, rank)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
