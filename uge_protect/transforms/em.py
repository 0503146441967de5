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

This module works on tensors only; files are the business of :mod:`artifact` and the pipeline.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.errors import UserError
from uge_protect.transforms.artifact import (
    artifact_fingerprint,
    check_config,
    check_fit_size,
    check_fitted_epsilon,
    load_artifact,
    loading,
)
from uge_protect.transforms.base import APPLY_CHUNK, ProtectBatch, ProtectionMethod, given_options, in_fixed_chunks
from uge_protect.transforms.budget import check_epsilon, pgd_minimize, seeded_uniform
from uge_protect.transforms.networks import ARCHITECTURES, Normalized, build_classifier, set_frozen, small_cnn
from uge_protect.transforms.training import pick_device, shift_flip

MODES = ("sample", "class")
DEFAULT_EPSILON = 8 / 255

Progress = Callable[[dict[str, Any]], None]


@dataclass
class EMConfig:
    """Hyper-parameters of an EM fit.

    Defaults follow the paper for the noise (ε 8/255, step 0.8/255, 20 PGD steps, 10 surrogate
    batches per round, stop below 1% train error) and are sized for a CPU for the surrogate: a
    ``small_cnn`` of width 8, at most 20 rounds (sample) or 30 (class). Sample mode fits with
    random shifts and flips by default (``augment``): on the demo shapes that lowers the worst
    held-out architecture from 37.8% to 27.1% for about the same fit time (docs/efficacy). On an accelerator, a wider or bigger
    surrogate (``surrogate_width=None`` or ``surrogate="resnet18"``) and more rounds are cheap.
    (One sample-mode round on the 5000 32×32 demo images is 100k PGD image-steps: ≈ 1-3 min
    for a width-8 ``small_cnn`` on 2 CPU cores.)
    ``pgd_steps`` is the number of steps per batch of a sample-mode sweep and of apply; the
    class-mode sweep takes one step per batch (as in the reference).
    """

    mode: str = "sample"
    epsilon: float = 8 / 255
    step_size: float = 0.8 / 255
    pgd_steps: int = 20
    surrogate: str = "small_cnn"
    #: Channel width of ``small_cnn`` (None: the architecture's default, 32); other
    #: architectures take None.
    surrogate_width: int | None = 8
    train_batches: int = 10
    #: None: 3 rounds in sample mode (each sweeps every image with ``pgd_steps`` steps), 30 in
    #: class mode (each sweep is one step per batch, so rounds are ~20x cheaper).
    max_rounds: int | None = None
    stop_error: float = 0.01
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    #: Class mode: δ is fitted on a ``pattern_size``×``pattern_size`` grid of blocks and
    #: upsampled (nearest) to the image (None: at full resolution). Coarse patterns survive the
    #: shifts, flips and pooling of other architectures' training.
    pattern_size: int | None = None
    #: Random shifts (up to 4 px) and flips of x + δ in the fit's surrogate steps and PGD steps.
    #: None: on in sample mode (the noise then transfers to other architectures), off in class
    #: mode (where it did not help, and the reference update needs it off).
    augment: bool | None = None
    #: Informational: the side the training images were brought to (None: as stored).
    image_size: int | None = None
    #: Where to fit: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.max_rounds is None:
            # Demo data: sample mode stops (train error < 1%) after 9 rounds, ≈ 4 min on 2 CPU cores.
            self.max_rounds = 20 if self.mode == "sample" else 30
        if self.augment is None:
            self.augment = self.mode == "sample"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown EM mode {self.mode!r}; choose 'sample', 'class' or 'clip'")
        check_epsilon(self.epsilon)
        if not 0.0 < self.step_size <= 1.0:
            raise UserError(f"step size must be in (0, 1], got {self.step_size}")
        if self.surrogate not in ARCHITECTURES:
            raise UserError(f"unknown surrogate {self.surrogate!r}; choose one of: {', '.join(ARCHITECTURES)}")
        if self.surrogate_width is not None:
            if self.surrogate != "small_cnn":
                raise UserError(f"surrogate width applies to small_cnn only, not {self.surrogate!r}")
            if self.surrogate_width < 1:
                raise UserError(f"surrogate width must be >= 1, got {self.surrogate_width}")
        for name in ("pgd_steps", "train_batches", "max_rounds", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.stop_error < 1.0:
            raise UserError(f"stop error must be in [0, 1), got {self.stop_error}")
        if self.lr <= 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")
        if self.pattern_size is not None and self.pattern_size < 1:
            raise UserError(f"pattern size must be >= 1, got {self.pattern_size}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EMConfig":
        """Build from a dict; None means "default". Unknown keys (given, not None) are a :class:`UserError`.

        ``surrogate_width`` 0 (or, for a surrogate other than small_cnn, absent) means the
        architecture's own width."""
        given = given_options(cls, options, f"EM option(s) not used by the {options.get('mode') or 'sample'} mode")
        if given.get("surrogate", "small_cnn") != "small_cnn" and "surrogate_width" not in given:
            given["surrogate_width"] = None  # the default width is small_cnn's
        if given.get("surrogate_width") == 0:
            given["surrogate_width"] = None  # 0: the architecture's own default
        cfg = cls(**given)
        cfg.validate()
        return cfg


@dataclass
class EMFitRecord:
    """What every EM fit (sample, class and clip mode) records about itself in its artifact."""

    fit_size: list[int] | None = None
    n_train: int | None = None
    rounds: int | None = None
    train_error: float | None = None
    #: The networks δ was fitted against (written by the fit, for readers; loaders derive it).
    fit_architectures: list[str] | None = None
    train_error_history: list[float] | None = None
    converged: bool | None = None


@dataclass
class EMArtifact(EMConfig, EMFitRecord):
    """The schema of a sample/class-mode EM artifact's ``config.json``: the fit's
    hyper-parameters and what the fit recorded (see :func:`artifact.check_config`)."""

    num_classes: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {self.num_classes}")
        check_fit_size(self.fit_size)


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


def _class_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                up: Callable[[torch.Tensor], torch.Tensor], view: Callable[[torch.Tensor], torch.Tensor],
                epsilon: float, step_size: float) -> torch.Tensor:
    """One signed-gradient step per sample that *decreases* the cross-entropy of
    ``view(x + up(δ))`` (each sample's class δ on its grid), projected to ``‖δ‖∞ ≤ ε``; the
    caller averages the steps over each class's samples."""
    d = delta.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(view((x + up(d)).clamp(0.0, 1.0))), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, d)
    return (d.detach() - step_size * grad.sign()).clamp_(-epsilon, epsilon)


