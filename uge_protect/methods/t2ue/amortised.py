"""T2UE's ``em`` objective: class-wise EM noise per concept, amortised into G(caption, z).

1. Every training caption is embedded by the caption encoder (once per unique caption).
2. Each sample gets a *concept*: its class label; or, given concept names, the concept whose
   prompt embedding is nearest its caption; or, without either, a cluster of the caption
   embeddings (cosine k-means).
3. Class-wise error-minimising noise is fitted on the images with those concepts as labels
   (:func:`em.fit_em`, min-min against a surrogate classifier): one δ per concept, the
   shortcut a network learns instead of the content.
4. A generator (the ``mlp`` backbone by default) learns by regression to map each caption
   embedding, and each concept prompt, to its concept's δ, whatever z is.

At apply the generator sees text only, so a caption gives its concept's shortcut without its
image; the fit itself is where the images are used. This module works on tensors.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.methods.base import FitContext, Progress
from uge_protect.methods.em.fit import fit_em
from uge_protect.methods.em.config import EMConfig
from uge_protect.methods.t2ue.generators import build_generator
from uge_protect.models.training import pick_device


class CaptionEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor: ...


def unique_embeddings(encoder: CaptionEncoder, texts: list[str]) -> torch.Tensor:
    """Embeddings (N, D) of ``texts``, each unique text encoded once."""
    unique = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(unique)}
    emb = encoder.encode(unique)
    return emb[torch.tensor([index[t] for t in texts], dtype=torch.long)]


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Cosine k-means of unit rows ``x`` (k-means++ start, seeded): a cluster per row (N,)."""
    n = len(x)
    if not 2 <= k <= n:
        raise UserError(f"cannot make {k} caption clusters from {n} captions")
    g = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(n, (1,), generator=g))]]
    dist = 1 - x @ centers[0]
    for _ in range(1, k):
        p = dist.clamp_min(0) ** 2
        pick = int(torch.multinomial(p / p.sum(), 1, generator=g)) if float(p.sum()) > 0 else int(
            torch.randint(n, (1,), generator=g))
        centers.append(x[pick])
        dist = torch.minimum(dist, 1 - x @ x[pick])
    c = torch.stack(centers)
    assign = (x @ c.T).argmax(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=-1))
        if bool(empty.any()):  # an empty cluster restarts at the row farthest from its center
            far = (x * c[assign]).sum(1).argsort()[: int(empty.sum())]
            c[empty] = x[far]
        new = (x @ c.T).argmax(1)
        if bool((new == assign).all()):
            break
        assign = new
    return assign


DEFAULT_CLUSTERS = 10


def concepts_of(emb: torch.Tensor, labels: torch.Tensor | None, concept_emb: torch.Tensor | None,
                clusters: int | None, seed: int) -> tuple[torch.Tensor, str]:
    """Each sample's concept (N,) and where it came from: ``concepts`` (nearest concept prompt),
    ``clusters`` (when ``clusters`` is given, or without labels), else ``labels``."""
    if concept_emb is not None:
        return (emb @ concept_emb.T).argmax(1), "concepts"
    labelled = labels is not None and len(labels) and bool((labels >= 0).all()) and int(labels.max()) >= 1
    if clusters is None and labelled:
        assert labels is not None
        return labels.long(), "labels"
    k = DEFAULT_CLUSTERS if clusters is None else clusters
    distinct = len(torch.unique(emb, dim=0))
    return kmeans(emb, min(k, distinct), seed), "clusters"


