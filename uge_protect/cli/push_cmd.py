"""``uge-protect push``: publish an output directory to a Hugging Face dataset repository."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from uge_protect.cli.common import fail
from uge_protect.errors import UserError


class _EchoHandler(logging.Handler):
    """Log records as the command's stderr lines, warnings as ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            typer.echo(f"warning: {msg}" if record.levelno >= logging.WARNING else msg, err=True)
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise
            self.handleError(record)


@contextmanager
def _hub_messages(quiet: bool) -> Iterator[None]:
    """Show what ``uge_protect.hub`` logs while the command runs: progress and warnings, or only
    warnings with ``--quiet``."""
    logger = logging.getLogger("uge_protect.hub")
    handler = _EchoHandler(logging.WARNING if quiet else logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(handler.level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def push_command(
    directory: Path = typer.Argument(..., help="An output directory of `uge-protect shard`."),
    repo_id: str = typer.Argument(..., help="Dataset repository: OWNER/NAME (created if absent)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created from main if absent). Default: main."),
    license: str = typer.Option("unknown", "--license", help="License id for the card (e.g. cc-by-4.0, mit, other). Default: unknown."),
    dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write the folder that would be uploaded into this new folder; upload nothing."),
    no_manifests: bool = typer.Option(False, "--no-manifests", help="Leave the parquet manifests (and their config) out."),
    report: Optional[Path] = typer.Option(None, "--report", help="Evaluation report directory to publish (default: DIR/eval, or the one report directory inside DIR)."),
    files_per_commit: int = typer.Option(50, "--files-per-commit", help="Files per commit (the Hub advises < 100)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Upload DIR to the Hub as a dataset (resumable, several commits), with a generated dataset card."""
    from uge_protect.hub.push import push_output, stage_output

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()

    def say(msg: str) -> None:
        if not quiet or msg.startswith("warning:"):
            typer.echo(msg, err=True)

    try:
        if dry_run is not None:
            plan = stage_output(directory, repo_id, dry_run, license=license,
                                include_manifests=not no_manifests, report_dir=report)
            for warning in plan.warnings:
                say(f"warning: {warning}")
            say(f"staged {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB) in {dry_run}; nothing was uploaded")
            return
        with _hub_messages(quiet):
            result = push_output(directory, repo_id, private=private, revision=revision, license=license,
                                 include_manifests=not no_manifests, report_dir=report,
                                 files_per_commit=files_per_commit)
    except UserError as exc:
        fail(str(exc))
        return
    except OSError as exc:
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return
    where = f"https://huggingface.co/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")
    if result.uploaded:
        say(f"uploaded {len(result.uploaded)} files ({result.uploaded_bytes / 1e6:.1f} MB) in {result.commits} "
            f"commit(s); {len(result.skipped)} were already there: {where}")
    else:
        say(f"nothing to upload: {repo_id} already holds all {len(result.skipped)} files: {where}")