@torch.no_grad()
def _error(model: nn.Module, x: torch.Tensor, delta_of: Callable[[torch.Tensor], torch.Tensor],
           y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    wrong = 0
    for start in range(0, len(x), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(x)), device=x.device)
        xb = x[idx].float().div_(255.0)
        pred = model((xb + delta_of(idx)).clamp_(0.0, 1.0)).argmax(1)
        wrong += int((pred != y[idx]).sum())
    return wrong / len(x)


def fit_em(
    images: torch.Tensor, labels: torch.Tensor, cfg: EMConfig, progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Fit EM noise by min-min on uint8 ``images`` (N, 3, H, W) with int ``labels`` (N,).

    Returns ``(config, weights)`` for :func:`artifact.save_artifact`: weights hold the
    surrogate's state dict under ``"surrogate"`` and, in class mode, ``{"delta": (C,3,H,W)}``
    under ``"class_noise"``. Deterministic for a given seed on a given device and thread count.
    ``progress`` is called after every round with ``round``, ``train_error`` and ``seconds``.
    """
    cfg.validate()
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    labels = labels.to(torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if len(labels) == 0 or int(labels.min()) < 0:
        raise UserError("every training sample needs a class label >= 0")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise UserError("EM needs at least two classes in the training labels")

    started = time.perf_counter()
    n, _, h, w = images.shape
    device = pick_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device
    model = build_surrogate(cfg.surrogate, num_classes, cfg.surrogate_width, seed=cfg.seed).to(device)
    images, labels = images.to(device), labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    eps = cfg.epsilon
    grid = (min(cfg.pattern_size, h), min(cfg.pattern_size, w)) if cfg.mode == "class" and cfg.pattern_size else (h, w)
    up = (lambda d: d) if grid == (h, w) else (lambda d: F.interpolate(d, size=(h, w), mode="nearest"))  # noqa: E731
    view = (lambda x: shift_flip(x, gen)) if cfg.augment else (lambda x: x)  # noqa: E731
    if cfg.mode == "sample":
        delta = ((torch.rand((n, 3, h, w), generator=gen) * 2 - 1) * eps).to(device)
        delta_of = lambda idx: delta[idx]  # noqa: E731
    else:
        delta = ((torch.rand((num_classes, 3, *grid), generator=gen) * 2 - 1) * eps).to(device)
        delta_of = lambda idx: up(delta)[labels[idx]]  # noqa: E731

    order = torch.randperm(n, generator=gen)
    cursor = 0
    history: list[float] = []
    train_error = 1.0
    for rnd in range(1, cfg.max_rounds + 1):
        # 1. a few surrogate SGD batches on the perturbed data
        model.train()
        set_frozen(model, False)
        for _ in range(cfg.train_batches):
            if cursor + cfg.batch_size > n and cursor > 0:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + cfg.batch_size].to(device)
            cursor += cfg.batch_size
            xb = images[idx].float().div_(255.0)
            loss = F.cross_entropy(model(view((xb + delta_of(idx)).clamp_(0.0, 1.0))), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # 2. a PGD sweep over the whole (un-shuffled) training set, minimising the loss
        model.eval()
        set_frozen(model, True)
        for start in range(0, n, cfg.batch_size):
            idx = torch.arange(start, min(start + cfg.batch_size, n), device=device)
            xb = images[idx].float().div_(255.0)
            yb = labels[idx]
            if cfg.mode == "sample":
                delta[idx] = pgd_min(model, xb, yb, delta[idx], eps, cfg.step_size, cfg.pgd_steps)
            else:
                if grid == (h, w) and not cfg.augment:  # the reference update
                    moved = pgd_min(model, xb, yb, delta[yb], eps, cfg.step_size, 1)
                else:
                    moved = _class_step(model, xb, yb, delta[yb], up, view, eps, cfg.step_size)
                sums = torch.zeros_like(delta).index_add_(0, yb, moved)
                counts = torch.bincount(yb, minlength=num_classes)
                present = counts > 0
                delta[present] = (sums[present] / counts[present].view(-1, 1, 1, 1)).clamp_(-eps, eps)
        # 3. stop when the surrogate fits the perturbed training set
        train_error = _error(model, images, delta_of, labels, cfg.batch_size)
        history.append(round(train_error, 6))
        if progress is not None:
            progress({"round": rnd, "max_rounds": cfg.max_rounds, "train_error": train_error,
                      "seconds": time.perf_counter() - started})
        if train_error < cfg.stop_error:
            break
    set_frozen(model, False)

    config = {
        "method": "em",
        **dataclasses.asdict(cfg),
        "device": device.type,
        "num_classes": num_classes,
        "fit_size": [h, w],
        "n_train": n,
        "rounds": len(history),
        "train_error": history[-1],
        "train_error_history": history,
        "converged": history[-1] < cfg.stop_error,
        "fit_architectures": [cfg.surrogate],
    }
    weights: dict[str, dict[str, torch.Tensor]] = {
        "surrogate": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    }
    if cfg.mode == "class":
        weights["class_noise"] = {"delta": up(delta).cpu().clone()}  # at the fit's resolution
    return config, weights


def fit_em_from_options(
    images: torch.Tensor, labels: torch.Tensor, captions: list[str | None], options: dict[str, Any],
    progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The fitter registered under ``"em"``: sample/class modes fit against a classifier on
    the labels (:func:`fit_em`), the ``clip`` mode against a CLIP on the captions
    (:func:`uge_protect.transforms.em_clip.fit_em_clip`)."""
    if options.get("mode") == "clip":
        from uge_protect.transforms.em_clip import EMClipConfig, fit_em_clip

        return fit_em_clip(images, [str(c) for c in captions], EMClipConfig.from_options(options), progress)
    return fit_em(images, labels, EMConfig.from_options(options), progress)


def em_fit_needs(options: dict[str, Any]) -> str:
    """What an EM fit needs of each training sample: ``"captions"`` (clip mode) or ``"labels"``."""
    return "captions" if options.get("mode") == "clip" else "labels"


def _check_em_config(path: str, config: dict[str, Any]) -> None:
    """Check an EM artifact's config against the schema of its mode."""
    if config.get("mode") == "clip":
        from uge_protect.transforms.em_clip import EMClipArtifact

        check_config(path, config, EMClipArtifact, required=("epsilon", "mode", "step_size", "pgd_steps", "clip_model"))
        return
    # surrogate_width: artifacts older than the field had the architecture's own width
    check_config(path, config, EMArtifact, legacy={"surrogate_width": None},
                 required=("epsilon", "mode", "num_classes", "step_size", "pgd_steps", "surrogate"))


class ErrorMinimizing(ProtectionMethod):
    """Apply a fitted EM artifact: PGD against its surrogate (sample) or a class lookup (class)."""

    name = "em"
    requires_label = True

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                 fingerprint: str | None = None):
        super().__init__(epsilon=float(config["epsilon"]))
        self._config = dict(config)
        self._fingerprint = fingerprint
        self.mode = config.get("mode")
        if self.mode not in MODES:
            raise UserError(f"EM artifact has an unknown mode {self.mode!r}")
        self.num_classes = int(config["num_classes"])
        self.step_size = float(config["step_size"])
        self.pgd_steps = int(config["pgd_steps"])
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
        """Load an artifact made by ``uge-protect fit em``. Its ε is authoritative: an
        ``epsilon`` that differs is an error; None means "not given". The default budget
        (8/255, what the CLI passes when ``--epsilon`` is absent) also counts as "not given"
        for an artifact fitted with a smaller ε, so a run never exceeds the default silently."""
        config, weights = load_artifact(path, expected_method="em", check=lambda c: _check_em_config(path, c))
        check_fitted_epsilon(path, config, epsilon)
        with loading(path, "EM"):
            if config["mode"] == "clip":
                from uge_protect.transforms.em_clip import ErrorMinimizingClip

                return ErrorMinimizingClip(config, weights, fingerprint=artifact_fingerprint(path))  # type: ignore[return-value]
            return cls(config, weights, fingerprint=artifact_fingerprint(path))

    def to(self, device: torch.device | str) -> "ErrorMinimizing":
        super().to(device)
        self.model.to(self.device)
        if self.class_delta is not None:
            self.class_delta = self.class_delta.to(self.device)
        return self

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def config(self) -> dict[str, Any]:
        keep = ("mode", "step_size", "pgd_steps", "surrogate", "surrogate_width", "num_classes",
                "fit_size", "rounds", "train_error")
        return {**super().config(), **{k: self._config.get(k) for k in keep}, "apply_chunk": APPLY_CHUNK}

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
        start = seeded_uniform(batch.seeds, tuple(batch.pixels.shape[1:]), self.epsilon).to(self.device)
        return in_fixed_chunks(
            lambda xs, ds, ys: pgd_min(self.model, xs, ys, ds, self.epsilon, self.step_size, self.pgd_steps),
            batch.images.float(), start, labels).float()
