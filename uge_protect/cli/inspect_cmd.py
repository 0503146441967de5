"""``uge-protect inspect``: summarise and verify an output directory, which it does not trust."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

import typer

from uge_protect.cli.common import fail
from uge_protect.errors import UserError
from uge_protect.shards.decode import DEFAULT_MAX_PIXELS


def inspect_command(
    directory: Path = typer.Argument(..., help="An output directory of `uge-protect shard`."),
    no_sources: bool = typer.Option(False, "--no-sources", help="Skip re-reading the source shards."),
    sources: Optional[List[str]] = typer.Option(
        None, "--sources",
        help="Source shards to compare with (paths, globs, {000..099} patterns; repeatable), matched to output "
        "shards by name. Without it only recorded sources that are local files are compared.",
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, "--max-pixels",
        help="Most pixels a source image may decode to when sources are compared (as `shard --max-pixels`); "
        "sources of a run.json that allows more are not compared.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Summarise and verify an output directory; exits 1 on any mismatch.

    Nothing named inside DIRECTORY is executed or fetched."""
    from uge_protect.pipeline.inspect import inspect_output

    if not directory.is_dir():
        fail(f"output directory not found: {directory}")
    try:
        report = inspect_output(directory, check_sources=not no_sources, sources=sources or None, max_pixels=max_pixels)
    except UserError as exc:
        fail(str(exc))
    typer.echo(_report_json(report) if as_json else _format_report(report))
    if report["problems"]:
        raise typer.Exit(code=1)


#: Shards listed by name when their source was not compared.
_LISTED = 10


#: What must not reach a terminal from the (untrusted) directory: C0 controls (newlines,
#: escapes), DEL and C1 controls, and lone surrogates (from undecodable names; unprintable).
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: The same, less the C0 controls that json escapes itself.
_UNSAFE_JSON = re.compile(r"[\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """``text`` safe to print on one line: control characters become ``\\xNN``, lone
    surrogates ``\\uXXXX``."""
    return _UNSAFE_TEXT.sub(_escape, text)


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\u{code:04x}" if code >= 0xD800 else f"\\x{code:02x}"


def _report_json(report: dict) -> str:
    """The report as JSON whose text holds no control character: json escapes C0 controls,
    and DEL, C1 controls and lone surrogates become ``\\uXXXX`` escapes here (they only ever
    occur inside strings, so the JSON decodes to the same report)."""
    text = json.dumps(report, indent=2, ensure_ascii=False)
    return _UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _format_report(report: dict) -> str:
    """The report as text. Every line passes through :func:`printable`: names, keys, reasons
    and methods come from the (untrusted) directory, and a newline or terminal escape in one
    must not forge a line or reach the terminal."""
    return "\n".join(printable(line) for line in _report_lines(report))


def _report_lines(report: dict) -> list[str]:
    if "counts" not in report:
        return [f"problem: {p}" for p in report["problems"]]
    c = report["counts"]
    lines = [
        f"directory: {report['directory']}",
        f"method: {json.dumps(report['method'])}",
        f"shards: {c.get('shards', 0)}  samples: {c.get('samples', 0)}  written: {c.get('written', 0)}  failed: {c.get('failed', 0)}",
    ]
    if report["failures"]:
        lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in report["failures"].items()))
    if c.get("skipped_members"):
        lines.append("skipped tar members (no files): " + ", ".join(f"{k} {v}" for k, v in report["skipped_members"].items()))
    lines.append(f"budget: {report['budget_levels']} levels; L∞ histogram: {report['linf_histogram']}")
    if report["psnr"]:
        p = report["psnr"]
        lines.append(f"PSNR dB: min {p['min']:.2f}  median {p['median']:.2f}  mean {p['mean']:.2f}")
    n_shards = c.get("shards", 0)
    lines.append(f"sources re-read and compared for {report['sources_checked']} of {n_shards} shards")
    not_compared = report["sources_not_compared"]
    for name, why in list(not_compared.items())[:_LISTED]:
        lines.append(f"  source not compared for {name}: {why}")
    if len(not_compared) > _LISTED:
        lines.append(f"  … and {len(not_compared) - _LISTED} more shards not compared")
    lines.extend(f"warning: {w}" for w in report["warnings"])
    if report["problems"]:
        lines.append(f"verification FAILED ({len(report['problems'])} problems):")
        lines.extend(f"  - {p}" for p in report["problems"])
    elif report["warnings"]:
        n = len(report["warnings"])
        lines.append(f"verification passed with {n} warning{'s' if n != 1 else ''} (see above)")
    else:
        lines.append("verification passed")
    return lines
