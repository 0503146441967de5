"""Helpers shared by the CLI commands."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, NoReturn

import typer

from uge_protect.errors import UserError


def fail(message: str) -> NoReturn:
    """Print one ``error:`` line on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


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
