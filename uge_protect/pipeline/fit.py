"""``uge-protect fit METHOD``: load a (small) training set and save a method artifact.

The fit itself belongs to the method (its registry entry, looked up by name through
:func:`uge_protect.methods.registry.get_fitter`); this module only reads the shards,
checks them, hands the fit a :class:`~uge_protect.methods.base.FitContext`, reports progress
and writes the artifact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from uge_protect.errors import UserError
from uge_protect.launch import is_launched, join_launch
from uge_protect.logs import event as log_event
from uge_protect.shards.dataset import InMemoryDataset, load_shards
from uge_protect.methods.artifact import artifact_fingerprint, save_artifact, write_private
from uge_protect.methods.base import FitContext, Progress
from uge_protect.methods.registry import fit_needs, fitter_supports_checkpoints, get_fitter

log = logging.getLogger(__name__)


def _log_progress(event: dict[str, Any]) -> None:
    """A fit's progress event as one line for people and a ``fit_progress`` event for machines."""
    log_event(log, "fit_progress", "fit: " + _progress_text(event), **event)


#: Loss fields of a step event, by the name a person reads.
_STEP_VALUES = {"loss": "loss", "ud": "L_ud", "fd": "L_fd", "gm": "L_gm", "student": "student loss",
                "teacher_train_acc": "authorized train acc"}


def _progress_text(event: dict[str, Any]) -> str:
    if "step" in event:
        phase = f"{event['phase']} " if event.get("phase") else ""
        parts = [f"{phase}step {event['step']}/{event.get('steps')}"]
        parts += [f"{label} {event[k]:.4f}" for k, label in _STEP_VALUES.items() if isinstance(event.get(k), float)]
        if "images_per_s" in event:
            parts.append(f"{event['images_per_s']:.0f} img/s")
    elif "message" in event:  # a free-form stage of a fit (what it does next)
        parts = [str(event["message"])]
    else:
        parts = [f"round {event.get('round')}/{event.get('max_rounds')}"]
        if event.get("phase"):
            parts.insert(0, str(event["phase"]))
        if "train_error" in event:
            parts.append(f"surrogate train error {100 * event['train_error']:.2f}%")
    if "seconds" in event:
        parts.append(f"{event['seconds']:.1f} s")
    return ", ".join(parts)


CHECKPOINT_NAME = "checkpoint.pt"


def _options_key(method: str, train_patterns: list[str], options: dict[str, Any]) -> str:
    given = {k: v for k, v in options.items() if v is not None}  # None means "default"
    return json.dumps({"method": method, "train": list(train_patterns), "options": given},
                      sort_keys=True, default=str)


def _load_checkpoint(path: Path, key: str) -> dict[str, Any]:
    try:
        # weights_only: tensors, dicts, lists and numbers only; never arbitrary pickled objects
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise UserError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    if not isinstance(state, dict) or state.get("options_key") != key:
        raise UserError(f"checkpoint {path} was written by a fit with other data or options; "
                        "resume with the same command, or delete it to start over")
    return state


def _save_checkpoint(path: Path, state: dict[str, Any], key: str) -> None:
    """Write the checkpoint atomically, owner-only (mode 0600): it may hold a secret key."""
    write_private(path, lambda f: torch.save({**state, "options_key": key}, f))


def _process_group() -> tuple[int, int, str | None]:
    """(rank, world, device) of a multi-process launch (joining its process group), else
    (0, 1, None): None leaves the device to the fit's options."""
    if not is_launched():
        return 0, 1, None
    state = join_launch()
    return state.process_index, state.num_processes, str(state.device)


def _check_output(method: str, out: Path, resume: bool) -> None:
    """A :class:`UserError` unless ``out`` can take the artifact (or holds a checkpoint to resume)."""
    ckpt = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise UserError(f"output exists and is not a directory: {out}")
    if (out / "config.json").is_file():
        raise UserError(f"{out} already holds a finished artifact; choose a new output directory")
    others = [p.name for p in out.iterdir() if p.name != CHECKPOINT_NAME and not p.name.startswith(".")] \
        if out.is_dir() else []
    if others or (out.is_dir() and ckpt.is_file() and not resume):
        hint = " (it holds a checkpoint: add --resume to continue)" if ckpt.is_file() and not others else ""
        raise UserError(f"output directory is not empty: {out}{hint}; choose a new one")
    if resume and not fitter_supports_checkpoints(method):
        raise UserError(f"`fit {method}` cannot resume; start it again")


