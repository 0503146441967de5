"""CLIP trained from scratch on protected vs clean image-text pairs.

A dataset owner wants to know whether a contrastive image-text model trained on the
protected shards learns less than one trained on the clean shards. :func:`run_clip_eval`
trains the same small open_clip ``CLIP`` (random initialisation, never pretrained weights)
once on each training set and measures image→text and text→image retrieval on *clean*
held-out pairs (Recall@1/5/10, median rank), plus zero-shot classification accuracy when
class names are known.

The default model is tiny so that the comparison runs on a CPU in a few minutes on the
demo data; any open_clip model name, JSON config file or config dict can replace it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.shards.dataset import InMemoryDataset
from uge_protect.models.clip import (DEFAULT_MEAN, DEFAULT_STD, ClipBundle, build_clip_model, clamp_logit_scale,
    resolve_model_config)

__all__ = [
    "DEFAULT_MODEL_CONFIG",
    "DEFAULT_EPOCHS",
    "build_clip",
    "clip_settings",
    "encode_dataset",
    "retrieval_metrics",
    "run_clip_eval",
    "train_and_score_clip",
    "train_clip",
    "zero_shot_accuracy",
]

#: Default number of training epochs and peak learning rate, tuned on the 5000-pair demo
#: data, where clean training learns the 1000 test pairs well above chance (figures: docs/eval.md).
DEFAULT_EPOCHS = 4
DEFAULT_LR = 2e-3

#: Small CLIP that trains on a CPU in minutes on 32x32 images: a 2-layer ViT on 4x4 patches
#: (65 tokens of width 128) and a 2-layer causal text transformer of width 128. On CPU this
#: was faster than open_clip's ModifiedResNet at equal depth (whose stem and 1024-wide last
#: stage dominate at 32 px) and learnt the demo data within a few epochs. ``image_size`` is
#: replaced by the training images' size when this default is used (must divide by 4).
DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


def _load_config(model_config: str | dict | None, image_size: int | None) -> str | dict:
    return resolve_model_config(model_config, DEFAULT_MODEL_CONFIG, image_size)


def build_clip(model_config: str | dict | None = None, *, image_size: int | None = None,
               seed: int = 0) -> ClipBundle:
    """Build a randomly initialised CLIP (never pretrained weights) and its tokenizer.

    ``model_config`` is ``None`` (the tiny :data:`DEFAULT_MODEL_CONFIG`, sized to
    ``image_size``), an open_clip model name, a path to a JSON config in open_clip's format,
    or such a config as a dict.
    """
    return build_clip_model(_load_config(model_config, image_size), seed=seed)


# --------------------------------------------------------------------------- data


def _pairs(ds: InMemoryDataset) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Images, captions and labels of the samples that have a caption."""
    keep = [i for i, c in enumerate(ds.captions) if c]
    if not keep:
        raise UserError("no samples with a caption: CLIP evaluation needs image-text pairs")
    idx = torch.tensor(keep, dtype=torch.long)
    return ds.images[idx], [ds.captions[i] for i in keep], ds.labels[idx]


