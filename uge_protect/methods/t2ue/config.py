"""T2UE's options and the schema of its artifact's ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from uge_protect.errors import UserError
from uge_protect.methods.artifact import check_fit_size
from uge_protect.methods.base import given_options
from uge_protect.methods.budget import check_epsilon
from uge_protect.methods.t2ue.generators import BACKBONES
from uge_protect.models.clip import check_local_model_config

MODES = ("sample", "class")
TEXT_ENCODINGS = ("static", "contextual")
OBJECTIVES = ("em", "infonce")
DEFAULT_TEMPLATE = "a photo of a {}"
TEXT_POOLS = ("eot", "mean")


@dataclass
class T2UEConfig:
    """Hyper-parameters of a T2UE fit.

    ε, z (100-d), batch 128 and AdamW with a cosine schedule follow the paper; the sizes are
    set by the time budget of a fit on one CPU core (figures: docs/methods/t2ue-infonce.md).
    The paper's lr of 1e-4 is for a frozen pretrained surrogate; 2e-3 moved faster here.
    """

    #: ``em`` (default): class-wise EM noise per concept, amortised into G(caption, z)
    #: (:mod:`t2ue_amortised`). ``infonce``: the paper's Eq. 4 against a surrogate CLIP.
    objective: str = "em"
    #: ``auto``: ``mlp`` for the em objective, ``ssa`` for infonce.
    backbone: str = "auto"
    epsilon: float = 8 / 255
    noise_size: int = 32
    z_dim: int = 100
    width: int = 16
    surrogate: str | dict | None = None
    surrogate_pretrained: str | None = None
    #: Generator steps (None: 2000 regression steps for em, 400 for infonce).
    steps: int | None = None
    warmup_steps: int = 200
    batch_size: int = 128
    #: Generator learning rate (None: 1e-3 for em, 2e-3 for infonce).
    lr: float | None = None
    weight_decay: float = 1e-4
    surrogate_lr: float = 2e-3
    #: Weight of an extra InfoNCE on (grey + δ, text): the noise alone must identify its caption.
    #: Not in the paper (0 gives its Eq. 4 exactly); docs/methods/t2ue-infonce.md says why and what it changes.
    noise_weight: float = 0.0
    #: From-scratch surrogate only: after the warm-up (whose text tower becomes the caption
    #: encoder) the min-min starts from a freshly initialised surrogate.
    restart_surrogate: bool = True
    #: Subtract the mean caption embedding of the training set before conditioning (and
    #: renormalise), so captions that differ in one word get visibly different inputs.
    center_text: bool = False
    #: The caption embedding the ``ssa`` generator is conditioned on: ``eot`` (CLIP's) or ``mean``.
    text_pool: str = "eot"
    #: From-scratch surrogate only: keep its (initial) text tower frozen, the conditioning
    #: encoder's twin, and train only its image tower (and temperature).
    lock_text: bool = False
    #: Random shifts (up to 4 px, edge padding) and flips of what the surrogate sees, so the
    #: noise stays readable under the crops and flips of downstream training.
    augment: bool = False
    #: Class names: labelled samples also train the noise of their class prompt
    #: (``template`` filled with the name), scored as a zero-shot classifier over all prompts.
    class_names: list[str] | None = None
    template: str = "a photo of a {}"
    class_weight: float = 1.0
    #: em objective: the caption encoder (``minilm``, a sentence-transformers directory or Hub
    #: name, or ``open_clip``: the text tower of ``surrogate`` / ``surrogate_pretrained``).
    text_encoder: str = "minilm"
    #: em objective, sentence encoders: ``static`` (default) distils the encoder into one vector
    #: per token (:mod:`static_text`), which the artifact carries and which applies ~50× faster
    #: on a CPU; ``contextual`` runs the encoder itself at apply. None: static, or contextual
    #: for ``open_clip``.
    text_encoding: str | None = None
    #: em objective: concept names; each caption's concept is the nearest prompt of one.
    concepts: list[str] | None = None
    #: em objective: concepts are this many caption clusters (cosine k-means), even where labels
    #: exist (None: the labels, or 10 clusters of captions without them).
    clusters: int | None = None
    #: em objective: rounds of the class-wise EM fit (None: EM's default).
    em_rounds: int | None = None
    #: em objective: EM stops when its surrogate's train error is below this (None: EM's 0.01;
    #: 0: always ``em_rounds`` rounds).
    em_stop_error: float | None = None
    seed: int = 0
    image_size: int | None = None
    device: str = "auto"

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown T2UE objective {self.objective!r}; choose em or infonce")
        if self.backbone != "auto" and self.backbone not in BACKBONES:
            raise UserError(f"unknown T2UE backbone {self.backbone!r}; choose ssa, unet or mlp")
        if self.objective == "em" and self.backbone == "unet":
            raise UserError("the em objective conditions on one caption embedding: choose the mlp or ssa backbone")
        if self.clusters is not None and self.clusters < 2:
            raise UserError(f"clusters must be >= 2, got {self.clusters}")
        if self.em_rounds is not None and self.em_rounds < 1:
            raise UserError(f"EM rounds must be >= 1, got {self.em_rounds}")
        if self.em_stop_error is not None and not 0 <= self.em_stop_error < 1:
            raise UserError(f"EM stop error must be in [0, 1), got {self.em_stop_error}")
        if self.concepts is not None and (len(self.concepts) < 2 or len(set(self.concepts)) != len(self.concepts)
                                          or not all(isinstance(c, str) and c.strip() for c in self.concepts)):
            raise UserError("concepts must be at least two distinct, non-empty names")
        if not isinstance(self.text_encoder, str) or not self.text_encoder.strip():
            raise UserError("the caption encoder must be named")
        if self.text_encoding is not None and self.text_encoding not in TEXT_ENCODINGS:
            raise UserError(f"unknown caption encoding {self.text_encoding!r}; choose static or contextual")
        if self.text_encoding == "static" and self.text_encoder == "open_clip":
            raise UserError("the open_clip caption encoder is contextual only: drop --text-encoding static")
        if self.text_pool not in TEXT_POOLS:
            raise UserError(f"unknown text pooling {self.text_pool!r}; choose eot or mean")
        check_epsilon(self.epsilon)
        if self.noise_size < 8:
            raise UserError(f"noise size must be >= 8, got {self.noise_size}")
        for name in ("z_dim", "width", "steps", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise UserError("warmup steps must be >= 0")
        if self.batch_size < 2:
            raise UserError("batch size must be >= 2 for a contrastive loss")
        if (self.lr is not None and self.lr <= 0) or self.surrogate_lr <= 0:
            raise UserError("learning rates must be > 0")
        if self.noise_weight < 0 or self.class_weight < 0:
            raise UserError("loss weights must be >= 0")
        if "{}" not in self.template:
            raise UserError(f"the class template must contain '{{}}' for the class name, got {self.template!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "T2UEConfig":
        """Build from a dict; None means "default"; unknown keys are a :class:`UserError`."""
        cfg = cls(**given_options(cls, options, "unknown T2UE option(s)"))
        cfg.validate()
        return cfg

    def resolved(self) -> "T2UEConfig":
        """A copy with the objective's defaults filled in (backbone, steps, lr)."""
        em = self.objective == "em"
        return dataclasses.replace(
            self, backbone=("mlp" if em else "ssa") if self.backbone == "auto" else self.backbone,
            steps=self.steps if self.steps is not None else (2000 if em else 400),
            lr=self.lr if self.lr is not None else (1e-3 if em else 2e-3),
            text_encoding=self.text_encoding or ("contextual" if self.text_encoder == "open_clip" else "static"))


