"""``t2ue``: Text-to-Unlearnable Examples (arXiv 2508.03091), noise made from the caption alone.

A generator G(text, z) → δ (‖δ‖∞ ≤ ε through ε·tanh) is trained to minimise a surrogate
CLIP's symmetric InfoNCE on (image + G(text, z), text) pairs (paper Eq. 4): noise that makes
image-caption pairs trivially easy to match, so a model trained on them learns the noise.

* Caption features come from a **frozen** open_clip text tower (the conditioning encoder):
  the pooled, normalised embedding for the ``ssa`` generator, the token states for ``unet``.
* With pretrained surrogate weights (an open_clip tag or a local checkpoint) the surrogate
  stays frozen and also serves as the conditioning encoder, as in the paper.
* Without them the surrogate is trained from scratch on the training pairs: first
  ``warmup_steps`` plain CLIP steps on clean pairs, after which a frozen copy of its text
  tower becomes the conditioning encoder; then generator and surrogate steps alternate
  (min-min), both lowering the InfoNCE.

Apply needs only captions: ``sample`` mode draws z from the sample's seed (key + run seed);
``class`` mode turns the label into a caption with a template and uses one fixed z per class.
The noise is generated at ``noise_size`` and resized bilinearly to each image (a convex
combination, so the budget holds). Fitting is :mod:`uge_protect.methods.t2ue.fit`; this module
applies a fitted artifact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.methods.artifact import (artifact_fingerprint, check_config, check_fitted_epsilon, load_artifact,
    loading)
from uge_protect.methods.base import APPLY_CHUNK, FittedMethod, ProtectBatch, clip_arch_id, in_fixed_chunks, sample_seed
from uge_protect.methods.t2ue.config import DEFAULT_TEMPLATE, MODES, T2UEArtifact, TEXT_POOLS
from uge_protect.methods.t2ue.generators import build_generator
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.clip import ClipBundle, build_clip_model


def text_features(bundle: ClipBundle, tokens: torch.Tensor, pool: str = "eot"
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Pooled normalised embeddings (B, D) and token states with their mask ((B, L, W), (B, L)).

    ``pool="eot"`` is CLIP's own caption embedding (end-of-text token, projected); ``"mean"``
    averages the token states (width W), which keeps every word of the caption visible even
    in an untrained tower.
    """
    model = bundle.model
    if not hasattr(model, "token_embedding"):
        raise UserError("T2UE needs an open_clip CLIP with its own text transformer (not an HF text tower)")
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    from open_clip.transformer import text_global_pool

    pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    mask = (tokens != 0).to(x.dtype)
    mask[:, 0] = 1.0  # never an all-masked row
    if pool == "mean":
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled.float(), dim=-1), (x.float(), mask)


def centered(emb: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """``emb`` minus the caption mean, renormalised (unchanged when ``mean`` is None)."""
    return emb if mean is None else F.normalize(emb - mean.to(emb.device), dim=-1)


def class_latent(seed: int, label: int, z_dim: int) -> torch.Tensor:
    """The fixed z of class ``label`` in class mode, for an apply ``seed``."""
    return latent(sample_seed(seed, f"class:{int(label)}"), z_dim)


def latent(seed: int, z_dim: int) -> torch.Tensor:
    """z ~ N(0, I) from a seed, drawn on the CPU (the same on every device)."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(int(seed)))


def _resize_noise(delta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``delta`` bilinearly resized to (h, w), in channels-last layout: the same values as
    from NCHW (tested), several times faster on the CPU, and laid out as the pipeline's
    decoded images are."""
    if tuple(delta.shape[-2:]) == (h, w):
        return delta
    delta = delta.contiguous(memory_format=torch.channels_last)
    return F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)