def _to_float(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 (N,3,H,W) → float in [0,1] at ``size`` × ``size`` on ``device``."""
    x = images.to(device=device, dtype=torch.float32) / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _normalizer(bundle: ClipBundle, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(bundle.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` (edge replicate) and crop back at a random offset per image."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)  # (n, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # advanced indexing over (n, h, w) then move channels back in front
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_dataset(bundle: ClipBundle, images: torch.Tensor, captions: list[str], *,
                   batch_size: int = 256, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings (CPU float tensors)."""
    device = torch.device(device)
    model = bundle.model
    was_training = model.training
    model.eval()
    norm = _normalizer(bundle, device)
    img_out, txt_out = [], []
    for s in range(0, len(images), batch_size):
        x = norm(_to_float(images[s:s + batch_size], bundle.image_size, device))
        img_out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    for s in range(0, len(captions), batch_size):
        t = bundle.tokenizer(captions[s:s + batch_size]).to(device)
        txt_out.append(F.normalize(model.encode_text(t).float(), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(img_out), torch.cat(txt_out)


# --------------------------------------------------------------------------- metrics


def _ranks(sim: torch.Tensor) -> torch.Tensor:
    """0-based rank of the diagonal entry in each row (ties count against the query)."""
    true = sim.diagonal().unsqueeze(1)
    others = sim.clone()
    others.fill_diagonal_(float("-inf"))
    return (others >= true).sum(dim=1)


def _summary(ranks: torch.Tensor) -> dict[str, float]:
    r = ranks.double()
    return {
        "R@1": float((r < 1).double().mean()),
        "R@5": float((r < 5).double().mean()),
        "R@10": float((r < 10).double().mean()),
        "median_rank": float((r + 1).quantile(0.5)),
    }


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, dict[str, float]]:
    """Retrieval of aligned pairs: ``image_emb[i]`` belongs with ``text_emb[i]``.

    Each image queries all texts (``i2t``) and each text all images (``t2i``) by dot product
    (pass L2-normalised embeddings for cosine similarity). The rank of the true match is the
    number of candidates scoring at least as high (ties are pessimistic); ``R@K`` is the
    fraction of queries whose true match ranks among the first K, ``median_rank`` is 1-based
    (the mean of the two middle ranks for an even number of queries).
    """
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[0] == 0:
        raise ValueError(f"need equally many (>0) image and text embeddings, got "
                         f"{image_emb.shape[0]} and {text_emb.shape[0]}")
    sim = image_emb.double() @ text_emb.double().T
    return {"i2t": _summary(_ranks(sim)), "t2i": _summary(_ranks(sim.T))}


@torch.no_grad()
def zero_shot_accuracy(model: Any, tokenizer: Callable, test: InMemoryDataset, class_names: list[str],
                       template: str = "a photo of a {}", *, image_size: int | None = None,
                       mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                       batch_size: int = 256, device: torch.device | str | None = None) -> float | None:
    """Accuracy of classifying ``test`` images by the nearest class prompt.

    ``model`` needs ``encode_image`` and ``encode_text``: a model from :func:`train_clip`
    (its ``input_size``, ``image_mean`` and ``image_std`` are used unless given), any
    open_clip model, or a build bundle. Samples without a label (-1) or with a label outside
    ``class_names`` are ignored; ``None`` when none remain.
    """
    if isinstance(model, ClipBundle):
        image_size = image_size or model.image_size
        mean, std, model = mean or model.mean, std or model.std, model.model
    image_size = image_size or getattr(model, "input_size", None)
    mean = mean or getattr(model, "image_mean", None) or DEFAULT_MEAN
    std = std or getattr(model, "image_std", None) or DEFAULT_STD
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else "cpu"
    device = torch.device(device)
    keep = (test.labels >= 0) & (test.labels < len(class_names))
    if not class_names or not bool(keep.any()):
        return None
    images, labels = test.images[keep], test.labels[keep]
    size = image_size or int(images.shape[-1])
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    text = tokenizer([template.format(c) for c in class_names]).to(device)
    class_emb = F.normalize(model.encode_text(text).float(), dim=-1)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    correct = 0
    for i in range(0, len(images), batch_size):
        x = (_to_float(images[i:i + batch_size], size, device) - m) / s
        emb = F.normalize(model.encode_image(x).float(), dim=-1)
        pred = (emb @ class_emb.T).argmax(dim=1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    if hasattr(model, "train"):
        model.train(was_training)
    return correct / len(images)


# --------------------------------------------------------------------------- training


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch."""
    logits = logit_scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _train(train: InMemoryDataset, *, epochs: int, seed: int, model_config: str | dict | None,
           batch_size: int, lr: float, weight_decay: float, warmup_frac: float, crop_pad: int | None,
           device: torch.device | str | None, eval_pairs: tuple[torch.Tensor, list[str]] | None,
           progress: bool, label: str, max_steps: int | None = None
           ) -> tuple[ClipBundle, list[dict[str, Any]], list[float]]:
    device = torch.device(device) if device is not None else _default_device()
    images, captions, _ = _pairs(train)
    h, w = images.shape[-2:]
    bundle = build_clip(model_config, image_size=int(h) if h == w else None, seed=seed)
    model = bundle.model.to(device)
    model.train()
    pad = crop_pad if crop_pad is not None else max(1, round(bundle.image_size / 16))
    bundle.crop_pad = pad

    tokens = bundle.tokenizer(captions)
    x_all = _to_float(images, bundle.image_size, torch.device("cpu"))
    norm = _normalizer(bundle, device)
    n = len(captions)
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)  # drop the last partial batch: InfoNCE wants full batches
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = int(warmup_frac * total)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(seed)
    per_epoch: list[dict[str, Any]] = []
    step_losses: list[float] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        if step >= total:
            break
        perm = torch.randperm(n, generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * bs:(b + 1) * bs]
            x = _random_crop(x_all[idx], pad, gen).to(device)
            t = tokens[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            img_f = model.encode_image(norm(x))
            txt_f = model.encode_text(t)
            loss = _clip_loss(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_logit_scale(model)
            losses.append(float(loss.detach()))
            step_losses.append(float(loss.detach()))
            step += 1
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": sum(losses) / max(1, len(losses))}
        if eval_pairs is not None:
            ie, te = encode_dataset(bundle, eval_pairs[0], eval_pairs[1], device=device)
            m = retrieval_metrics(ie, te)
            entry["i2t_R@10"] = m["i2t"]["R@10"]
            entry["t2i_R@10"] = m["t2i"]["R@10"]
        per_epoch.append(entry)
        if progress:
            extra = (f"  i2t R@10 {entry['i2t_R@10']:.3f}  t2i R@10 {entry['t2i_R@10']:.3f}"
                     if eval_pairs is not None else "")
            print(f"clip[{label}] epoch {epoch + 1}/{epochs}  loss {entry['loss']:.4f}{extra}"
                  f"  ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    model.eval()
    return bundle, per_epoch, step_losses


def train_clip(train: InMemoryDataset, *, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
               model_config: str | dict | None = None, batch_size: int = 128, lr: float = DEFAULT_LR,
               weight_decay: float = 0.1, warmup_frac: float = 0.05, crop_pad: int | None = None,
               device: torch.device | str | None = None, max_steps: int | None = None,
               progress: bool = False) -> torch.nn.Module:
    """Train a CLIP from scratch on ``train``'s (image, caption) pairs; returns the model.

    The model carries ``tokenizer``, ``input_size``, ``image_mean``, ``image_std`` attributes
    (what :func:`zero_shot_accuracy` and encoding need). Deterministic on the CPU for equal
    seeds. Samples without a caption are left out.
    """
    bundle, _, _ = _train(train, epochs=epochs, seed=seed, model_config=model_config, batch_size=batch_size,
                          lr=lr, weight_decay=weight_decay, warmup_frac=warmup_frac, crop_pad=crop_pad,
                          device=device, eval_pairs=None, progress=progress, label="train",
                          max_steps=max_steps)
    model = bundle.model
    model.tokenizer = bundle.tokenizer
    model.input_size = bundle.image_size
    model.image_mean = bundle.mean
    model.image_std = bundle.std
    return model


def train_and_score_clip(train: InMemoryDataset, test: InMemoryDataset, *, class_names: list[str] | None = None,
                         label: str = "train", epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                         model_config: str | dict | None = None, batch_size: int = 128, lr: float = DEFAULT_LR,
                         weight_decay: float = 0.1, warmup_frac: float = 0.05, crop_pad: int | None = None,
                         device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one CLIP from scratch on ``train`` and score it on ``test``'s clean pairs.

    Returns ``i2t`` and ``t2i`` (``R@1``, ``R@5``, ``R@10``, ``median_rank``),
    ``zero_shot_accuracy`` (``None`` without class names), ``per_epoch`` (loss and test
    Recall@10 after every epoch), ``seconds`` and the ``crop_pad`` used.
    """
    start = time.perf_counter()
    test_pairs = _pairs(test)
    bundle, per_epoch, _ = _train(train, epochs=epochs, seed=seed, model_config=model_config,
                                  batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                  warmup_frac=warmup_frac, crop_pad=crop_pad, device=device,
                                  eval_pairs=(test_pairs[0], test_pairs[1]), progress=progress, label=label)
    dev = next(bundle.model.parameters()).device
    ie, te = encode_dataset(bundle, test_pairs[0], test_pairs[1], device=dev)
    result: dict[str, Any] = retrieval_metrics(ie, te)
    result["zero_shot_accuracy"] = (zero_shot_accuracy(bundle, bundle.tokenizer, test, class_names, device=dev)
                                    if class_names else None)
    result["per_epoch"] = per_epoch
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["crop_pad"] = bundle.crop_pad
    return result


def clip_settings(clean_train: InMemoryDataset, protected_train: InMemoryDataset, test: InMemoryDataset, *,
                  crop_pad: int, epochs: int = DEFAULT_EPOCHS, seed: int = 0, model_config: str | dict | None = None,
                  batch_size: int = 128, lr: float = DEFAULT_LR, weight_decay: float = 0.1,
                  warmup_frac: float = 0.05, class_names: list[str] | None = None,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """The settings block recorded with a CLIP comparison."""
    h = int(clean_train.images.shape[-2])
    resolved = _load_config(model_config, h if clean_train.images.shape[-1] == h else None)
    n_test = len(_pairs(test)[1])
    return {
        "epochs": epochs,
        "seed": seed,
        "model_config": resolved,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_frac": warmup_frac,
        "optimizer": "AdamW + linear warmup + cosine",
        "augmentation": f"random crop after {crop_pad}px replicate padding" if crop_pad else "none",
        "crop_pad": crop_pad,
        "n_protected_train": len(_pairs(protected_train)[1]),
        "n_clean_train": len(_pairs(clean_train)[1]),
        "n_test_pairs": n_test,
        "chance_R@10": min(1.0, 10 / n_test),
        "class_names": list(class_names) if class_names else None,
        "device": str(device if device is not None else _default_device()),
    }


def run_clip_eval(protected_train: InMemoryDataset, clean_train: InMemoryDataset, test: InMemoryDataset, *,
                  epochs: int = DEFAULT_EPOCHS, seed: int = 0, model_config: str | dict | None = None,
                  batch_size: int = 128, lr: float = DEFAULT_LR, class_names: list[str] | None = None,
                  progress: bool = True, weight_decay: float = 0.1, warmup_frac: float = 0.05,
                  crop_pad: int | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Train the same CLIP on protected and on clean pairs; retrieval on clean test pairs.

    Returns ``{"settings", "protected", "clean"}``; each result holds ``i2t`` and ``t2i``
    (``R@1``, ``R@5``, ``R@10``, ``median_rank``), ``zero_shot_accuracy`` (``None`` without
    class names or labels) and ``per_epoch`` (``epoch``, ``loss``, ``i2t_R@10``,
    ``t2i_R@10`` on the test pairs). Both runs use the same seed: same initialisation and
    same batch order.
    """
    kw = dict(epochs=epochs, seed=seed, model_config=model_config, batch_size=batch_size, lr=lr,
              weight_decay=weight_decay, warmup_frac=warmup_frac, crop_pad=crop_pad, device=device,
              progress=progress, class_names=class_names)
    protected = train_and_score_clip(protected_train, test, label="protected", **kw)
    clean = train_and_score_clip(clean_train, test, label="clean", **kw)
    kw.pop("progress")
    kw["crop_pad"] = protected["crop_pad"]
    settings = clip_settings(clean_train, protected_train, test, **kw)
    settings["seconds"] = {"protected": protected["seconds"], "clean": clean["seconds"]}
    return {"settings": settings, "protected": protected, "clean": clean}
