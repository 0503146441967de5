"""EM's options and the schemas of its artifacts' ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uge_protect.errors import UserError
from uge_protect.methods.artifact import FitRecord, check_fit_size
from uge_protect.methods.base import given_options
from uge_protect.methods.budget import check_epsilon
from uge_protect.models.classifiers import ARCHITECTURES
from uge_protect.models.clip import check_local_model_config
from uge_protect.options import (check_choice, check_options, device_option, epsilon_option, image_size_option,
                                 option, seed_option)

#: The modes of :class:`EMConfig` (a classifier surrogate, labelled data).
MODES = ("sample", "class")
#: Every mode ``fit em`` takes: clip mode is :class:`EMClipConfig`'s.
FIT_MODES = (*MODES, "clip")


@dataclass
class EMConfig:
    """Hyper-parameters of an EM fit in sample or class mode.

    The noise's defaults (ε, step, PGD steps, surrogate batches per round, the stop error)
    follow the paper; the surrogate's are sized for a CPU (a narrow ``small_cnn``, few rounds).
    Sample mode fits with random shifts and flips by default (``augment``; measured in
    docs/methods/em.md). On an accelerator, a wider or bigger surrogate (``surrogate_width=None``
    or ``surrogate="resnet18"``) and more rounds are cheap. (One sample-mode round on the 5000
    32×32 demo images is 100k PGD image-steps; fit times are in docs/methods/em.md.)
    ``pgd_steps`` is the number of steps per batch of a sample-mode sweep and of apply; the
    class-mode sweep takes one step per batch (as in the reference).
    """

    mode: str = option("sample", choices=MODES, label="EM mode", passed=True, help=(
        "sample (PGD per image at apply), class (one δ per class), or clip (PGD per image-caption pair "
        "against a CLIP; needs captions, not labels)."))
    epsilon: float = epsilon_option()
    step_size: float = option(0.8 / 255, min=0, max=1, min_open=True, help="PGD step in [0,1] units.")
    pgd_steps: int = option(20, min=1, help="PGD steps per batch of a sweep and at apply.")
    surrogate: str = option("small_cnn", choices=ARCHITECTURES, help="Surrogate classifier (resnet18, vgg11, ...).")
    #: Other architectures than small_cnn take None.
    surrogate_width: int | None = option(8, min=1, help=(
        "small_cnn channel width (0: the architecture's default, 32; other surrogates: their own)."))
    train_batches: int = option(10, min=1, help="Surrogate training batches per round.")
    #: Each sample-mode round sweeps every image with ``pgd_steps`` steps; a class-mode sweep
    #: is one step per batch, so its rounds are ~20x cheaper.
    max_rounds: int | None = option(None, min=1, default_help="20 sample, 30 class",
                                    help="Stop after this many rounds.")
    stop_error: float = option(0.01, min=0, max=1, max_open=True,
                               help="Stop when the surrogate's error on x+δ (train error; clip mode: retrieval "
                                    "error) is below this.")
    batch_size: int = option(128, min=1, help="Batch size.")
    lr: float = option(0.1, min=0, min_open=True, label="learning rate",
                       help="Surrogate learning rate (SGD; clip mode: AdamW).")
    momentum: float = option(0.9, min=0, max=1, max_open=True, cli=False, help="SGD momentum of the surrogate.")
    weight_decay: float = option(5e-4, min=0, cli=False, help="Weight decay of the surrogate.")
    seed: int = seed_option("Seed of the fit (initial noise, surrogate, batch order).")
    #: Coarse patterns survive the shifts, flips and pooling of other architectures' training.
    pattern_size: int | None = option(None, min=1, modes="class", default_help="full resolution", help=(
        "Fit δ on an N×N grid of blocks, upsampled (nearest) to the image."))
    #: Off in class mode: it did not help there, and the reference update needs it off.
    augment: bool | None = option(None, default_help="on in sample mode, off in class mode", help=(
        "Random shifts (up to 4 px) and flips of x+δ in the surrogate's and PGD steps."))
    #: Informational: the side the training images were brought to (None: as stored).
    image_size: int | None = image_size_option()
    device: str = device_option()

    def __post_init__(self) -> None:
        if self.max_rounds is None:
            # Demo data: sample mode stops (train error < 1%) well within 20 rounds (docs/methods/em.md).
            self.max_rounds = 20 if self.mode == "sample" else 30
        if self.augment is None:
            self.augment = self.mode == "sample"

    def validate(self) -> None:
        check_options(self)
        check_epsilon(self.epsilon)
        if self.surrogate_width is not None and self.surrogate != "small_cnn":
            raise UserError(f"surrogate width applies to small_cnn only, not {self.surrogate!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EMConfig":
        """Build from a dict; None means "default". Unknown keys (given, not None) are a :class:`UserError`.

        ``surrogate_width`` 0 (or, for a surrogate other than small_cnn, absent) means the
        architecture's own width."""
        check_choice("EM mode", options.get("mode") or "sample", FIT_MODES)
        given = given_options(cls, options, f"EM option(s) not used by the {options.get('mode') or 'sample'} mode")
        if given.get("surrogate", "small_cnn") != "small_cnn" and "surrogate_width" not in given:
            given["surrogate_width"] = None  # the default width is small_cnn's
        if given.get("surrogate_width") == 0:
            given["surrogate_width"] = None  # 0: the architecture's own default
        cfg = cls(**given)
        cfg.validate()
        return cfg


