"""open_clip models for methods that need a CLIP (EM's CLIP variant, T2UE) and for evaluation.

A model is named by an open_clip model name (``"ViT-B-32"``), a JSON config file in
open_clip's format, or such a config as a dict. Weights come from nowhere (random
initialisation, seeded), from an open_clip pretrained tag (downloaded by open_clip), or from
a local checkpoint: ``.safetensors`` is read with safetensors, anything else with
``torch.load(weights_only=True)``, which refuses pickled code.

A config read from an artifact is untrusted: it must build from itself alone (an inline
config or a built-in model name with no Hub text tower or tokenizer, see
:func:`check_local_model_config`), and fits record such a config (:func:`recorded_model_config`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError

#: CLIP's image normalisation, used when a config does not name its own.
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)

#: A small CLIP that trains on a CPU: 2-layer ViT of width 64 on 4×4 patches, 2-layer text
#: transformer of width 64. The default surrogate of EM's clip mode and of T2UE; its image
#: size is set to the training images' by :func:`resolve_model_config`.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

#: CLIP's usual cap on the learned temperature: logit scale ≤ 100.
MAX_LOGIT_SCALE = math.log(100.0)

#: Keys of an open_clip JSON config that ``CLIP.__init__`` accepts.
_CLIP_KWARGS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                "nonscalar_logit_scale"}


class ClipBundle:
    """A CLIP model with what is needed to feed it: tokenizer, input size, normalisation.

    ``config`` is the resolved model config (a dict, or an open_clip model name), enough to
    rebuild the architecture with :func:`build_clip_model`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], config: str | dict):
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.config = config

    def prepare_images(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float images (N, 3, H, W) → the model's input (resized, normalised); differentiable."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of [0, 1] images."""
        return F.normalize(self.model.encode_image(self.prepare_images(x)).float(), dim=-1)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of token ids (N, context_length)."""
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)


def simple_tokenizer(context_length: int) -> Callable:
    """open_clip's BPE tokenizer; its vocabulary ships inside the package (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def resolve_model_config(model_config: str | dict | None, default: dict, image_size: int | None = None
                         ) -> str | dict:
    """``None`` → a copy of ``default`` (its vision image size set to ``image_size`` when
    given); a dict → a copy; a ``.json`` path → its contents; any other string → an open_clip
    model name."""
    if model_config is None:
        cfg = copy.deepcopy(default)
        if image_size is not None:
            cfg["vision_cfg"]["image_size"] = image_size
        return cfg
    if isinstance(model_config, dict):
        return copy.deepcopy(model_config)
    path = Path(model_config)
    if path.suffix == ".json" or path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read CLIP model config {model_config}: {exc}") from exc
    return str(model_config)


#: Schemas of model names that open_clip / timm resolve by fetching or reading files.
_EXTERNAL_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "timm/")


def _external_string(value: str) -> bool:
    """A string that names something to fetch or read: a schema, a URL, a path."""
    low = value.strip().lower()
    return low.startswith(_EXTERNAL_PREFIXES) or "://" in low or "/" in low or "\\" in low


def _external_in_dict(cfg: dict) -> str | None:
    """What in a CLIP config dict (at any depth) would make open_clip, timm or transformers
    fetch or read files, as ``"key=value"``; None when it builds from itself alone.

    Refused: any ``hf_*_name`` (a transformers text tower or tokenizer), any ``*_pretrained``
    that is set (base weights from the Hub), a ``timm_model_name`` timm does not know
    locally, and a string value anywhere that is a schema, URL or path."""
    stack: list[Any] = [cfg]
    while stack:  # iterative: a deeply nested config cannot exhaust the stack
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            name = key if isinstance(key, str) else ""
            if isinstance(value, (dict, list)):
                stack.append(value)
                continue
            if name.startswith("hf_") and name.endswith("_name") and value not in (None, ""):
                return f"{name}={value!r}"
            if name.endswith("_pretrained") and value not in (None, False, ""):
                return f"{name}={value!r}"
            if name == "timm_model_name" and value is not None and not _local_timm_model(value):
                return f"{name}={value!r}"
            if isinstance(value, str) and _external_string(value):
                return f"{name or 'value'}={value!r}"
    return None


