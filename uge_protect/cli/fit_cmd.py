"""``uge-protect fit METHOD``: fit a method on labelled training shards and save its artifact.

Each command's method options are built from the method's config dataclasses
(:mod:`uge_protect.cli.options`); this module adds the data, the output and how the fit runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List

import typer

from uge_protect.cli.common import fail, logged_command, output_parameters
from uge_protect.cli.options import CliOption, Source, cli_options, command_with_options, given_values, parameter
from uge_protect.errors import UserError
from uge_protect.methods.em.config import EMClipConfig, EMConfig
from uge_protect.methods.t2ue.config import T2UEConfig
from uge_protect.methods.uge.config import UGEConfig

fit_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fit a protection method on training shards and save an artifact for `shard --artifact`.",
    pretty_exceptions_enable=False,
)

#: The options of each ``fit`` command, from its method's configs (``fit em``: both modes' union).
FIT_SOURCES: dict[str, tuple[Source, ...]] = {
    "em": ((EMConfig, "sample/class"), (EMClipConfig, "clip")),
    "t2ue": ((T2UEConfig, None),),
    "uge": ((UGEConfig, None),),
}


@fit_app.callback()
def _fit_root() -> None:
    """Fit a protection method on training shards and save an artifact for `shard --artifact`."""

def _fit_command(method: str, doc: str, data: str, output: str, checkpoints: bool) -> Callable[..., None]:
    """The command ``fit METHOD``: ``data`` and ``output`` describe its arguments; ``checkpoints``:
    the fit can checkpoint and resume."""
    options: list[CliOption] = cli_options(*FIT_SOURCES[method])
    fixed = [
        parameter("train", List[str], typer.Argument(..., help=f"{data} training shards: paths, globs, {{000..099}} patterns.")),
        parameter("output", Path, typer.Option(..., "--output", "-o", help=output)),
    ]
    tail = output_parameters()
    if checkpoints:
        tail += [
            parameter("checkpoint_every", int, typer.Option(100, "--checkpoint-every", help=(
                "Write OUTPUT/checkpoint.pt every N steps (0: never). (default: 100)"), show_default=False)),
            parameter("resume", bool, typer.Option(False, "--resume", help=(
                "Continue from OUTPUT/checkpoint.pt (same data and options)."))),
        ]

    def body(values: dict[str, Any], train: List[str], output: Path, quiet: bool, log_json: Path | None,
             **run: Any) -> None:
        from uge_protect.pipeline.fit import fit_from_shards

        with logged_command(f"fit {method}", quiet, log_json):
            if run.get("checkpoint_every", 0) < 0:
                fail("--checkpoint-every must be >= 0")
            try:
                fit_from_shards(method, list(train), str(output), given_values(options, values), **run)
            except (UserError, ValueError) as exc:
                fail(str(exc))

    return command_with_options(body, fixed, options, doc, tail)


fit_app.command("em")(_fit_command(
    "em", "Fit EM (error-minimizing noise, Huang et al. 2021) by min-min against a surrogate.\n\n"
    "sample and class modes need labelled shards (cls); clip mode needs captions (txt).",
    "Labelled", "Artifact directory to create (must be new or empty).", checkpoints=False))
fit_app.command("t2ue")(_fit_command(
    "t2ue", "Fit T2UE (text-to-unlearnable examples): a generator of noise from captions alone.",
    "Captioned", "Artifact directory to create (or, with --resume, to finish).", checkpoints=True))
fit_app.command("uge")(_fit_command(
    "uge", "Fit UGE (ungeneralizable examples): noise learnable only by the authorized network.",
    "Labelled", "Artifact directory to create (or, with --resume, to finish). It holds the key: keep it private.",
    checkpoints=True))
