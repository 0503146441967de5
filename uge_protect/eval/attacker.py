"""Rows of an attacker who knows the protection's method (``eval --method-aware``).

The attacker holds the protected shards, the code, the protection's public record and a small
clean labelled set (``--attacker-fraction`` of the clean training set, a seeded pick), not the
artifact. The protection's method (its registry entry, see
:func:`uge_protect.methods.registry.attacker_models`) says what such an attacker can try for
each hacker architecture; evaluation trains those rows as any other. Rows of one ``group``
(e.g. every key the attacker can enumerate) are one strategy: the attacker keeps the row whose
protected-trained model scores best on its clean set, which :func:`mark_picks` marks.
"""

from __future__ import annotations

from typing import Any

import torch

from uge_protect.errors import UserError
from uge_protect.shards.dataset import InMemoryDataset

#: The seed stream of the attacker's pick (apart from the runs' own seeds).
_PICK_SALT = 7919


def attacker_set(clean: InMemoryDataset, fraction: float, seed: int, num_classes: int) -> InMemoryDataset:
    """A seeded ``fraction`` of the clean training set (at least one sample a class on
    average), the attacker's labelled clean images."""
    n = len(clean)
    k = min(n, max(num_classes, int(round(fraction * n))))
    if k < 1:
        raise UserError("--method-aware needs clean training samples for the attacker's clean set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + _PICK_SALT))[:k].sort().values
    keep = order.tolist()
    return InMemoryDataset(clean.images[order], clean.labels[order], [clean.captions[i] for i in keep],
                           [clean.keys[i] for i in keep], 0)


def mark_picks(summary: list[dict[str, Any]], groups: dict[str, str]) -> None:
    """For each defense and attacker group (``groups``: row label → group), mark the row the
    attacker keeps: the best mean accuracy on its clean set after training on protected data
    (``picked``); every attacker row gets its ``attacker_acc`` and ``group``."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in summary:
        group = groups.get(row["arch"])
        if group is None:
            continue
        row["group"] = group
        row["picked"] = False
        key = (row["defense"], group)
        if key not in best or row["attacker_acc"] > best[key]["attacker_acc"]:
            best[key] = row
    for row in best.values():
        row["picked"] = True
