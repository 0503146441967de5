"""The ``uge-protect`` command line: thin commands over the Python API."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from uge_protect.cli.common import class_names_option, fail
from uge_protect.errors import RunFailed, Terminated, UserError

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



@app.command()
def shard(
    inputs: List[str] = typer.Argument(..., help="Input tar shards: paths, globs, {000..099} patterns or URLs."),
    output: Path = typer.Option(..., "--output", "-o", help="Output directory."),
    method: str = typer.Option(..., "--method", "-m", help="Protection method (see README; `random` is a non-protecting control)."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Artifact directory made by `uge-protect fit`."),
    epsilon: float = typer.Option(8 / 255, "--epsilon", help="L∞ budget in [0,1] image units (default 8/255)."),
    seed: int = typer.Option(0, "--seed", help="Seed for per-sample randomness (combined with each key)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per accelerator pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes that read and decode."),
    encode_threads: int = typer.Option(2, "--encode-threads", help="Threads that encode protected images (0: encode in the main thread)."),
    image_format: str = typer.Option("png", "--image-format", help="png (default), webp (lossless) or jpeg (lossy)."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Accept lossy output (jpeg, lossy webp): weakens protection."),
    quality: int = typer.Option(95, "--quality", help="Quality of lossy formats."),
    png_compression: int = typer.Option(1, "--png-compression", help="PNG zlib level 0-9 (1: fast, larger files)."),
    png_strategy: str = typer.Option("huffman", "--png-strategy", help="zlib strategy: huffman (fast, small for perturbed images), default, filtered, rle."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize to this training resolution first."),
    resize_mode: str = typer.Option("none", "--resize-mode", help="none | center_crop | keep_ratio."),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", help="Reject images with more pixels (decompression bombs)."),
    max_batch_pixels: int = typer.Option(64_000_000, "--max-batch-pixels", help="Most decoded pixels per batch (bounds memory; output unchanged)."),
    max_sample_bytes: int = typer.Option(256 << 20, "--max-sample-bytes", help="Most bytes of one sample's members; larger samples fail unread (sample_too_large)."),
    caption_field: Optional[str] = typer.Option(None, "--caption-field", help="Read captions from this json field instead of txt."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="Read labels from this json field instead of cls."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", help="no | fp16 | bf16 for the method's pass."),
    mode: Optional[str] = typer.Option(None, "--mode", help="t2ue: sample (noise from each caption, z from the key; default) or class (from the label's class prompt, one z per class)."),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="t2ue class mode: comma-separated names, or a JSON list file (e.g. classes.json), in label order."),
    template: Optional[str] = typer.Option(None, "--template", help="t2ue class mode: prompt template with {} for the class name (default 'a photo of a {}')."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace output of a different configuration."),
    max_failure_rate: float = typer.Option(0.5, "--max-failure-rate", help="Exit 1 when a larger share of the samples failed (0-1; 1: never)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    log_json: Optional[Path] = typer.Option(None, "--log-json", help="Append JSON-lines progress events to this file."),
) -> None:
    """Protect every image of the input shards into OUTPUT (one output shard per input shard)."""
    from uge_protect.pipeline import ShardJobConfig, run_shard_job
    from uge_protect.pipeline.lifecycle import sigterm_stops_the_run, stop_point, stop_requested
    from uge_protect.methods.registry import create_method

    # Until the run begins a stop signal raises at once; the run sets where it may raise.
    with sigterm_stops_the_run(at_once=True, ignore_when_done=_ENDS_WITH_THE_COMMAND):
        try:
            method_options = {k: v for k, v in (("mode", mode), ("template", template)) if v is not None}
            if class_names is not None:
                method_options["class_names"] = class_names_option(class_names)
            method_obj = create_method(method, str(artifact) if artifact else None, epsilon=epsilon, **method_options)
            cfg = ShardJobConfig(
                inputs=list(inputs), output=str(output), seed=seed, batch_size=batch_size,
                num_workers=workers, encode_threads=encode_threads, image_format=image_format,
                allow_lossy=allow_lossy, quality=quality, png_compress_level=png_compression, png_strategy=png_strategy,
                image_size=image_size, resize_mode=resize_mode, max_pixels=max_pixels,
                max_batch_pixels=max_batch_pixels, max_sample_bytes=max_sample_bytes,
                caption_field=caption_field, label_field=label_field, mixed_precision=mixed_precision,
                overwrite=overwrite, quiet=quiet, log_json=str(log_json) if log_json else None,
                max_failure_rate=max_failure_rate,
            )
            if cfg.lossy:
                typer.echo(
                    f"warning: {image_format} output is lossy and weakens the protection; "
                    "this is recorded in the manifests", err=True,
                )
            summary = run_shard_job(cfg, method_obj)
            stop_point()  # a signal after the run finished still means the command was stopped
        except RunFailed as exc:  # written, but not acceptable as it is
            if not quiet:
                _print_summary(exc.summary, output)
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        except (UserError, ValueError) as exc:
            fail(str(exc))
        except OSError as exc:  # disk full, permissions changed mid-run, ...
            if stop_requested() is not None:  # e.g. writing to the terminal SIGHUP said was closed
                _interrupted(stop_requested())
            fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''} (rerun to resume)")
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP (Terminated)
            _interrupted(exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
    if summary and "counts" in summary and not quiet:
        _print_summary(summary, output)


def _interrupted(signum: int) -> NoReturn:
    """One ``error:`` line (if stderr is still there: SIGHUP closes the terminal), exit 128 + signum."""
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    with contextlib.suppress(OSError):
        typer.echo(f"error: interrupted{by}; rerun the same command to resume", err=True)
    raise typer.Exit(code=128 + signum)


def _print_summary(summary: dict, output: Path) -> None:
    c = summary["counts"]
    t = summary["timings"]
    typer.echo(
        f"protected {c['written']} of {c['samples']} samples in {c['shards']} shards "
        f"({c['failed']} failed{': ' + ', '.join(f'{k} {v}' for k, v in summary['failures'].items()) if c['failed'] else ''}); "
        f"{t['images_per_second']} img/s this run; output: {output}",
        err=True,
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
        64_000_000, "--max-pixels",
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
) -> None:
    """Write the embedded, deterministic demo image-text dataset."""
    from uge_protect.shards.demo import write_demo_dataset

    try:
        summary = write_demo_dataset(
            directory, n_train=n_train, n_test=n_test, image_size=image_size,
            samples_per_shard=per_shard, seed=seed,
        )
    except (ValueError, OSError) as exc:
        fail(str(exc))
        return
    splits = summary["splits"]
    typer.echo(
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
) -> None:
    """Write the benchmark of real photographs with captions (crops of Debian wallpapers; test crops from regions never used in training)."""
    from uge_protect.shards.photos import write_photo_dataset

    try:
        summary = write_photo_dataset(
            directory, train_per_class=train_per_class, test_per_class=test_per_class,
            image_size=image_size, samples_per_shard=per_shard, seed=seed,
            photo_dirs=list(photos) if photos else None,
        )
    except (UserError, ValueError) as exc:
        fail(str(exc))
        return
    except OSError as exc:
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return
    for name, counts in summary["counts"].items():
        typer.echo(f"{name:>16}: {counts['train']} train, {counts['test']} test")
    splits = summary["splits"]
    typer.echo(
        f"wrote {splits['train']['n']} train and {splits['test']['n']} test samples "
        f"({len(summary['classes'])} classes, {image_size}x{image_size}) to {directory}/train and {directory}/test"
    )


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