def _training_set(method: str, train_patterns: list[str], data: InMemoryDataset, needs: str
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str | None], str]:
    """The samples that have what the fit needs: (images, labels, captions, what it needs as words)."""
    if needs == "captions":
        keep = torch.tensor([bool(c) for c in data.captions], dtype=torch.bool)
        what, field = "a caption", "a 'txt' field"
    else:
        keep = data.labels >= 0
        what, field = "a class label", "a 'cls' field"
    if int(keep.sum()) == 0:
        raise UserError(
            f"no sample in {' '.join(train_patterns)} has {what} ({field}); "
            f"`fit {method}` needs them in its training data"
        )
    captions = [c for c, k in zip(data.captions, keep.tolist()) if k]
    return data.images[keep], data.labels[keep], captions, what


def _log_saved(method: str, out: Path, config: dict[str, Any], seconds: float) -> None:
    err = config.get("train_error")
    loss = config.get("final_loss")
    done = f"after {config['rounds']} rounds" if "rounds" in config else f"after {config.get('steps')} steps"
    log_event(
        log, "fit_saved",
        f"fit: saved {method} artifact to {out} {done} in {seconds:.1f} s"
        + (f" (surrogate train error {100 * err:.2f}%)" if err is not None else "")
        + (f" (final loss {loss:.4f})" if loss is not None else ""),
        method=method, artifact=str(out), seconds=round(seconds, 3), rounds=config.get("rounds"),
        steps=config.get("steps"), train_error=err, final_loss=loss)


def fit_from_shards(
    method: str,
    train_patterns: list[str],
    output_dir: str,
    options: dict[str, Any],
    *,
    quiet: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    """Fit ``method`` on the samples of ``train_patterns`` and save the artifact.

    ``options`` go to the method's fitter (None values mean "default"); ``image_size`` in
    it also brings every image to that side (centre crop) when loading. Samples without what
    the fit needs (a label, or a caption; see :func:`registry.fit_needs`) are left out and
    counted; none left is a :class:`UserError`.

    Fitters that support it write a checkpoint (``OUTPUT/checkpoint.pt``) every
    ``checkpoint_every`` steps; ``resume`` continues from it (same data and options only).
    Under a multi-process launch a fit that shares batches (UGE, T2UE's infonce objective)
    gives each process its share of each batch, the others run the same fit in every
    process; the main process writes. Returns a summary: artifact path and fingerprint, counts, seconds and
    the method's config.
    """
    fitter = get_fitter(method)
    rank, world, device = _process_group()
    out = Path(output_dir)
    ckpt = out / CHECKPOINT_NAME
    key = _options_key(method, train_patterns, options)
    _check_output(method, out, resume)
    state = _load_checkpoint(ckpt, key) if resume and ckpt.is_file() else None
    started = time.perf_counter()
    data = load_shards(list(train_patterns), image_size=options.get("image_size"))
    needs = fit_needs(method, options)
    images, labels, captions, what = _training_set(method, train_patterns, data, needs)
    n_keep = len(images)
    quiet = quiet or rank != 0
    if not quiet:
        size = f"{images.shape[-1]}x{images.shape[-2]}"
        classes = f", {int(labels.max()) + 1} classes" if needs == "labels" else ""
        log_event(
            log, "fit_data",
            f"fit: {n_keep} training images ({size}{classes}); "
            f"{len(data) - n_keep} without {what} and {data.skipped} undecodable left out"
            + (f"; resuming at step {state['step']}" if state else "")
            + (f"; {world} processes" if world > 1 else ""),
            samples=n_keep, left_out=len(data) - n_keep, undecodable=data.skipped,
            resumed_at=state["step"] if state else None, processes=world)
    ctx = FitContext(rank=rank, world=world, device=device, progress=progress or (None if quiet else _log_progress))
    if fitter_supports_checkpoints(method):
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        save = (lambda st: _save_checkpoint(ckpt, st, key)) if rank == 0 else None
        ctx = dataclasses.replace(ctx, state=state, checkpoint=save, checkpoint_every=checkpoint_every)
    config, weights = fitter(images, labels, captions, dict(options), ctx)
    if rank == 0:
        save_artifact(out, config, weights)
        ckpt.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    if not quiet:
        _log_saved(method, out, config, seconds)
    return {
        "artifact": str(out),
        "fingerprint": artifact_fingerprint(out) if rank == 0 else None,
        "samples": n_keep,
        "left_out": len(data) - n_keep,
        "undecodable": data.skipped,
        "seconds": round(seconds, 3),
        "config": config,
    }
