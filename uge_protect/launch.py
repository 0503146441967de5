"""Joining the process group of an ``accelerate launch`` / ``torchrun`` launch."""

from __future__ import annotations

import os
from typing import Any

import torch


def is_launched() -> bool:
    """True inside a launch of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_launch(force_cpu: bool = False) -> Any:
    """This process's ``accelerate.PartialState`` (joins the process group).

    ``PartialState()`` alone, on a torch built for CUDA running without a GPU, leaves every
    process a lone rank 0 even under ``ACCELERATE_USE_CPU=true``; CPU launches therefore
    pass ``cpu=True``.
    """
    from accelerate import PartialState

    cpu = (force_cpu or not torch.cuda.is_available()
           or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    return PartialState(cpu=cpu)