def _artifact_sentence_encoder(config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> Any:
    """The caption encoder of an ``em``-objective artifact with a sentence encoder, cached."""
    from uge_protect.models import static_text
    from uge_protect.models.text_encoders import MINILM, CachedEncoder, encoder_from_tensors, load_text_encoder

    ident = config["text_encoder_identity"]
    # the static table or encoder files the artifact carries, or the installed MiniLM
    # package: never a path or a Hub name read from the (untrusted) artifact
    if ident.get("pooling") == static_text.POOLING:
        if "text_encoder" not in weights:
            raise UserError("T2UE artifact records a static caption encoder but does not carry it "
                            "(text_encoder.safetensors); refit it")
        sentence = static_text.from_tensors(weights["text_encoder"], ident)
    elif ident["name"] == MINILM:
        sentence = load_text_encoder(MINILM, expected_sha256=str(ident["sha256"]))
    elif "text_encoder" in weights:
        sentence = encoder_from_tensors(weights["text_encoder"], name=str(ident["name"]),
                                        where="T2UE artifact's caption encoder",
                                        expected_sha256=str(ident["sha256"]))
    else:
        raise UserError("T2UE artifact names a caption encoder other than minilm but does not carry "
                        "its files (text_encoder.safetensors); refit it")
    return CachedEncoder(sentence)


class TextToUnlearnable(FittedMethod):
    """Apply a fitted T2UE generator: noise from each sample's caption (or class prompt) and z."""

    name = "t2ue"
    text_only = True

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]], *,
                 mode: str = "sample", class_names: list[str] | None = None, template: str = DEFAULT_TEMPLATE,
                 seed: int = 0, fingerprint: str | None = None):
        super().__init__(config, fingerprint)
        if mode not in MODES:
            raise UserError(f"unknown T2UE mode {mode!r}; choose sample or class")
        if mode == "class":
            if not class_names:
                raise UserError("T2UE class mode needs class names (--class-names)")
            if "{}" not in template:
                raise UserError(f"the class template must contain '{{}}' for the class name, got {template!r}")
        self.mode = mode
        self.class_names = list(class_names or [])
        self.template = template
        self.seed = int(seed)
        self.z_dim = int(config["z_dim"])
        self.text_pool = str(config.get("text_pool", "eot"))
        if self.text_pool not in TEXT_POOLS:
            raise UserError(f"T2UE artifact has an unknown text pooling {self.text_pool!r}")
        self.objective = str(config.get("objective", "infonce"))
        self.sentence_encoder: Any = None
        if self.objective == "em" and config.get("text_encoder") != "open_clip":
            if "generator" not in weights:
                raise UserError("T2UE artifact lacks its generator weights")
            self.sentence_encoder = _artifact_sentence_encoder(config, weights)
            if self.sentence_encoder.encoder.dim != int(config["text_dim"]):
                raise UserError("T2UE artifact's caption encoder does not have the recorded dimension")
            self.encoder = None
            self.text_mean = None
            self._build_generator(config, weights)
            return
        if "generator" not in weights or "text_encoder" not in weights:
            raise UserError("T2UE artifact lacks its generator or text encoder weights")
        self.encoder = build_clip_model(config["surrogate"], seed=0)
        text_state = dict(weights["text_encoder"])
        self.text_mean = text_state.pop("caption_mean", None)
        if bool(config.get("center_text")) != (self.text_mean is not None):
            raise UserError("T2UE artifact's caption mean does not match its center_text setting")
        missing, unexpected = self.encoder.model.load_state_dict(text_state, strict=False)
        if unexpected or any(not k.startswith("visual.") for k in missing):
            raise UserError("T2UE artifact's text encoder does not fit its model config")
        self.encoder.model.eval()
        set_frozen(self.encoder.model, True)
        self._build_generator(config, weights)

    def _build_generator(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]]) -> None:
        def build() -> torch.nn.Module:
            return build_generator(
                config["backbone"], text_dim=int(config["text_dim"]), token_dim=int(config["token_dim"]),
                z_dim=self.z_dim, size=int(config["noise_size"]), width=int(config["width"]),
                epsilon=float(config["epsilon"]))

        with torch.device("meta"):  # shapes first: sizes in the config never allocate beyond the weights
            shapes = {k: tuple(v.shape) for k, v in build().state_dict().items()}
        given = {k: tuple(v.shape) for k, v in weights["generator"].items()}
        if shapes != given:
            wrong = sorted(set(shapes) ^ set(given)) or sorted(k for k in shapes if shapes[k] != given[k])
            raise UserError(f"T2UE artifact's generator does not load: its weights do not fit its config "
                            f"(first mismatch: {wrong[0]})")
        self.generator = build()
        try:
            self.generator.load_state_dict(weights["generator"], strict=True)
        except RuntimeError as exc:
            raise UserError(f"T2UE artifact's generator does not load: {str(exc).splitlines()[0]}") from exc
        self.generator.eval()
        set_frozen(self.generator, True)

    @property
    def requires_caption(self) -> bool:  # type: ignore[override]
        return self.mode == "sample"

    @property
    def requires_label(self) -> bool:  # type: ignore[override]
        return self.mode == "class"

    @classmethod
    def from_artifact(cls, path: str, epsilon: float | None = None, **options: Any) -> "TextToUnlearnable":
        """Load an artifact made by ``uge-protect fit t2ue``; ``options`` are mode, class_names,
        template and seed. The artifact's ε is authoritative (another given ε is an error)."""
        def check(c: dict[str, Any]) -> Any:
            required = ["epsilon", "backbone", "z_dim", "noise_size", "width", "text_dim", "token_dim"]
            em = c.get("objective") == "em"
            if not em or c.get("text_encoder") == "open_clip":
                required.append("surrogate")
            if em:
                required += ["text_encoder", "text_encoder_identity"]
            # artifacts from before the em objective are infonce fits
            return check_config(path, c, T2UEArtifact, required=required,
                                legacy={"objective": "infonce", "steps": 400, "lr": 2e-3})

        config, weights = load_artifact(path, expected_method="t2ue", check=check)
        check_fitted_epsilon(path, config, epsilon)
        with loading(path, "T2UE"):
            return cls(config, weights, fingerprint=artifact_fingerprint(path), **options)

    def to(self, device: torch.device | str) -> "TextToUnlearnable":
        super().to(device)
        if self.encoder is not None:
            self.encoder.model.to(self.device)
        if self.sentence_encoder is not None:
            self.sentence_encoder.encoder.to(self.device)
        self.generator.to(self.device)
        return self

    def fit_architectures(self) -> list[str]:
        """em: the EM surrogate its concept noise was fitted against; infonce: the surrogate CLIP."""
        if self.objective == "em":
            recorded = self._config.get("fit_architectures")
            if isinstance(recorded, list) and all(isinstance(a, str) for a in recorded):
                return list(recorded)
            em = self._config.get("em") or {}
            return [str(em.get("surrogate") or "small_cnn")]
        return [clip_arch_id(self._config["surrogate"])]

    def config(self) -> dict[str, Any]:
        keep = ("objective", "backbone", "noise_size", "z_dim", "width", "fit_size", "steps", "surrogate_trained",
                "surrogate_pretrained", "final_loss", "text_encoder_identity", "concept_source", "num_concepts")
        extra: dict[str, Any] = {"mode": self.mode, "seed": self.seed, "apply_chunk": APPLY_CHUNK}
        if self.mode == "class":
            extra.update(class_names=self.class_names, template=self.template)
        return self.public_config(keep, **extra)

    def prompts_and_latents(self, batch: ProtectBatch) -> tuple[list[str], torch.Tensor]:
        """The text each sample's noise is made from, and its z (B, z_dim)."""
        if self.mode == "class":
            texts, zs = [], []
            for lab in batch.labels:
                if lab is None or not 0 <= int(lab) < len(self.class_names):
                    raise UserError(f"label {lab!r} has no class name (give --class-names for every class)")
                texts.append(self.template.format(self.class_names[int(lab)]))
                zs.append(class_latent(self.seed, int(lab), self.z_dim))
            return texts, torch.stack(zs)
        if any(not c for c in batch.captions):
            raise UserError("T2UE sample mode needs a caption for every sample")
        return [str(c) for c in batch.captions], torch.stack([latent(s, self.z_dim) for s in batch.seeds])

    @torch.no_grad()
    def noise(self, texts: list[str], z: torch.Tensor) -> torch.Tensor:
        """Noise (B, 3, noise_size, noise_size) for captions and latents, in fixed chunks."""
        if self.sentence_encoder is not None:
            emb = self.sentence_encoder.encode(list(texts)).to(self.device)
            return in_fixed_chunks(lambda e, zz: self.generator(e, zz).float(), emb, z.float().to(self.device))

        def chunk(t: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
            emb, states = text_features(self.encoder, t, self.text_pool)
            return self.generator(centered(emb, self.text_mean), zz, states).float()

        return in_fixed_chunks(chunk, self.encoder.tokenize(texts).to(self.device), z.float().to(self.device))

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        texts, z = self.prompts_and_latents(batch)
        _, _, h, w = batch.pixels.shape
        return _resize_noise(self.noise(texts, z), h, w).clamp_(-self.epsilon, self.epsilon)  # a fresh tensor
