"""The ``uge-protect`` command line: thin commands over the Python API."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer

from uge_protect.cli.common import error_line, fail, logged_command, os_error_text
from uge_protect.cli.options import Source, cli_options, command_with_options, given_values, parameter
from uge_protect.errors import RunFailed, Terminated, UserError
from uge_protect.methods.registry import apply_option_sources
from uge_protect.options import help_of
from uge_protect.pipeline.config import MethodOptions, ShardJobConfig

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


from uge_protect.cli.inspect_cmd import inspect_command  # noqa: E402

app.command("inspect")(inspect_command)

from uge_protect.cli.data_cmd import demo_data_command, photo_data_command  # noqa: E402

app.command("demo-data")(demo_data_command)
app.command("photo-data")(photo_data_command)

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
