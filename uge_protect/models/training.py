"""Small training helpers shared by the methods that fit networks (T2UE, UGE) and by evaluation."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) → CUDA when available, else the CPU; anything else as given.

    The one place the package resolves ``--device auto``."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample random translation (edge-padded crop) and horizontal flip, differentiable.

    ``x`` may hold several aligned tensors concatenated along the channels; they get the
    same view."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = [padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, flips)])


def sync_grads(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """Average gradients over the processes of a launch (each computed its share of the batch)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def sync_buffers(module: torch.nn.Module, world: int) -> None:
    """Average floating buffers (batch-norm running statistics) over the processes."""
    if world <= 1:
        return
    import torch.distributed as dist

    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(world)
