"""The method contract: what every protection method provides to the pipeline.

A method is fitted once (``fit``, method-specific, writing an artifact directory) and then
applied as a pure function of (artifact, batch) → perturbation. The pipeline never looks
inside a method: it hands over a :class:`ProtectBatch` and enforces the budget on the result.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the run seed and a sample key (stable across runs/processes)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class ProtectBatch:
    """A batch of same-sized images and what a method may condition on.

    ``images`` is float32 in [0, 1], shape (B, 3, H, W), on the method's device.
    ``seeds`` are per-sample seeds from :func:`sample_seed`; methods draw every random
    number of a sample from its own seed so results do not depend on batch composition.
    """

    images: torch.Tensor
    keys: list[str]
    seeds: list[int]
    captions: list[str | None]
    labels: list[int | None]


class ProtectionMethod(ABC):
    """Base class of protection methods.

    Subclasses set ``name`` and implement :meth:`perturb`. ``requires_caption`` /
    ``requires_label`` tell the pipeline to reject samples without them.
    """

    name: ClassVar[str]
    requires_caption: ClassVar[bool] = False
    requires_label: ClassVar[bool] = False
    #: Hidden methods are usable from Python (benchmarks) but never offered by the CLI.
    hidden: ClassVar[bool] = False

    def __init__(self, epsilon: float = 8 / 255):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = float(epsilon)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "ProtectionMethod":
        """Move the method's tensors to ``device``; returns self."""
        self.device = torch.device(device)
        return self

    def config(self) -> dict[str, Any]:
        """Public parameters, recorded in ``protection.json`` (never secrets)."""
        return {"method": self.name, "epsilon": self.epsilon}

    def fingerprint(self) -> str | None:
        """A fingerprint of the artifact the method was loaded from, if any."""
        return None

    @abstractmethod
    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        """Return δ with the shape of ``batch.images`` (in [0, 1] image units).

        The pipeline adds δ in uint8 space and clips it to the budget, so a method may
        return values slightly outside ±epsilon; it must not depend on other samples of
        the batch for per-sample randomness.
        """
