"""Spread independent training runs over the processes of an Accelerate (or torchrun) launch.

An evaluation is a list of independent training runs (protected and clean, per defense,
architecture and repeat). Distributing whole runs over processes needs no gradient
synchronisation, keeps every run's result identical to a single-process run with the same
seed, and scales with the number of processes as long as there are at least as many runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from uge_protect.launch import is_launched, join_launch
from uge_protect.models.training import pick_device

T = TypeVar("T")


@dataclass
class Workers:
    """This process's place in the launch: rank, world size, device, and the collectives."""

    rank: int
    world: int
    device: str
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self._state.wait_for_everyone()

    def gather(self, items: list[Any]) -> list[Any]:
        """Concatenate every process's ``items`` (in rank order) on every process."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(items))


def start_workers(device: str) -> Workers:
    """Join the launch's process group (a plain single process when not launched).

    ``device`` is "auto", "cpu" or "cuda[:N]". Under a multi-process launch each process takes
    the device Accelerate assigns it (its own GPU), or the CPU for "cpu"; a CPU process then
    uses its share of the cores unless ``OMP_NUM_THREADS`` says otherwise.
    """
    if not is_launched():
        return Workers(rank=0, world=1, device=str(pick_device(device)))
    state = join_launch(force_cpu=device == "cpu")
    chosen = "cpu" if device == "cpu" else str(state.device)
    if chosen == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return Workers(rank=state.process_index, world=state.num_processes, device=chosen, _state=state)


def run_spread(workers: Workers, jobs: Sequence[T], work: Callable[[T], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``jobs[rank::world]`` here and return every job's result, in job order, everywhere."""
    mine = [(i, work(job)) for i, job in enumerate(jobs) if i % workers.world == workers.rank]
    done = dict(workers.gather(mine))
    return [done[i] for i in range(len(jobs))]
