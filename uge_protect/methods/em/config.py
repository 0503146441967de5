"""EM's options and the schemas of its artifacts' ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uge_protect.errors import UserError
from uge_protect.methods.artifact import check_fit_size
from uge_protect.methods.base import given_options
from uge_protect.methods.budget import check_epsilon
from uge_protect.models.classifiers import ARCHITECTURES
from uge_protect.models.clip import check_local_model_config

MODES = ("sample", "class")


@dataclass
class EMConfig:
    """Hyper-parameters of an EM fit.

    Defaults follow the paper for the noise (ε 8/255, step 0.8/255, 20 PGD steps, 10 surrogate
    batches per round, stop below 1% train error) and are sized for a CPU for the surrogate: a
    ``small_cnn`` of width 8, at most 20 rounds (sample) or 30 (class). Sample mode fits with
    random shifts and flips by default (``augment``): on the demo shapes that lowers the worst
    held-out architecture for about the same fit time (docs/methods/em.md). On an accelerator, a wider or bigger
    surrogate (``surrogate_width=None`` or ``surrogate="resnet18"``) and more rounds are cheap.
    (One sample-mode round on the 5000 32×32 demo images is 100k PGD image-steps; fit times
    are in docs/methods/em.md.)
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
            # Demo data: sample mode stops (train error < 1%) well within 20 rounds (docs/methods/em.md).
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


@dataclass
class EMClipConfig:
    """Hyper-parameters of an EM-CLIP fit.

    ε and the step are the paper's (8/255, 0.8/255). PGD takes 10 steps per sweep and at
    apply (the paper's EM takes 20): δ persists across rounds, so the fit still converges,
    and apply costs half. The surrogate takes 100 AdamW steps (lr 2e-3) per round: a CLIP
    trained from scratch needs more steps than a classifier before its loss guides PGD. On
    the 5,000 demo pairs (32×32) these defaults converge in a few rounds, where 10 batches per
    round at lr 1e-3 did not (docs/methods/em.md, clip mode).
    """

    mode: str = "clip"
    epsilon: float = 8 / 255
    step_size: float = 0.8 / 255
    pgd_steps: int = 10
    #: open_clip model name, JSON config path or dict; None: :data:`clip_models.TINY_CLIP_CONFIG`.
    clip_model: str | dict | None = None
    #: Pretrained weights (open_clip tag or local checkpoint); None: trained from scratch.
    clip_pretrained: str | None = None
    bank_size: int = 255
    train_batches: int = 100
    max_rounds: int = 10
    stop_error: float = 0.01
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    seed: int = 0
    image_size: int | None = None
    device: str = "auto"

    def validate(self) -> None:
        if self.mode != "clip":
            raise UserError(f"EM-CLIP mode must be 'clip', got {self.mode!r}")
        check_epsilon(self.epsilon)
        if not 0.0 < self.step_size <= 1.0:
            raise UserError(f"step size must be in (0, 1], got {self.step_size}")
        for name in ("pgd_steps", "train_batches", "max_rounds", "batch_size", "bank_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserError("batch size must be >= 2 for a contrastive loss")
        if not 0.0 <= self.stop_error < 1.0:
            raise UserError(f"stop error must be in [0, 1), got {self.stop_error}")
        if self.lr <= 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")

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
