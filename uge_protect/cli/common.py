"""Helpers shared by the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer

from uge_protect.errors import UserError


def fail(message: str) -> NoReturn:
    """Print one ``error:`` line on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


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
