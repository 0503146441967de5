"""``uge-protect eval``: train on protected and on clean shards, report accuracy on clean test shards.

Its options are built from :class:`uge_protect.eval.config.EvalConfig`'s fields
(:mod:`uge_protect.cli.options`); this module adds the logging options and the summary lines.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from uge_protect.cli.common import logged_command, one_error_line, output_parameters
from uge_protect.cli.options import cli_options, command_with_options, given_values
from uge_protect.eval.config import EvalConfig

_log = logging.getLogger("uge_protect.cli")
_OPTIONS = cli_options((EvalConfig, None))


def _eval(values: dict[str, Any], quiet: bool, log_json: Path | None) -> None:
    """Train models on the protected and on the clean shards; compare them on clean test shards."""
    from uge_protect.eval.protocol import headline_text
    from uge_protect.eval.runner import run_evaluation

    with logged_command("eval", quiet, log_json):
        with one_error_line():
            given = {k: v for k, v in given_values(_OPTIONS, values).items() if v is not None}
            report = run_evaluation(EvalConfig(**given))
        _log_summary(report, Path(values["output"]))
    typer.echo(headline_text(report))


def _log_summary(report: dict[str, Any], output: Path) -> None:
    """One line per classifier row (clean and protected accuracy), then where the report is."""
    cls = report["tasks"].get("classify")
    for row in (cls or {}).get("summary", []):
        c = row["clean"]["final_test_acc"]["mean"]
        p = row["protected"]["final_test_acc"]["mean"]
        note = row["role"] + ("" if row["learned"] else ", did not learn")
        _log.info(f"{row['defense']:>12} {row['arch']:<14} clean {100 * c:5.1f}%  protected {100 * p:5.1f}%  ({note})")
    _log.info(f"wrote {output / 'report.json'}, {output / 'report.md'} and figures")


eval_command = command_with_options(_eval, [], _OPTIONS, _eval.__doc__ or "", output_parameters())
