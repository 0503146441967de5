"""The ``uge-protect`` command line: thin commands over the Python API."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer

from uge_protect.cli.common import LOG_JSON, QUIET, error_line, fail, logged_command, one_error_line, os_error_text
from uge_protect.cli.options import Source, cli_options, command_with_options, given_values, parameter
from uge_protect.errors import RunFailed, Terminated, UserError
from uge_protect.methods.registry import apply_option_sources
from uge_protect.options import help_of
from uge_protect.pipeline.config import MethodOptions, ShardJobConfig
from uge_protect.shards.decode import DEFAULT_MAX_PIXELS

_log = logging.getLogger("uge_protect.cli")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Protect image-text WebDataset shards against unauthorized training.",
    pretty_exceptions_enable=False,
)


#: True in a process started for one command (``main``): stop signals after the command are ignored.
_ENDS_WITH_THE_COMMAND = False


@app.callback()
def _root() -> None:
    """Protect image-text WebDataset shards against unauthorized training."""



#: ``shard``'s options: the run's, every method's, and each method's own from its registry
#: entry (labelled with the method's name in the help).
SHARD_SOURCES: tuple[Source, ...] = ((ShardJobConfig, None), (MethodOptions, None), *apply_option_sources())
_SHARD_OPTIONS = cli_options(*SHARD_SOURCES)
_JOB_FIELDS = {f.name for f in dataclasses.fields(ShardJobConfig)}


def _shard(values: dict[str, Any], inputs: List[str], output: Path, method: str, artifact: Optional[Path]) -> None:
    """Protect every image of the input shards into OUTPUT (one output shard per input shard)."""
    from uge_protect.pipeline.lifecycle import sigterm_stops_the_run

    quiet = bool(values["quiet"])
    # Until the run begins a stop signal raises at once; the run sets where it may raise.
    with logged_command("shard", quiet, values["log_json"]):
        with sigterm_stops_the_run(at_once=True, ignore_when_done=_ENDS_WITH_THE_COMMAND):
            summary = _run_shard(values, inputs, output, method, artifact)
        if summary and "counts" in summary:
            _print_summary(summary, output)


def _run_shard(values: dict[str, Any], inputs: List[str], output: Path, method: str,
               artifact: Optional[Path]) -> dict[str, Any] | None:
    """The run of ``shard``, each failure as one ``error:`` line and its exit status."""
    from uge_protect.methods.registry import create_method
    from uge_protect.pipeline import run_shard_job
    from uge_protect.pipeline.lifecycle import stop_point, stop_requested

    try:
        given = {k: v for k, v in given_values(_SHARD_OPTIONS, values).items() if v is not None}
        job = {k: v for k, v in given.items() if k in _JOB_FIELDS}
        method_options = {k: v for k, v in given.items() if k not in _JOB_FIELDS}
        method_obj = create_method(method, str(artifact) if artifact else None, **method_options)
        cfg = ShardJobConfig(inputs=list(inputs), output=str(output), **job)
        if cfg.lossy:
            _log.warning(f"{cfg.image_format} output is lossy and weakens the protection; "
                         "this is recorded in the manifests")
        summary = run_shard_job(cfg, method_obj)
        stop_point()  # a signal after the run finished still means the command was stopped
        return summary
    except RunFailed as exc:  # written, but not acceptable as it is
        _print_summary(exc.summary, output)
        fail(str(exc), code=1)
    except (UserError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:  # disk full, permissions changed mid-run, ...
        if stop_requested() is not None:  # e.g. writing to the terminal SIGHUP said was closed
            _interrupted(stop_requested())
        fail(f"{os_error_text(exc)} (rerun to resume)")
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (Terminated)
        _interrupted(exc.signum if isinstance(exc, Terminated) else signal.SIGINT)


app.command("shard")(command_with_options(_shard, [
    parameter("inputs", List[str], typer.Argument(..., help=help_of(ShardJobConfig, "inputs"))),
    parameter("output", Path, typer.Option(..., "--output", "-o", help=help_of(ShardJobConfig, "output"))),
    parameter("method", str, typer.Option(..., "--method", "-m", help=(
        "Protection method (see README; `random` is a non-protecting control)."))),
    parameter("artifact", Optional[Path], typer.Option(None, "--artifact", help="Artifact directory made by `uge-protect fit`.")),
], _SHARD_OPTIONS, _shard.__doc__ or ""))


def _interrupted(signum: int) -> NoReturn:
    """One ``error:`` line (if stderr is still there: SIGHUP closes the terminal), exit 128 + signum."""
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    with contextlib.suppress(OSError):
        error_line(f"interrupted{by}; rerun the same command to resume")
    raise typer.Exit(code=128 + signum)


def _print_summary(summary: dict, output: Path) -> None:
    c = summary["counts"]
    t = summary["timings"]
    _log.info(
        f"protected {c['written']} of {c['samples']} samples in {c['shards']} shards "
        f"({c['failed']} failed{': ' + ', '.join(f'{k} {v}' for k, v in summary['failures'].items()) if c['failed'] else ''}); "
        f"{t['images_per_second']} img/s this run; output: {output}"
    )


@app.command()
def inspect(
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


@app.command("demo-data")
def demo_data(
    directory: Path = typer.Argument(..., help="Where to write train/ and test/ shards."),
    n_train: int = typer.Option(5000, "--train", help="Training samples."),
    n_test: int = typer.Option(1000, "--test", help="Test samples."),
    image_size: int = typer.Option(32, "--image-size", help="Image side in pixels."),
    per_shard: int = typer.Option(1000, "--per-shard", help="Samples per shard."),
    seed: int = typer.Option(0, "--seed", help="Generator seed."),
    quiet: bool = QUIET,
    log_json: Optional[Path] = LOG_JSON,
) -> None:
    """Write the embedded, deterministic demo image-text dataset."""
    from uge_protect.shards.demo import write_demo_dataset

    with logged_command("demo-data", quiet, log_json), one_error_line():
        summary = write_demo_dataset(
            directory, n_train=n_train, n_test=n_test, image_size=image_size,
            samples_per_shard=per_shard, seed=seed,
        )
        _log_dataset_written(summary, directory, image_size)


def _log_dataset_written(summary: dict[str, Any], directory: Path, image_size: int) -> None:
    splits = summary["splits"]
    _log.info(
        f"wrote {splits['train']['n']} train and {splits['test']['n']} test samples "
        f"({len(summary['classes'])} classes, {image_size}x{image_size}) to {directory}/train and {directory}/test"
    )


@app.command("photo-data")
def photo_data(
    directory: Path = typer.Argument(..., help="Where to write train/ and test/ shards, classes.json and photos.json."),
    train_per_class: int = typer.Option(200, "--train-per-class", help="Training crops per photograph (class)."),
    test_per_class: int = typer.Option(80, "--test-per-class", help="Test crops per photograph (class)."),
    image_size: int = typer.Option(32, "--image-size", help="Image side in pixels."),
    per_shard: int = typer.Option(1000, "--per-shard", "--shard-size", help="Samples per shard."),
    seed: int = typer.Option(0, "--seed", help="Generator seed."),
    photos: Optional[List[Path]] = typer.Option(None, "--photos", help="Directory holding the photographs (usr/share/backgrounds or a root above it; repeatable). Default: /usr/share/backgrounds, then .cache/photos (`make photos`)."),
    quiet: bool = QUIET,
    log_json: Optional[Path] = LOG_JSON,
) -> None:
    """Write the benchmark of real photographs with captions (crops of Debian wallpapers; test crops from regions never used in training)."""
    from uge_protect.shards.photos import write_photo_dataset

    with logged_command("photo-data", quiet, log_json), one_error_line():
        summary = write_photo_dataset(
            directory, train_per_class=train_per_class, test_per_class=test_per_class,
            image_size=image_size, samples_per_shard=per_shard, seed=seed,
            photo_dirs=list(photos) if photos else None,
        )
        for name, counts in summary["counts"].items():
            _log.info(f"{name:>16}: {counts['train']} train, {counts['test']} test")
        _log_dataset_written(summary, directory, image_size)


from uge_protect.cli.eval_cmd import eval_command  # noqa: E402

app.command("eval")(eval_command)


from uge_protect.cli.zero_contact_cmd import apply_noise_command, noise_command  # noqa: E402

app.command("noise")(noise_command)
app.command("apply-noise")(apply_noise_command)

from uge_protect.cli.push_cmd import push_command  # noqa: E402

app.command("push")(push_command)

from uge_protect.cli.fit_cmd import fit_app  # noqa: E402

app.add_typer(fit_app, name="fit", help="Fit a method on training shards and save an artifact for `shard --artifact`.")


def main() -> None:
    """Console-script entry point."""
    global _ENDS_WITH_THE_COMMAND
    _ENDS_WITH_THE_COMMAND = True
    app()


if __name__ == "__main__":
    main()
