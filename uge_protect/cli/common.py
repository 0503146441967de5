"""Helpers shared by the CLI commands."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Iterator, NoReturn, Optional

import typer

from uge_protect.errors import UserError
from uge_protect.logs import LOG_JSON_HELP, QUIET_HELP, configure, event, json_logging

_log = logging.getLogger("uge_protect.cli")


def error_line(message: str) -> None:
    """Print one ``error:`` line on stderr (and an ``error`` event for ``--log-json``)."""
    typer.echo(f"error: {message}", err=True)
    if json_logging():
        event(_log, "error", level=logging.ERROR, error=message)


def fail(message: str, code: int = 2) -> NoReturn:
    """One ``error:`` line (:func:`error_line`), then exit with status ``code``."""
    error_line(message)
    raise typer.Exit(code=code)


def os_error_text(exc: OSError) -> str:
    """An :class:`OSError` in one line: what went wrong and the file it names."""
    return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"


@contextlib.contextmanager
def one_error_line() -> Iterator[None]:
    """A :class:`UserError`, ``ValueError`` or ``OSError`` raised inside becomes one ``error:``
    line and exit status 2 (:func:`fail`)."""
    try:
        yield
    except (UserError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(os_error_text(exc))


def class_names_option(value: str) -> list[str]:
    """Class names from a JSON list file, a file with one name per line, or a comma-separated list."""
    path = Path(value)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            names = json.loads(text)
        except ValueError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"--class-names file {value} must hold a JSON list of strings or one name per line")
        return names
    return [n.strip() for n in value.split(",") if n.strip()]


#: Every command's ``--quiet`` and ``--log-json`` (see :mod:`uge_protect.logs`).
QUIET = typer.Option(False, "--quiet", "-q", help=QUIET_HELP)
LOG_JSON = typer.Option(None, "--log-json", metavar="FILE", help=LOG_JSON_HELP)


def output_parameters() -> list[inspect.Parameter]:
    """``--quiet`` and ``--log-json`` as parameters of a command built from a signature."""
    return [inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=QUIET, annotation=bool),
            inspect.Parameter("log_json", inspect.Parameter.KEYWORD_ONLY, default=LOG_JSON,
                              annotation=Optional[Path])]


@contextlib.contextmanager
def logged_command(name: str, quiet: bool, log_json: Path | str | None) -> Iterator[None]:
    """Run a command with the package's logging configured (:func:`uge_protect.logs.configure`):
    ``start`` and ``end`` events (the exit status and seconds) frame what the command logs."""
    configure(quiet=quiet, log_json=str(log_json) if log_json else None)
    started = time.perf_counter()
    event(_log, "start", command=name)
    code: int = 0
    try:
        yield
    except typer.Exit as exc:
        code = exc.exit_code
        raise
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    except BaseException:
        code = 1
        raise
    finally:
        event(_log, "end", command=name, exit_code=code, seconds=round(time.perf_counter() - started, 3))