@dataclass
class T2UEArtifact(T2UEConfig):
    """The schema of a T2UE artifact's ``config.json``: the fit's hyper-parameters and what
    the fit recorded (see :func:`artifact.check_config`)."""

    #: The networks δ was fitted against (written by the fit, for readers; loaders derive it).
    fit_architectures: list[str] | None = None
    text_dim: int | None = None
    token_dim: int | None = None
    context_length: int | None = None
    fit_size: list[int] | None = None
    n_train: int | None = None
    loss_history: list[dict[str, Any]] | None = None
    final_loss: float | None = None
    surrogate_trained: bool | None = None
    processes: int | None = None
    #: em objective: the caption encoder's name, weights sha256, dimension and pooling.
    text_encoder_identity: dict | None = None
    concept_source: str | None = None
    num_concepts: int | None = None
    concept_counts: list[int] | None = None
    regression: dict | None = None
    em: dict | None = None

    def validate(self) -> None:
        super().validate()
        if self.backbone == "auto":
            raise UserError("backbone must name the generator (ssa, unet or mlp)")
        if self.objective == "em" and self.text_encoder != "open_clip":
            ident = self.text_encoder_identity
            if not (isinstance(ident, dict) and isinstance(ident.get("name"), str)
                    and isinstance(ident.get("sha256"), str) and isinstance(ident.get("dim"), int)):
                raise UserError("text_encoder_identity must record the caption encoder's name, sha256 and dim")
            return
        if self.surrogate is None:
            raise UserError("surrogate must name the caption encoder's CLIP (a model name or config)")
        check_local_model_config(self.surrogate, "surrogate")
        for name in ("text_dim", "token_dim", "context_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        check_fit_size(self.fit_size)
