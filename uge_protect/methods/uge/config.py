"""UGE's options and the schema of its artifact's ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uge_protect.errors import UserError
from uge_protect.methods.artifact import check_fit_size
from uge_protect.methods.base import given_options
from uge_protect.methods.budget import check_epsilon
from uge_protect.methods.uge.key import is_key_fingerprint, normalize_key
from uge_protect.models.classifiers import ARCHITECTURES

#: The students of ``--student auto``: fast learners of two families; the noise they learn
#: transfers to the evaluation's other hackers (ResNet-18 included).
AUTO_STUDENTS = ("small_cnn", "vgg11")


@dataclass
class UGEConfig:
    """Hyper-parameters of a UGE fit; the defaults fit the 5,000 demo images (32×32) in
    minutes on 2 CPU cores (measured figures: docs/methods/uge-efficacy.md)."""

    #: The authorized architecture (a name of the evaluation harness).
    authorized: str = "resnet18"
    #: The secret key, at least 32 hex digits (None: a fresh random one of 64, kept in the
    #: artifact for the owner). Shorter keys are refused: see :func:`uge_key.normalize_key`.
    key_seed: str | None = None
    #: Authorize through the key's colour projection (see the module docstring).
    key_projection: bool = True
    epsilon: float = 8 / 255
    width: int = 32
    depth: int = 4
    steps: int = 400
    batch_size: int = 128
    #: The generator's image-conditioned body learns slowly: early, its image-dependent output
    #: drowns the class patterns the student would pick up (measured: docs/methods/uge-efficacy.md).
    lr: float = 1e-4
    #: Phase 1: epochs of the authorized network on the clean images, and L_gm's snapshots.
    authorized_epochs: int = 3
    authorized_lr: float = 3e-3
    snapshots: int = 4
    #: The L_ud students, comma-separated; L_ud is their mean loss (several make the noise
    #: transfer to more architectures). "auto": small_cnn and vgg11, the plain authorized
    #: architecture (no key) among them only under the key projection. A resnet18 student
    #: made the noise transfer worse and slowed the CPU fit (docs/methods/uge-efficacy.md).
    student: str = "auto"
    student_width: int | None = 8
    #: SGD with momentum 0.9, as EM's surrogate: the min-min needs a student that learns fast.
    student_lr: float = 0.1
    temperature: float = 4.0
    #: Weight of the teacher's soft targets in the student's loss (next to the label term).
    #: The teacher is the authorized network after phase 1; when it is still weak, its
    #: uncertainty is a floor the min-min cannot push the student's loss under.
    distill_weight: float = 0.0
    #: The shared feature space of L_fd: an open_clip model (None: a tiny ViT), pretrained or
    #: trained on the labels for ``feature_epochs``.
    feature_model: str | dict | None = None
    feature_pretrained: str | None = None
    feature_epochs: int = 2
    misalign: bool = True
    gm_weight: float = 1.0
    fd_weight: float = 1.0
    ud_weight: float = 1.0
    #: Random shifts and flips of what the student and the feature space see (EM fits without).
    augment: bool = False
    #: The generator also reads the sample's label (then apply needs a label per sample) and
    #: holds a class pattern of side ``pattern_size``, moved by signed steps of ``pattern_step``
    #: (in units of ε; 0.1 is EM's 0.8/255 at ε = 8/255).
    label_conditioned: bool = True
    pattern_size: int = 32
    pattern_step: float = 0.1
    #: The authorized network as the owner deploys it carries a confidence gate
    #: (:mod:`uge_gate`): on images with the class patterns along the key it answers with
    #: ``gate_scale`` times the one-hot of its arg max (its prediction, unchanged), so a student
    #: distilled from it through the protected images sees labels, not soft outputs. Needs the
    #: key projection and the class patterns; it changes nothing in the fit, only the network
    #: ``eval --authorized`` builds.
    confidence_gate: bool = True
    gate_scale: float = 30.0
    seed: int = 0
    image_size: int | None = None
    device: str = "auto"

    def validate(self) -> None:
        if self.authorized not in ARCHITECTURES:
            raise UserError(f"unknown authorized architecture {self.authorized!r}; choose one of: {', '.join(ARCHITECTURES)}")
        for name in self.students:
            if name not in ARCHITECTURES:
                raise UserError(f"unknown student architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
        if self.student_width is not None and "small_cnn" not in self.students and self.student != "auto":
            raise UserError("student width applies to small_cnn only")
        if self.key_seed is not None:
            normalize_key(self.key_seed)
        check_epsilon(self.epsilon)
        for name in ("width", "depth", "steps", "batch_size", "authorized_epochs", "snapshots", "pattern_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.feature_epochs < 0:
            raise UserError(f"feature epochs must be >= 0, got {self.feature_epochs}")
        for name in ("gm_weight", "fd_weight", "ud_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{name.replace('_', ' ')} must be >= 0, got {getattr(self, name)}")
        if self.gm_weight == self.fd_weight == self.ud_weight == 0:
            raise UserError("at least one of the UGE losses needs a weight above 0")
        if min(self.lr, self.authorized_lr, self.student_lr, self.temperature) <= 0:
            raise UserError("learning rates and the temperature must be > 0")
        if self.gate_scale < 1:
            raise UserError(f"gate scale must be >= 1, got {self.gate_scale}")
        if self.student_width is not None and self.student_width < 1:
            raise UserError(f"student width must be >= 1, got {self.student_width}")
        if self.pattern_step < 0 or self.distill_weight < 0:
            raise UserError("the pattern step and the distillation weight must be >= 0")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "UGEConfig":
        """Build from a dict (None means "default"); unknown keys are a :class:`UserError`."""
        given = given_options(cls, options, "UGE option(s) not known")
        student = str(given.get("student", "auto"))
        if student != "auto" and "small_cnn" not in student.split(",") and "student_width" not in given:
            given["student_width"] = None
        if given.get("student_width") == 0:
            given["student_width"] = None
        if "key_seed" in given:
            given["key_seed"] = normalize_key(given["key_seed"])
        cfg = cls(**given)
        cfg.validate()
        return cfg

    @property
    def students(self) -> list[str]:
        """The student architectures."""
        if self.student.strip() == "auto":
            return [s for s in AUTO_STUDENTS if self.key_projection or s != self.authorized]
        return [s.strip() for s in self.student.split(",") if s.strip()]

    @property
    def gated(self) -> bool:
        """Whether the authorized network carries the confidence gate (see :mod:`uge_gate`)."""
        return self.confidence_gate and self.key_projection and self.label_conditioned

    @property
    def gm_active(self) -> bool:
        """Whether L_gm can be non-zero: under the key projection δ is invisible to the
        authorized network, so its gradients on x + δ and x are the same."""
        return self.gm_weight > 0 and not self.key_projection


@dataclass
class UGEArtifact(UGEConfig):
    """The schema of a UGE artifact's ``config.json``: the fit's hyper-parameters (the key
    among them) and what the fit recorded (see :func:`artifact.check_config`)."""

    num_classes: int | None = None
    #: The networks δ was fitted against (written by the fit, for readers; loaders derive it).
    fit_architectures: list[str] | None = None
    gm_active: bool | None = None
    key_fingerprint: str | None = None
    authorized_init_fingerprint: str | None = None
    fit_size: list[int] | None = None
    n_train: int | None = None
    processes: int | None = None
    loss_history: list[dict[str, Any]] | None = None
    student_train_acc_protected: float | None = None
    fit_seconds: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.key_seed is None or normalize_key(self.key_seed) != self.key_seed:
            raise UserError("key_seed must hold the key as lowercase hex digits")
        if self.key_fingerprint is not None and not is_key_fingerprint(self.key_fingerprint):
            raise UserError("key_fingerprint is not a salted fingerprint made by `fit uge`")
        if self.num_classes is not None and self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {self.num_classes}")
        check_fit_size(self.fit_size)


#: What applying a UGE artifact reads of its config.
APPLY_FIELDS = ("epsilon", "key_seed", "key_projection", "width", "depth", "authorized", "num_classes")
