"""Metrics on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from uge_protect.eval.metrics import (
    accuracy, accuracy_from_confusion, confusion_matrix, per_class_accuracy, summarize,
)


def test_known_confusion():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    pred = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2, 1, 0])
    cm = confusion_matrix(pred, target, 4)
    expected = torch.tensor([
        [3, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 1, 2, 0],
        [0, 0, 0, 0],
    ])
    assert torch.equal(cm, expected)
    assert accuracy(pred, target) == pytest.approx(0.7)
    assert accuracy_from_confusion(cm) == pytest.approx(0.7)
    pc = per_class_accuracy(cm)
    assert pc[:3] == [pytest.approx(0.75), pytest.approx(1.0), pytest.approx(0.5)]
    assert pc[3] is None  # class absent from the targets


def test_confusion_rejects_length_mismatch():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 2)


def test_summarize():
    s = summarize([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n"] == 3
    assert s["min"] == 0.5 and s["max"] == 0.9
    one = summarize([0.4])
    assert one["std"] == 0.0 and one["n"] == 1
    assert math.isnan(summarize([])["mean"])
