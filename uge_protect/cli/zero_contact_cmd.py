"""``uge-protect noise`` and ``apply-noise``: protection from text alone, on the image owner's device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

import typer

from uge_protect.cli.common import LOG_JSON, QUIET, logged_command, one_error_line

_log = logging.getLogger("uge_protect.cli")


def noise_command(
    artifact: Path = typer.Option(..., "--artifact", help="Artifact of a text-only method (made by `uge-protect fit t2ue`)."),
    text: str = typer.Option(..., "--text", help="The image's caption."),
    size: Tuple[int, int] = typer.Option((32, 32), "--size", help="Noise height and width (the image's size): --size H W."),
    key: Optional[str] = typer.Option(None, "--key", help="Sample key the noise's latent comes from (default: the caption). Use the sample's key to match `shard`."),
    seed: int = typer.Option(0, "--seed", help="Run seed, as `shard --seed`."),
    output: Path = typer.Option(..., "--output", "-o", help="Noise PNG to write (pixels 128 + δ)."),
    quiet: bool = QUIET,
    log_json: Optional[Path] = LOG_JSON,
) -> None:
    """Compute the noise for a caption; apply it with `uge-protect apply-noise`."""
    from uge_protect.pipeline.zero_contact import make_noise

    with logged_command("noise", quiet, log_json), one_error_line():
        meta = make_noise(str(artifact), text, (size[0], size[1]), output, key=key, seed=seed)
        _log.info(f"wrote {size[0]}x{size[1]} noise (±{meta['budget_levels']} levels) for {text!r} to {output}")


def apply_noise_command(
    image: Path = typer.Argument(..., help="Image to protect (any format `shard` reads)."),
    noise: Path = typer.Argument(..., help="Noise PNG made by `uge-protect noise` at the image's size."),
    output: Path = typer.Option(..., "--output", "-o", help="Protected PNG to write."),
    quiet: bool = QUIET,
    log_json: Optional[Path] = LOG_JSON,
) -> None:
    """Add a noise file to an image; the result is what `shard` writes for the same caption and key."""
    from uge_protect.pipeline.zero_contact import apply_noise

    with logged_command("apply-noise", quiet, log_json), one_error_line():
        apply_noise(image, noise, output)
        _log.info(f"wrote {output}")
