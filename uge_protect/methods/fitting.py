"""The pieces every fit loop shares: input checks, the batch cursor, the progress window,
the checkpoint snapshot, and the packing of an artifact's config and weights.

Each piece draws from the fit's random generator exactly where the loops always did, so a
fit stays bit-identical for a seed whichever loop uses it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Protocol

import torch
from torch import nn

from uge_protect.errors import UserError
from uge_protect.methods.base import FitContext

#: What a fitter returns: the artifact's config and its weight groups (for ``save_artifact``).
FitResult = tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]


class Stateful(Protocol):
    """Anything with a state dict: modules, optimizers, schedulers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def check_images(images: torch.Tensor) -> None:
    """A ValueError unless ``images`` is a uint8 (N, 3, H, W) tensor."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def check_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as int64, a ValueError unless there is one per image."""
    labels = labels.to(torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    return labels


def check_shares(batch_size: int, n: int, world: int) -> None:
    """A UserError when a batch leaves a process of the launch fewer than two samples."""
    if min(batch_size, n) < 2 * world:
        raise UserError(f"batch size {batch_size} is too small for {world} processes (at least 2 each)")


class BatchCursor:
    """Batches of ``batch_size`` indices in a random order, reshuffled when the next batch
    would run past the end (the first order is drawn at construction)."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.order, self.cursor = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        """The next batch of indices (all of them when there are fewer than a batch)."""
        if self.cursor > 0 and self.cursor + self.batch_size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        batch = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the cursor."""
        return {"order": self.order, "cursor": self.cursor}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`."""
        self.order, self.cursor = state["order"].clone(), int(state["cursor"])


class ProgressWindow:
    """Losses averaged over the steps since the last report, with the throughput."""

    def __init__(self, started: float, values: list[dict[str, float]] | None = None):
        self.started = started
        self.values: list[dict[str, float]] = list(values or [])
        self.seen = 0
        self.tick = time.perf_counter()

    def add(self, losses: dict[str, float], samples: int) -> None:
        """Record one step's losses over ``samples`` samples."""
        self.values.append(losses)
        self.seen += samples

    def close(self, phase: str, step: int, steps: int, ctx: FitContext) -> dict[str, Any]:
        """The window's record (phase, step and mean losses), reported with ``steps``, the
        seconds since the start and the images per second; the window starts over."""
        now = time.perf_counter()
        record: dict[str, Any] = {"phase": phase, "step": step,
                                  **{k: sum(r[k] for r in self.values) / len(self.values) for k in self.values[0]}}
        ctx.report({**record, "steps": steps, "seconds": now - self.started,
                    "images_per_s": self.seen / max(now - self.tick, 1e-9)})
        self.values, self.seen, self.tick = [], 0, now
        return record


def snapshot(step: int, gen: torch.Generator, cursor: BatchCursor, window: ProgressWindow,
             history: list[dict[str, Any]], parts: dict[str, Stateful | Any]) -> dict[str, Any]:
    """A deep copy of a fit's training state (the live tensors keep changing): the step, the
    random generator, the cursor, the progress window, the history, and ``parts`` (objects
    with a state dict are stored by it, anything else as it is)."""
    state = {"step": step, "rng": gen.get_state(), "history": history, "window": window.values, **cursor.state(),
             **{k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in parts.items()}}
    return copy.deepcopy(state)


def restore(state: dict[str, Any], parts: dict[str, Stateful]) -> None:
    """Load each of ``parts`` from its entry of a :func:`snapshot`."""
    for name, part in parts.items():
        part.load_state_dict(state[name])


def module_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as detached CPU copies: a weight group of an artifact."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def fit_record(method: str, cfg: Any, **fields: Any) -> dict[str, Any]:
    """An artifact's config: the method, every option of the dataclass ``cfg``, then ``fields``
    (which take precedence, e.g. a resolved model config over the option naming it)."""
    return {"method": method, **dataclasses.asdict(cfg), **fields}