@dataclass
class EMFitRecord(FitRecord):
    """What every EM fit (sample, class and clip mode) records about itself in its artifact."""

    rounds: int | None = None
    train_error: float | None = None
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


@dataclass
class EMClipConfig:
    """Hyper-parameters of an EM-CLIP fit.

    ε and the step are the paper's. PGD takes half the paper's steps per sweep and at apply:
    δ persists across rounds, so the fit still converges, and apply costs half. The surrogate
    takes many AdamW steps per round: a CLIP trained from scratch needs more steps than a
    classifier before its loss guides PGD. On the 5,000 demo pairs (32×32) these defaults
    converge in a few rounds, where 10 batches per round at lr 1e-3 did not (docs/methods/em.md,
    clip mode).
    """

    mode: str = option("clip", choices=("clip",), label="EM-CLIP mode", passed=True, help="clip.")
    epsilon: float = epsilon_option()
    step_size: float = option(0.8 / 255, min=0, max=1, min_open=True, help="PGD step in [0,1] units.")
    pgd_steps: int = option(10, min=1, help="PGD steps per batch of a sweep and at apply.")
    clip_model: str | dict | None = option(None, default_help="a tiny ViT CLIP", help=(
        "Surrogate CLIP: an open_clip model name or JSON config (or, in Python, a config dict)."))
    clip_pretrained: str | None = option(None, default_help="trained from scratch", help=(
        "open_clip pretrained tag or local checkpoint; the surrogate then stays frozen."))
    bank_size: int = option(255, min=1, help="Training captions kept as the fixed negatives of the per-sample loss.")
    train_batches: int = option(100, min=1, help="Surrogate training batches per round.")
    max_rounds: int = option(10, min=1, help="Stop after this many rounds.")
    stop_error: float = option(0.01, min=0, max=1, max_open=True,
                               help="Stop when the surrogate's retrieval error on x+δ is below this.")
    batch_size: int = option(128, min=2, reason=" for a contrastive loss", help="Batch size.")
    lr: float = option(2e-3, min=0, min_open=True, label="learning rate", help="Surrogate learning rate (AdamW).")
    weight_decay: float = option(0.1, min=0, cli=False, help="AdamW weight decay of the surrogate.")
    seed: int = seed_option("Seed of the fit (initial noise, surrogate, batch order).")
    image_size: int | None = image_size_option()
    device: str = device_option()

    def validate(self) -> None:
        check_options(self)
        check_epsilon(self.epsilon)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "EMClipConfig":
        """Build from a dict; None means "default". Unknown keys are a :class:`UserError`."""
        cfg = cls(**given_options(cls, options, "option(s) not used by EM's CLIP mode"))
        cfg.validate()
        return cfg


@dataclass
class EMClipArtifact(EMClipConfig, EMFitRecord):
    """The schema of a clip-mode EM artifact's ``config.json`` (see :func:`artifact.check_config`)."""

    surrogate_trained: bool | None = None

    def validate(self) -> None:
        super().validate()
        if self.clip_model is None:
            raise UserError("clip_model must name the surrogate CLIP (a model name or config)")
        check_local_model_config(self.clip_model, "clip_model")
        check_fit_size(self.fit_size)
