"""UGE's three losses, as we define them (the paper's exact forms were not available to us).

* :func:`gradient_matching` — L_gm: layer-wise cosine distance between the authorized
  network's parameter gradients on x + δ and on x (the distance of dataset condensation, Zhao
  et al. 2021: per weight tensor, ``1 - cos`` between the gradients of each output channel;
  here averaged over the channels of a layer and summed over layers; biases and norm
  parameters are left out; a channel without gradient on both sides counts as matched).
  Zero when δ = 0.
* :func:`feature_distance` — L_fd: in a frozen shared image-feature space, the cosine
  similarity of x + δ to x (to be *lowered*), minus, with misalignment, its similarity to the
  prototype of another class (to be raised).
* :func:`uge_protect.models.distill.distillation` — the loss of a student distilled from a teacher (Hinton et al.'s
  temperature-softened KL); L_ud is this loss of a student trained alongside on x + δ, which
  the generator *minimizes*, as EM's min-min does: the student is then taught by an
  easy-to-read signal in δ instead of the image content, and does not generalize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _matched_params(model: nn.Module) -> list[nn.Parameter]:
    """The weight tensors L_gm compares: every trainable parameter with at least 2 dimensions."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]


def gradient_distance(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> torch.Tensor:
    """Σ over layers of the mean over output channels of ``1 - cos(ga, gb)``."""
    total = ga[0].new_zeros(())
    for a, b in zip(ga, gb):
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        dist = 1 - F.cosine_similarity(a2, b2, dim=1, eps=1e-12)
        # a channel with no gradient on either side (e.g. a dead unit) is matched, not distant
        both_zero = (a2.detach().abs().amax(1) == 0) & (b2.detach().abs().amax(1) == 0)
        total = total + torch.where(both_zero, torch.zeros_like(dist), dist).mean()
    return total


def gradient_matching(model: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_gm of the network ``model`` (its current weights) on clean ``x`` and protected ``x_u``;
    differentiable with respect to ``x_u``. ``model`` should be in eval mode."""
    params = _matched_params(model)
    target = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    target = [g.detach() for g in target]
    mine = torch.autograd.grad(F.cross_entropy(model(x_u), y), params, create_graph=True)
    return gradient_distance(list(mine), target)


def feature_distance(encode: nn.Module, x: torch.Tensor, x_u: torch.Tensor,
                     targets: torch.Tensor | None = None) -> torch.Tensor:
    """L_fd: cos(f(x_u), f(x)) − cos(f(x_u), targets) (the second term when ``targets``, unit
    prototypes (N, D) of the misaligned classes, are given); ``encode`` returns unit features."""
    with torch.no_grad():
        clean = encode(x)
    feats = encode(x_u)
    loss = (feats * clean).sum(1).mean()
    if targets is not None:
        loss = loss - (feats * targets).sum(1).mean()
    return loss
