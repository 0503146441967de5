"""Classification metrics, and summaries over repeats.

Retrieval metrics for CLIP (Recall@K, median rank) live in :mod:`uge_protect.eval.clip`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    pred = torch.as_tensor(pred).long().view(-1)
    target = torch.as_tensor(target).long().view(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.numel()} vs {target.numel()}")
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of predictions equal to the target (0.0 for no samples)."""
    pred = torch.as_tensor(pred).view(-1)
    target = torch.as_tensor(target).view(-1)
    return float((pred == target).float().mean()) if target.numel() else 0.0


def accuracy_from_confusion(cm: torch.Tensor) -> float:
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else 0.0


def per_class_accuracy(cm: torch.Tensor) -> list[float | None]:
    """Recall of each class (diagonal / row sum); ``None`` for a class absent from the targets."""
    out: list[float | None] = []
    for k in range(cm.shape[0]):
        row = int(cm[k].sum())
        out.append(float(cm[k, k]) / row if row else None)
    return out


def summarize(values: Iterable[float]) -> dict[str, float | int | list[float]]:
    """Mean, sample standard deviation (0 for one value), min, max, n and the values themselves."""
    vals = [float(v) for v in values]
    n = len(vals)
    if not n:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "values": []}
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n, "values": vals}
