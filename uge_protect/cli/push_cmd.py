"""``uge-protect push``: publish an output directory to a Hugging Face dataset repository."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from uge_protect.cli.common import LOG_JSON, QUIET, fail, logged_command, os_error_text
from uge_protect.errors import UserError

_log = logging.getLogger("uge_protect.cli")


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
    quiet: bool = QUIET,
    log_json: Optional[Path] = LOG_JSON,
) -> None:
    """Upload DIR to the Hub as a dataset (resumable, several commits), with a generated dataset card."""
    with logged_command("push", quiet, log_json):
        _push(directory, repo_id, private, revision, license, dry_run, not no_manifests, report, files_per_commit, quiet)


def _push(directory: Path, repo_id: str, private: bool, revision: Optional[str], license: str,
          dry_run: Optional[Path], include_manifests: bool, report: Optional[Path], files_per_commit: int,
          quiet: bool) -> None:
    from uge_protect.hub.push import push_output, stage_output

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        if dry_run is not None:
            plan = stage_output(directory, repo_id, dry_run, license=license,
                                include_manifests=include_manifests, report_dir=report)
            for warning in plan.warnings:
                _log.warning(warning)
            _log.info(f"staged {len(plan.files)} files ({plan.total_bytes / 1e6:.1f} MB) in {dry_run}; "
                      "nothing was uploaded")
            return
        result = push_output(directory, repo_id, private=private, revision=revision, license=license,
                             include_manifests=include_manifests, report_dir=report,
                             files_per_commit=files_per_commit)
    except UserError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(os_error_text(exc))
    where = f"https://huggingface.co/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")
    if result.uploaded:
        _log.info(f"uploaded {len(result.uploaded)} files ({result.uploaded_bytes / 1e6:.1f} MB) in {result.commits} "
                  f"commit(s); {len(result.skipped)} were already there: {where}")
    else:
        _log.info(f"nothing to upload: {repo_id} already holds all {len(result.skipped)} files: {where}")
