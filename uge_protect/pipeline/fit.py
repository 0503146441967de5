"""``uge-protect fit METHOD``: load a (small) training set and save a method artifact.

The fit itself lives in ``transforms`` (looked up by name through
:func:`uge_protect.transforms.registry.get_fitter`); this module only reads the shards,
checks them, reports progress and writes the artifact.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from uge_protect.errors import UserError
from uge_protect.shards.dataset import load_shards
from uge_protect.transforms.artifact import artifact_fingerprint, save_artifact
from uge_protect.transforms.registry import fit_needs, get_fitter


def _print_progress(event: dict[str, Any]) -> None:
    parts = [f"round {event.get('round')}/{event.get('max_rounds')}"]
    if "train_error" in event:
        parts.append(f"surrogate train error {100 * event['train_error']:.2f}%")
    if "seconds" in event:
        parts.append(f"{event['seconds']:.1f} s")
    print("fit: " + ", ".join(parts), file=sys.stderr, flush=True)


def fit_from_shards(
    method: str,
    train_patterns: list[str],
    output_dir: str,
    options: dict[str, Any],
    *,
    quiet: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fit ``method`` on the samples of ``train_patterns`` and save the artifact.

    ``options`` go to the method's fitter (None values mean "default"); ``image_size`` in
    it also brings every image to that side (centre crop) when loading. Samples without what
    the fit needs (a label, or a caption; see :func:`registry.fit_needs`) are left out and
    counted; none left is a :class:`UserError`. Returns a
    summary: artifact path and fingerprint, counts, seconds and the method's config.
    """
    fitter = get_fitter(method)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output exists and is not a directory: {out}")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output directory is not empty: {out}; choose a new one")
    started = time.perf_counter()
    image_size = options.get("image_size")
    data = load_shards(list(train_patterns), image_size=image_size)
    needs = fit_needs(method, options)
    if needs == "captions":
        keep = torch.tensor([bool(c) for c in data.captions], dtype=torch.bool)
        what, field = "a caption", "a 'txt' field"
    else:
        keep = data.labels >= 0
        what, field = "a class label", "a 'cls' field"
    n_keep = int(keep.sum())
    if n_keep == 0:
        raise UserError(
            f"no sample in {' '.join(train_patterns)} has {what} ({field}); "
            f"`fit {method}` needs them in its training data"
        )
    images, labels = data.images[keep], data.labels[keep]
    captions = [c for c, k in zip(data.captions, keep.tolist()) if k]
    if not quiet:
        size = f"{images.shape[-1]}x{images.shape[-2]}"
        classes = f", {int(labels.max()) + 1} classes" if needs == "labels" else ""
        print(
            f"fit: {n_keep} training images ({size}{classes}); "
            f"{len(data) - n_keep} without {what} and {data.skipped} undecodable left out",
            file=sys.stderr, flush=True,
        )
    report = progress or (None if quiet else _print_progress)
    config, weights = fitter(images, labels, captions, dict(options), report)
    save_artifact(out, config, weights)
    seconds = time.perf_counter() - started
    summary = {
        "artifact": str(out),
        "fingerprint": artifact_fingerprint(out),
        "samples": n_keep,
        "left_out": len(data) - n_keep,
        "undecodable": data.skipped,
        "seconds": round(seconds, 3),
        "config": config,
    }
    if not quiet:
        err = config.get("train_error")
        print(
            f"fit: saved {method} artifact to {out} after {config.get('rounds', '?')} rounds in {seconds:.1f} s"
            + (f" (surrogate train error {100 * err:.2f}%)" if err is not None else ""),
            file=sys.stderr, flush=True,
        )
    return summary
