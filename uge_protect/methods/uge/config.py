"""UGE's options and the schema of its artifact's ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uge_protect.errors import UserError
from uge_protect.methods.artifact import FitRecord, check_fit_size
from uge_protect.methods.base import given_options
from uge_protect.methods.budget import check_epsilon
from uge_protect.methods.uge.key import is_key_fingerprint, normalize_key
from uge_protect.models.classifiers import ARCHITECTURES
from uge_protect.options import check_options, device_option, epsilon_option, image_size_option, option, seed_option

#: The students of ``--student auto``: fast learners of two families; the noise they learn
#: transfers to the evaluation's other hackers (ResNet-18 included).
AUTO_STUDENTS = ("small_cnn", "vgg11")


@dataclass
class UGEConfig:
    """Hyper-parameters of a UGE fit; the defaults fit the 5,000 demo images (32×32) in
    minutes on 2 CPU cores (measured figures: docs/efficacy/uge.md)."""

    authorized: str = option("resnet18", choices=ARCHITECTURES, label="authorized architecture", required=True,
                             help=f"The authorized architecture: {', '.join(ARCHITECTURES)}.")
    #: Kept in the artifact for the owner; see :func:`uge.key.normalize_key`.
    key_seed: str | None = option(None, default_help="a fresh 256-bit key from the OS, kept in the artifact", help=(
        "Secret key, at least 32 random hex digits (128 bits): seeds the authorized network and its colour "
        "projection. Shorter keys are refused."))
    key_projection: bool = option(True, help=(
        "Authorize through the key's colour projection; off: the bare architecture, as in the paper."))
    #: See :mod:`uge.texture_key`; "colour" is the 13-direction key of earlier versions.
    key_scheme: str = option("colour", choices=("colour", "texture"), help=(
        "What the key hides: colour, a secret colour direction (one of 13); texture, secret class "
        "textures at a secret phase per image (about 2^232 keys for 10 classes; needs the key projection and labels)."))
    epsilon: float = epsilon_option()
    width: int = option(32, min=1, help="Generator channel width.")
    depth: int = option(4, min=1, help="Generator residual blocks.")
    steps: int = option(400, min=1, help="Generator steps.")
    batch_size: int = option(128, min=1, help="Batch size over all processes.")
    #: The generator's image-conditioned body learns slowly: early, its image-dependent output
    #: drowns the class patterns the student would pick up (measured: docs/efficacy/uge.md).
    lr: float = option(1e-4, min=0, min_open=True, label="learning rate",
                       help="Generator learning rate, AdamW with a cosine schedule.")
    authorized_epochs: int = option(3, min=1, help=(
        "Epochs of the authorized network on the clean images before the generator starts."))
    authorized_lr: float = option(3e-3, min=0, min_open=True, label="authorized learning rate", cli=False,
                                  help="Learning rate of the authorized network before the generator starts.")
    snapshots: int = option(4, min=1, help="Points of the authorized network's trajectory L_gm matches at.")
    #: L_ud is the students' mean loss (several make the noise transfer to more architectures).
    #: A resnet18 student made the noise transfer worse and slowed the CPU fit
    #: (docs/efficacy/uge.md).
    student: str = option("auto", help=(
        "Architecture(s) of the L_ud students, comma-separated, or auto: small_cnn (width 8) and vgg11; the "
        "plain authorized architecture is one only under the key projection."))
    student_width: int | None = option(8, min=1, cli=False, help=(
        "Channel width of a small_cnn student (0: the architecture's default)."))
    #: EM's surrogate's optimiser: the min-min needs a student that learns fast.
    student_lr: float = option(0.1, min=0, min_open=True, label="student learning rate", cli=False,
                               help="Learning rate of the students (SGD with momentum 0.9).")
    temperature: float = option(4.0, min=0, min_open=True, cli=False, help="Temperature of the distillation in L_ud.")
    #: The teacher is the authorized network after phase 1; when it is still weak, its
    #: uncertainty is a floor the min-min cannot push the student's loss under.
    distill_weight: float = option(0.0, min=0, label="distillation weight", help=(
        "Weight of the authorized network's soft targets in the student's loss, next to the labels."))
    feature_model: str | dict | None = option(None, default_help="a tiny ViT", help=(
        "L_fd's shared feature space: an open_clip model name or JSON config (or, in Python, a config dict)."))
    feature_pretrained: str | None = option(None, default_help="trained on the labels", help=(
        "open_clip pretrained tag or local checkpoint for the feature space."))
    feature_epochs: int = option(2, min=0, help="Epochs training the feature space on the labels when not pretrained.")
    misalign: bool = option(True, help="L_fd also pulls x+δ toward another class's prototype.")
    gm_weight: float = option(1.0, min=0, help="Weight of L_gm, gradient matching (0: off).")
    fd_weight: float = option(1.0, min=0, help="Weight of L_fd, feature distance (0: off).")
    ud_weight: float = option(1.0, min=0, help="Weight of L_ud, undistillation (0: off).")
    #: EM fits without.
    augment: bool = option(False, help="Random shifts and flips of what the student and feature space see.")
    label_conditioned: bool = option(True, flag="--label-conditioned/--image-only", help=(
        "The generator also reads each sample's label and holds a pattern per class; `shard` then needs a "
        "label per sample. --image-only: from the image alone."))
    pattern_size: int = option(32, min=1, help="Side of the class patterns' grid, upsampled to the image.")
    #: 0.1 ε is EM's step, 0.8/255, at ε = 8/255.
    pattern_step: float = option(0.1, min=0, help="Signed step of the class patterns, in units of ε.")
    #: See :mod:`uge.gate`. It changes nothing in the fit, only the network ``eval --authorized`` builds.
    confidence_gate: bool = option(True, help=(
        "The owner's network (as `eval --authorized` builds it) answers images carrying the class patterns "
        "with its label only (GATE_SCALE times a one-hot), so a student distilled through protected images "
        "learns from labels; predictions are unchanged (needs the key projection and the class patterns; "
        "under the texture key it looks for the class textures)."))
    gate_scale: float = option(30.0, min=1, help="The confidence gate's one-hot logit on protected images.")
    seed: int = seed_option("Seed of the fit (not the key).")
    image_size: int | None = image_size_option()
    device: str = device_option()

    def validate(self) -> None:
        check_options(self)
        for name in self.students:
            if name not in ARCHITECTURES:
                raise UserError(f"unknown student architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
        if self.student_width is not None and "small_cnn" not in self.students and self.student != "auto":
            raise UserError("student width applies to small_cnn only")
        if self.key_seed is not None:
            normalize_key(self.key_seed)
        check_epsilon(self.epsilon)
        if self.key_scheme == "texture" and not (self.key_projection and self.label_conditioned):
            raise UserError("the texture key needs the key projection and the class labels "
                            "(drop --no-key-projection and --image-only)")
        if self.gm_weight == self.fd_weight == self.ud_weight == 0:
            raise UserError("at least one of the UGE losses needs a weight above 0")

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
class UGEArtifact(UGEConfig, FitRecord):
    """The schema of a UGE artifact's ``config.json``: the fit's hyper-parameters (the key
    among them) and what the fit recorded (see :func:`artifact.check_config`)."""

    num_classes: int | None = None
    gm_active: bool | None = None
    key_fingerprint: str | None = None
    authorized_init_fingerprint: str | None = None
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