def _local_timm_model(name: Any) -> bool:
    """Whether timm builds the architecture ``name`` from its own registry (no download)."""
    if not isinstance(name, str) or _external_string(name) or ":" in name:
        return False
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def external_model_reference(model_config: Any) -> str | None:
    """Why building ``model_config`` (an artifact's CLIP config) would fetch or read anything
    outside the artifact, or None when it is self-contained.

    Self-contained: an inline config dict with no external reference (see
    :func:`_external_in_dict`), or a built-in open_clip model name whose shipped config has
    none and whose tokenizer is open_clip's own (SigLIP names load a Hub tokenizer). Anything
    else — ``hf-hub:``/``local-dir:`` names, paths, URLs, unknown names — is external."""
    if isinstance(model_config, dict):
        return _external_in_dict(model_config)
    if not isinstance(model_config, str):
        return f"a {type(model_config).__name__}"
    import open_clip

    if model_config not in open_clip.list_models() or "siglip" in model_config.lower():
        return repr(model_config)
    found = _external_in_dict(open_clip.get_model_config(model_config) or {})
    return f"{model_config!r} ({found})" if found else None


def check_local_model_config(model_config: Any, field: str) -> None:
    """A :class:`UserError` unless an artifact's CLIP config ``field`` is self-contained
    (:func:`external_model_reference`): loading an artifact never fetches anything."""
    found = external_model_reference(model_config)
    if found is not None:
        shown = found if len(found) <= 120 else found[:117] + "..."
        raise UserError(f"{field!r} names a remote or external model ({shown}); an artifact is loaded from its "
                        "own files only: refit it with a built-in open_clip model name or an inline config")


def _schema_config(name: str) -> dict:
    """The open_clip config a ``hf-hub:`` or ``local-dir:`` model name stands for (its
    ``model_cfg`` with the ``preprocess_cfg`` normalisation), read as open_clip reads it."""
    from open_clip.pretrained import download_pretrained_from_hf

    schema, ident = name.split(":", 1)
    try:
        if schema.lower() == "local-dir":
            path = Path(ident) / "open_clip_config.json"
        else:
            path = Path(download_pretrained_from_hf(ident, filename="open_clip_config.json"))
        full = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # missing file, no network, bad JSON: the fit cannot use the name
        raise UserError(f"cannot read the open_clip config of {name}: {exc}") from exc
    if not isinstance(full, dict) or not isinstance(full.get("model_cfg", full), dict):
        raise UserError(f"the open_clip config of {name} is not a JSON object")
    cfg = copy.deepcopy(full.get("model_cfg", full))
    pp = full.get("preprocess_cfg")
    if isinstance(pp, dict) and "mean" in pp and "std" in pp and "preprocess_cfg" not in cfg:
        cfg["preprocess_cfg"] = {"mean": pp["mean"], "std": pp["std"]}
    return cfg


def recorded_model_config(model_config: str | dict, option: str) -> str | dict:
    """What a fit's artifact records of its CLIP (a resolved config, see
    :func:`resolve_model_config`), checked before the fit builds anything.

    A built-in name or an inline config is recorded as it is; a ``hf-hub:``/``local-dir:``
    name becomes its config dict, so the artifact loads from its own files. A
    :class:`UserError` naming the fit's ``option`` when the config needs files from
    elsewhere to be rebuilt (a transformers text tower or tokenizer, a SigLIP tokenizer):
    its artifact could not be loaded (see :func:`external_model_reference`)."""
    cfg: str | dict = model_config
    if isinstance(cfg, str) and cfg.lower().startswith(("hf-hub:", "local-dir:")):
        cfg = _schema_config(cfg)
    found = external_model_reference(cfg)
    if found is not None:
        raise UserError(f"{option} ({found if len(found) <= 120 else found[:117] + '...'}) needs files from outside "
                        "the artifact to be rebuilt (a Hub text tower or tokenizer, a path), so its artifact could "
                        "not be loaded: use a built-in open_clip model name or a JSON config with open_clip's own "
                        "text transformer")
    return copy.deepcopy(cfg)


