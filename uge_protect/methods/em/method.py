"""``em``: error-minimizing noise (Huang et al., "Unlearnable Examples", ICLR 2021).

Fit (min-min, on in-memory tensors): alternate a few SGD batches of a surrogate classifier on
``clip(x + δ)`` with PGD sweeps that *minimize* the surrogate's cross-entropy over δ (sign
descent, projected to ``‖δ‖∞ ≤ ε`` and to the [0, 1] image box), until the surrogate's error
on the perturbed training set drops below ``stop_error`` or ``max_rounds`` is reached.

* ``sample`` mode: one δ per training image during the fit. To protect a stream of new images,
  the artifact keeps the fitted surrogate and apply runs the same PGD steps against it, per
  batch, from an initial δ drawn from each sample's own seed.
* ``class`` mode: one δ per class (C, 3, H, W); during the sweep every sample takes one signed
  gradient step from its class's δ and the projected results are averaged back into the class
  (as in the reference). Apply is a lookup ``δ[label]``, resized bilinearly to the image size.

Fitting is :mod:`uge_protect.methods.em.fit`; this module applies a fitted artifact, on
tensors only (files are the business of :mod:`artifact` and the pipeline).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.errors import UserError
from uge_protect.methods.artifact import (artifact_fingerprint, check_config, check_fitted_epsilon, load_artifact,
    loading)
from uge_protect.methods.base import APPLY_CHUNK, ProtectBatch
from uge_protect.methods.budget import pgd_minimize
from uge_protect.methods.em.clip import ErrorMinimizingClip
from uge_protect.methods.em.config import MODES, EMArtifact, EMClipArtifact
from uge_protect.methods.em.fitted import FittedEM
from uge_protect.models.classifiers import Normalized, build_classifier, set_frozen, small_cnn

def build_surrogate(name: str, num_classes: int, width: int | None = None, seed: int | None = None) -> nn.Module:
    """The surrogate classifier (takes [0, 1] images; size-agnostic through global pooling)."""
    if width is None:
        return build_classifier(name, num_classes, seed=seed)
    state = torch.random.get_rng_state()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        return Normalized(small_cnn(num_classes, width=width))
    finally:
        torch.random.set_rng_state(state)


def pgd_min(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
    epsilon: float, step_size: float, steps: int,
) -> torch.Tensor:
    """``steps`` signed-gradient steps that *decrease* the cross-entropy, projected after each step."""
    return pgd_minimize(lambda xp: F.cross_entropy(model(xp), y, reduction="sum"), x, delta,
                        epsilon, step_size, steps)


def _check_em_config(path: str, config: dict[str, Any]) -> None:
    """Check an EM artifact's config against the schema of its mode."""
    if config.get("mode") == "clip":
        check_config(path, config, EMClipArtifact, required=("epsilon", "mode", "step_size", "pgd_steps", "clip_model"))
        return
    # surrogate_width: artifacts older than the field had the architecture's own width
    check_config(path, config, EMArtifact, legacy={"surrogate_width": None},
                 required=("epsilon", "mode", "num_classes", "step_size", "pgd_steps", "surrogate"))


def em_from_artifact(path: str, epsilon: float | None = None) -> ErrorMinimizing | ErrorMinimizingClip:
    """Load an artifact made by ``uge-protect fit em``: an :class:`ErrorMinimizing` (sample or
    class mode) or an :class:`~uge_protect.methods.em.clip.ErrorMinimizingClip` (clip mode).
    Its ε is authoritative: an ``epsilon`` that differs is an error; None means "not given".
    The default budget (8/255, what the CLI passes when ``--epsilon`` is absent) also counts
    as "not given" for an artifact fitted with a smaller ε, so a run never exceeds the
    default silently."""
    config, weights = load_artifact(path, expected_method="em", check=lambda c: _check_em_config(path, c))
    check_fitted_epsilon(path, config, epsilon)
    cls = ErrorMinimizingClip if config["mode"] == "clip" else ErrorMinimizing
    with loading(path, "EM"):
        return cls(config, weights, fingerprint=artifact_fingerprint(path))


class ErrorMinimizing(FittedEM):
    """Apply a fitted EM artifact: PGD against its surrogate (sample) or a class lookup (class)."""

    requires_label = True

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                 fingerprint: str | None = None):
        super().__init__(config, fingerprint)
        self.mode = config.get("mode")
        if self.mode not in MODES:
            raise UserError(f"EM artifact has an unknown mode {self.mode!r}")
        self.num_classes = int(config["num_classes"])
        try:
            self.model = build_surrogate(config["surrogate"], self.num_classes, config.get("surrogate_width"))
            self.model.load_state_dict(weights["surrogate"], strict=True)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"EM artifact's surrogate does not load: {exc}") from exc
        self.model.eval()
        set_frozen(self.model, True)
        self.class_delta: torch.Tensor | None = None
        if self.mode == "class":
            delta = weights.get("class_noise", {}).get("delta")
            if delta is None or delta.ndim != 4 or delta.shape[0] != self.num_classes or delta.shape[1] != 3:
                raise UserError("EM class-wise artifact lacks a (classes, 3, H, W) class_noise delta")
            self.class_delta = delta.float()

    @classmethod
    def from_artifact(cls, path: str, epsilon: float | None = None) -> "ErrorMinimizing":
        """Load a sample- or class-mode artifact (see :func:`em_from_artifact`, which also
        loads the clip mode's)."""
        method = em_from_artifact(path, epsilon)
        if not isinstance(method, ErrorMinimizing):
            raise UserError(f"EM artifact {path} is a clip-mode artifact; load it with em_from_artifact")
        return method

    def to(self, device: torch.device | str) -> "ErrorMinimizing":
        super().to(device)
        self.model.to(self.device)
        if self.class_delta is not None:
            self.class_delta = self.class_delta.to(self.device)
        return self

    def config(self) -> dict[str, Any]:
        keep = ("mode", "step_size", "pgd_steps", "surrogate", "surrogate_width", "num_classes",
                "fit_size", "rounds", "train_error")
        return self.public_config(keep, apply_chunk=APPLY_CHUNK)

    def fit_architectures(self) -> list[str]:
        """The surrogate classifier (any width counts as its architecture)."""
        return [str(self._config["surrogate"])]

    def _labels(self, batch: ProtectBatch) -> torch.Tensor:
        bad = [lab for lab in batch.labels if lab is None or not 0 <= int(lab) < self.num_classes]
        if bad:
            raise UserError(
                f"label {bad[0]!r} is outside the {self.num_classes} classes this EM artifact was "
                "fitted on; refit on data that covers every class"
            )
        return torch.tensor([int(lab) for lab in batch.labels], dtype=torch.int64, device=self.device)

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        labels = self._labels(batch)
        _, _, h, w = batch.pixels.shape
        if self.mode == "class":
            delta = self.class_delta
            if tuple(delta.shape[-2:]) != (h, w):
                delta = F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)
            return delta[labels].float().clamp(-self.epsilon, self.epsilon)
        return self._sample_pgd(batch, labels)

    def _sample_pgd(self, batch: ProtectBatch, labels: torch.Tensor) -> torch.Tensor:
        return self.seeded_pgd(
            batch, lambda xs, ds, ys: pgd_min(self.model, xs, ys, ds, self.epsilon, self.step_size, self.pgd_steps),
            labels).float()
