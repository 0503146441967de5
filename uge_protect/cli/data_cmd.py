"""``uge-protect demo-data`` and ``photo-data``: write the datasets the demo and the benchmarks use."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from uge_protect.cli.common import LOG_JSON, QUIET, logged_command, one_error_line

_log = logging.getLogger("uge_protect.cli")

#: The options both datasets take.
IMAGE_SIZE = typer.Option(32, "--image-size", help="Image side in pixels.")
SEED = typer.Option(0, "--seed", help="Generator seed.")


def demo_data_command(
    directory: Path = typer.Argument(..., help="Where to write train/ and test/ shards."),
    n_train: int = typer.Option(5000, "--train", help="Training samples."),
    n_test: int = typer.Option(1000, "--test", help="Test samples."),
    image_size: int = IMAGE_SIZE,
    per_shard: int = typer.Option(1000, "--per-shard", help="Samples per shard."),
    seed: int = SEED,
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


def photo_data_command(
    directory: Path = typer.Argument(..., help="Where to write train/ and test/ shards, classes.json and photos.json."),
    train_per_class: int = typer.Option(200, "--train-per-class", help="Training crops per photograph (class)."),
    test_per_class: int = typer.Option(80, "--test-per-class", help="Test crops per photograph (class)."),
    image_size: int = IMAGE_SIZE,
    per_shard: int = typer.Option(1000, "--per-shard", "--shard-size", help="Samples per shard."),
    seed: int = SEED,
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