def _load_weights(model: torch.nn.Module, source: str) -> None:
    path = Path(source)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / torch raise their own error types
        raise UserError(f"cannot read CLIP checkpoint {source}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"CLIP checkpoint {source} does not fit the model: {first}") from exc


def build_clip_model(model_config: str | dict, *, seed: int = 0, pretrained: str | None = None) -> ClipBundle:
    """Build an open_clip CLIP from a resolved config (see :func:`resolve_model_config`).

    ``pretrained`` is None (random init from ``seed``), a path to a local checkpoint, or an
    open_clip pretrained tag for a named model (downloaded by open_clip on first use).
    """
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = model_config
    local = pretrained is not None and Path(pretrained).exists()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(cfg, str):
            try:
                model = open_clip.create_model(cfg, pretrained=None if local else pretrained)
            except RuntimeError as exc:
                raise UserError(f"cannot build open_clip model {cfg!r}: {exc}") from exc
            tokenizer = open_clip.get_tokenizer(cfg)
            pp = getattr(model.visual, "preprocess_cfg", {}) or {}
            mean, std = tuple(pp.get("mean", DEFAULT_MEAN)), tuple(pp.get("std", DEFAULT_STD))
        else:
            if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
                raise UserError("a CLIP model config needs embed_dim, vision_cfg and text_cfg")
            if pretrained is not None and not local:
                raise UserError(f"pretrained weights {pretrained!r} not found: with a model config, "
                                "give a local checkpoint file (a pretrained tag needs a model name)")
            kwargs = {k: v for k, v in cfg.items() if k in _CLIP_KWARGS}
            text_cfg = cfg["text_cfg"]
            custom = cfg.get("custom_text") or "hf_model_name" in text_cfg
            if "hf_model_name" in text_cfg:
                text_cfg = dict(text_cfg, hf_model_pretrained=False)
                kwargs["text_cfg"] = text_cfg
            model = (CustomTextCLIP if custom else CLIP)(**kwargs)
            context_length = int(text_cfg.get("context_length", 77))
            if "hf_tokenizer_name" in text_cfg or "hf_model_name" in text_cfg:
                tok_name = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
                tokenizer = open_clip.tokenizer.HFTokenizer(tok_name, context_length=context_length)
            else:
                tokenizer = simple_tokenizer(context_length)
            pp = cfg.get("preprocess_cfg", {})
            mean, std = tuple(pp.get("mean", DEFAULT_MEAN)), tuple(pp.get("std", DEFAULT_STD))
    if local:
        _load_weights(model, str(pretrained))
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return ClipBundle(model, tokenizer, size, mean, std, cfg)


def clip_state(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    """The model's persistent tensors, detached on the CPU (for safetensors)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in bundle.model.state_dict().items()}


def load_clip_state(bundle: ClipBundle, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load :func:`clip_state` output back (all of it, or a part when not ``strict``);
    :class:`UserError` when it does not fit."""
    try:
        bundle.model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise UserError(f"stored CLIP weights do not fit the model: {str(exc).splitlines()[0]}") from exc


def infonce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) of L2-normalised image and text embeddings, row i of
    each being a pair and every other row a negative, at temperature multiplier ``scale``."""
    logits = scale * img @ txt.T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def clip_infonce(bundle: ClipBundle, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of [0, 1] images ``x`` and their caption ``tokens`` over the batch."""
    return infonce(bundle.encode_images(x), bundle.encode_tokens(tokens), logit_scale(bundle))


def zero_shot_loss(bundle: ClipBundle, x: torch.Tensor, prompts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``bundle`` as a zero-shot classifier: [0, 1] images ``x`` against all class
    ``prompts`` (token ids), labels ``y``."""
    return F.cross_entropy(logit_scale(bundle) * bundle.encode_images(x) @ bundle.encode_tokens(prompts).T, y)


def logit_scale(bundle: ClipBundle) -> torch.Tensor:
    """The CLIP's temperature as a multiplier, capped at 100."""
    return bundle.model.logit_scale.exp().clamp(max=100.0)


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep a trained CLIP's temperature in [0, log 100] after an optimizer step."""
    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