def regress_generator(emb: torch.Tensor, targets: torch.Tensor, *, backbone: str, z_dim: int, width: int,
                      epsilon: float, steps: int, batch_size: int, lr: float, weight_decay: float, seed: int,
                      device: torch.device, progress: Progress | None = None,
                      started: float | None = None) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train G(emb, z) ≈ ``targets`` (N, 3, s, s) in units of ε; returns G (eval) and its fit."""
    size = targets.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    generator = build_generator(backbone, text_dim=emb.shape[1], token_dim=1, z_dim=z_dim, size=size,
                                width=width, epsilon=epsilon, seed=seed).to(device)
    opt = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    emb, goal = emb.to(device), (targets / epsilon).clamp(-0.98, 0.98).to(device)
    n = len(emb)
    bs = min(batch_size, n)
    started = time.perf_counter() if started is None else started
    generator.train()
    window: list[float] = []
    for step in range(1, steps + 1):
        idx = torch.randint(n, (bs,), generator=gen).to(device)
        z = torch.randn((bs, z_dim), generator=gen).to(device)
        loss = F.mse_loss(generator(emb[idx], z) / epsilon, goal[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if progress is not None and (step % 100 == 0 or step == steps):
            progress({"phase": "generator", "step": step, "steps": steps, "loss": sum(window) / len(window),
                      "seconds": time.perf_counter() - started})
            window = []
    generator.eval()
    with torch.no_grad():
        zs = torch.zeros((n, z_dim), device=device)
        out = torch.cat([generator(emb[s:s + 512], zs[s:s + 512]) for s in range(0, n, 512)]) / epsilon
        mse = float(F.mse_loss(out, goal))
        signs = float((out.sign() == goal.sign()).float().mean())
        cos = float(F.cosine_similarity(out.flatten(1), goal.flatten(1)).mean())
    return generator, {"mse": mse, "sign_agreement": signs, "cosine": cos}


def fit_amortised(images: torch.Tensor, labels: torch.Tensor | None, captions: list[str], encoder: CaptionEncoder,
                  *, epsilon: float, noise_size: int, z_dim: int, width: int, backbone: str, steps: int,
                  batch_size: int, lr: float, weight_decay: float, seed: int, device: str,
                  clusters: int | None, concept_names: list[str] | None, class_names: list[str] | None, template: str,
                  em_options: dict[str, Any] | None = None, progress: Progress | None = None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.nn.Module]:
    """Fit the ``em`` objective; returns (record, concept tensors, generator).

    ``record`` holds the concept source and counts, EM's fit summary and the regression's
    fit; the tensors are ``noise`` (K, 3, s, s), the concept δ at the noise size.
    """
    started = time.perf_counter()
    dev = pick_device(device)
    if progress is not None:
        progress({"message": f"embedding {len(set(captions))} unique captions", "seconds": 0.0})
    emb = unique_embeddings(encoder, captions)
    concept_emb = None
    if concept_names:
        concept_emb = encoder.encode([template.format(c) for c in concept_names])
    concepts, source = concepts_of(emb, labels, concept_emb, clusters, seed)
    if class_names and source == "clusters":
        raise UserError("class names need the labels as T2UE's concepts: drop --clusters, or give the "
                        "names as --concepts")
    k = int(concepts.max()) + 1
    counts = torch.bincount(concepts, minlength=k)
    if int((counts > 0).sum()) < 2:
        raise UserError("T2UE found fewer than two concepts in the training captions; "
                        "give labels, --concepts or more varied captions")
    if progress is not None:
        progress({"message": f"{k} concepts from the {source}; class-wise EM noise per concept next",
                  "seconds": time.perf_counter() - started})

    def em_progress(rec: dict[str, Any]) -> None:
        if progress is not None:
            progress({**rec, "phase": "EM", "seconds": time.perf_counter() - started})

    em_cfg = EMConfig(**{"mode": "class", "epsilon": epsilon, "seed": seed, "device": device,
                         **(em_options or {})})
    em_cfg.validate()
    # a concept no sample holds keeps its random start: it is never a target
    em_record, em_weights = fit_em(images, concepts, em_cfg, FitContext(progress=em_progress))
    noise = em_weights["class_noise"]["delta"].float()
    if tuple(noise.shape[-2:]) != (noise_size, noise_size):
        noise = F.interpolate(noise, size=(noise_size, noise_size), mode="area")
    noise = noise.clamp(-epsilon, epsilon)

    inputs, goals = [emb], [noise[concepts]]
    prompt_names = concept_names or class_names
    if prompt_names:
        if source == "labels" and len(prompt_names) < k:
            raise UserError(f"label {k - 1} has no class name ({len(prompt_names)} given)")
        prompts = encoder.encode([template.format(c) for c in prompt_names[:k]])
        # the class prompts weigh as much as a tenth of the captions, whatever their number
        reps = max(1, len(emb) // (10 * len(prompts)))
        inputs.append(prompts.repeat(reps, 1))
        goals.append(noise[: len(prompts)].repeat(reps, 1, 1, 1))
    generator, fit = regress_generator(
        torch.cat(inputs), torch.cat(goals), backbone=backbone, z_dim=z_dim, width=width, epsilon=epsilon,
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, device=dev,
        progress=progress, started=started)
    record = {
        "concept_source": source,
        "num_concepts": k,
        "concept_counts": counts.tolist(),
        "em": {key: em_record.get(key) for key in ("surrogate", "rounds", "train_error", "converged",
                                                    "pattern_size", "augment", "max_rounds")},
        "regression": fit,
        "fit_architectures": list(em_record.get("fit_architectures") or []),
        "fit_seconds": time.perf_counter() - started,
    }
    return record, {"noise": noise.cpu()}, generator
