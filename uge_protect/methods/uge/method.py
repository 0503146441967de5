"""``uge``: Ungeneralizable Examples (Ye & Wang, CVPR 2024), our reimplementation.

The protected data x + δ stays learnable for the owner's *authorized* network and teaches
every other network a shortcut that does not generalize. A generator makes the noise from
the image, δ = ε·tanh(G(x)), and is trained with three losses (:mod:`uge_protect.methods.uge.losses`):

* L_ud (undistillation): a student of another architecture, trained alongside on x + δ by
  distilling the authorized network, is given noise that makes its loss trivially low
  (min-min, as in EM): it learns the noise instead of the images;
* L_fd (feature distance): x + δ is pushed away from x in a frozen image-feature space that
  all architectures share (an open_clip image tower), and with misalignment toward the
  prototype of another class (a permutation of the classes drawn from the key);
* L_gm (gradient matching): the authorized network's gradients on x + δ match those on x at
  points of its training trajectory (snapshots taken while it is first trained on x).

Authorization (:mod:`uge_key`). With the key projection on (the default) the authorized
network's first operation removes each pixel's colour component along a secret direction
v drawn from the key, and δ is written along v only: the authorized network sees exactly the
clean images (L_gm is then identically zero and is not computed), every other network sees
the noise. With ``key_projection=False`` the authorized network is the bare architecture,
initialised from the key, as in the paper, and L_gm is what keeps it learning.

Fit has two phases: (1) the authorized network is trained on the clean images for a few
epochs (snapshots for L_gm; the final weights are the teacher of L_ud) and the feature
encoder is trained on the labels (unless pretrained); (2) generator and student steps
alternate. This module works on tensors; files belong to the pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from uge_protect.errors import UserError
from uge_protect.methods.artifact import (artifact_fingerprint, check_config, check_fitted_epsilon, load_artifact,
    loading)
from uge_protect.methods.base import APPLY_CHUNK, ProtectBatch, ProtectionMethod, clip_arch_id, in_fixed_chunks
from uge_protect.methods.em.method import build_surrogate
from uge_protect.methods.uge.config import APPLY_FIELDS, AUTO_STUDENTS, UGEArtifact, UGEConfig
from uge_protect.methods.uge.generator import build_noise_generator
from uge_protect.methods.uge.key import (Key, along_key, build_authorized, derived_seed, key_direction, key_fingerprint,
    key_signs, levels_along_key, new_key, normalize_key, state_fingerprint)
from uge_protect.methods.uge.losses import feature_distance, gradient_matching
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.clip import TINY_CLIP_CONFIG, build_clip_model, resolve_model_config
from uge_protect.models.distill import distillation
from uge_protect.models.training import pick_device, shift_flip, sync_buffers, sync_grads

Progress = Callable[[dict[str, Any]], None]


def uge_fit_architectures(students: list[str], feature_model: str | dict | None, fd_weight: float,
                          authorized: str | None = None) -> list[str]:
    """What a UGE fit trains δ against: the L_ud students, the feature space's CLIP image
    tower when L_fd is on, and ``authorized`` when given (L_gm fits δ through the authorized
    network: without the key projection). Under the key projection the authorized network
    never sees δ, so it is not among them unless it is a student: its key-less copy is a
    hacker like any other."""
    names = list(students) + ([authorized] if authorized else [])
    if fd_weight > 0 and feature_model is not None:
        names.append(clip_arch_id(feature_model))
    return list(dict.fromkeys(names))


class FeatureSpace(nn.Module):
    """A shared image-feature space: an open_clip image tower giving unit features."""

    def __init__(self, model_config: str | dict, pretrained: str | None, seed: int):
        super().__init__()
        self.bundle = build_clip_model(model_config, seed=seed, pretrained=pretrained)
        self.visual = self.bundle.model.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(self.bundle.prepare_images(x)).float(), dim=-1)


def class_permutation(key: Key, num_classes: int) -> torch.Tensor:
    """The misalignment target of every class: a derangement drawn from the key."""
    gen = torch.Generator().manual_seed(derived_seed(key, "permutation"))
    shift = int(torch.randint(1, num_classes, (1,), generator=gen))
    order = torch.randperm(num_classes, generator=gen)
    perm = torch.empty(num_classes, dtype=torch.long)
    perm[order] = order.roll(-shift)  # a cycle through a random order: nobody maps to itself
    return perm


def make_delta(x: torch.Tensor, t: torch.Tensor, epsilon: float, direction: torch.Tensor | None) -> torch.Tensor:
    """δ from the generator's output t: along the key direction (t has 1 channel), or ε·t
    clipped to the image box (3 channels, no key projection)."""
    if direction is not None:
        return along_key(x, t, direction.to(x.device), epsilon)
    return (x + epsilon * t).clamp(0.0, 1.0) - x


def student_loss(logits: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                 distill_weight: float) -> torch.Tensor:
    """The L_ud student's loss, Hinton et al.'s distillation: the label term plus
    ``distill_weight`` times the soft teacher term."""
    loss = F.cross_entropy(logits, y)
    return loss + distill_weight * distillation(logits, teacher, temperature) if distill_weight > 0 else loss


@torch.no_grad()
def _pattern_step(generator: nn.Module, grad: torch.Tensor, y: torch.Tensor, step: float, world: int) -> None:
    """Class-wise EM's update of the class patterns: a signed step per sample, averaged over
    the samples of each class (over all processes), brought to the pattern size, clipped."""
    patterns = generator.patterns
    moved = -step * grad.sign()
    if tuple(moved.shape[-2:]) != tuple(patterns.shape[-2:]):
        moved = F.interpolate(moved, size=patterns.shape[-2:], mode="bilinear", align_corners=False)
    sums = torch.zeros_like(patterns).index_add_(0, y, moved)
    counts = torch.bincount(y, minlength=patterns.shape[0]).to(patterns.dtype)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(counts)
    present = counts > 0
    patterns[present] = (patterns[present] + sums[present] / counts[present].view(-1, 1, 1, 1)).clamp_(-1.0, 1.0)


def _shared_new_key(world: int) -> str:
    """A fresh key, the same on every process of a launch (drawn on the first)."""
    key = new_key()
    if world > 1:
        import torch.distributed as dist

        shared = torch.tensor(list(bytes.fromhex(key)), dtype=torch.int64)
        dist.broadcast(shared, src=0)
        key = bytes(shared.tolist()).hex()
    return key


def _batches(n: int, bs: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    return [order[i:i + bs] for i in range(0, n - bs + 1 if n >= bs else 1, bs)] or [order]


def _train_supervised(model: nn.Module, head: nn.Module | None, images: torch.Tensor, labels: torch.Tensor,
                      epochs: int, lr: float, bs: int, gen: torch.Generator, device: torch.device,
                      rank: int, world: int, snapshots: int = 0) -> list[dict[str, torch.Tensor]]:
    """Train ``model`` (with ``head`` on its output) on clean uint8 images with augmentation;
    returns ``snapshots`` evenly spaced weight copies (the first at initialisation)."""
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    plan = [_batches(len(images), bs, gen) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 2), pct_start=0.25)
    keep = {round(i * total / snapshots) for i in range(snapshots)} if snapshots else set()
    taken: list[dict[str, torch.Tensor]] = []
    step = 0
    model.train()
    for epoch_plan in plan:
        for batch in epoch_plan:
            if step in keep:
                sync_buffers(model, world)
                taken.append(copy.deepcopy(model.state_dict()))
            idx = batch[rank::world]
            x = shift_flip(images[idx].to(device).float().div_(255.0), gen)
            out = model(x)
            loss = F.cross_entropy(head(out) if head is not None else out, labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync_grads(params, world)
            opt.step()
            sched.step()
            step += 1
    sync_buffers(model, world)
    model.eval()
    return taken


def fit_uge(images: torch.Tensor, labels: torch.Tensor, cfg: UGEConfig, progress: Progress | None = None, *,
            state: dict[str, Any] | None = None, checkpoint: Callable[[dict[str, Any]], None] | None = None,
            checkpoint_every: int = 0, rank: int = 0, world: int = 1
            ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Fit a UGE generator on uint8 ``images`` (N, 3, H, W) with int ``labels`` (N,).

    ``state`` resumes from an earlier ``checkpoint`` call (made every ``checkpoint_every``
    generator steps, and once after phase 1). Under a launch of ``world`` processes each
    takes every ``world``-th sample of each batch and gradients are averaged. Returns
    ``(config, weights)`` for :func:`artifact.save_artifact`; the config holds the key (the
    artifact is the owner's), the weights only the generator.
    """
    cfg = dataclasses.replace(cfg)
    cfg.validate()
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    labels = labels.to(torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if len(labels) < 2 or int(labels.min()) < 0:
        raise UserError("UGE needs at least two training images, each with a class label >= 0")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise UserError("UGE needs at least two classes in the training labels")
    if min(cfg.batch_size, len(images)) < 2 * world:
        raise UserError(f"batch size {cfg.batch_size} is too small for {world} processes (at least 2 each)")
    if not cfg.students:
        raise UserError("UGE needs at least one L_ud student architecture")
    cfg.student = ",".join(cfg.students)  # the artifact records the resolved list
    if "small_cnn" not in cfg.students:
        cfg.student_width = None
    if cfg.authorized in cfg.students and not cfg.key_projection:
        raise UserError("without the key projection the L_ud students must be other architectures than the "
                        "authorized one (with it, the plain authorized architecture is a hacker like any other)")
    if state is not None:
        if not isinstance(state.get("key_seed"), str):
            raise UserError("the checkpoint holds an integer key from an older version; delete it and start over")
        cfg.key_seed = normalize_key(state["key_seed"])
    elif cfg.key_seed is None:
        cfg.key_seed = _shared_new_key(world)
    else:
        cfg.key_seed = normalize_key(cfg.key_seed)
    key = cfg.key_seed
    started = time.perf_counter()
    n, _, h, w = images.shape
    device = pick_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, n)
    direction = key_direction(key) if cfg.key_projection else None

    authorized = build_authorized(cfg.authorized, num_classes, key, cfg.key_projection).to(device)
    init_fingerprint = state_fingerprint(authorized.state_dict())
    feature_cfg = resolve_model_config(cfg.feature_model, TINY_CLIP_CONFIG, image_size=h if h == w else None)
    features = FeatureSpace(feature_cfg, cfg.feature_pretrained, cfg.seed).to(device)
    snapshots: list[dict[str, torch.Tensor]] = []
    prototypes = torch.zeros(num_classes, 1)
    if state is None:
        t0 = time.perf_counter()
        snapshots = _train_supervised(authorized, None, images, labels, cfg.authorized_epochs, cfg.authorized_lr,
                                      bs, gen, device, rank, world, cfg.snapshots if cfg.gm_active else 0)
        if cfg.feature_pretrained is None and cfg.feature_epochs > 0 and cfg.fd_weight > 0:
            with torch.no_grad():
                dim = int(features(images[:2].to(device).float().div(255.0)).shape[1])
            head = nn.Linear(dim, num_classes).to(device)
            _train_supervised(features, head, images, labels, cfg.feature_epochs, cfg.authorized_lr, bs, gen,
                              device, rank, world)
        features.eval()
        prototypes = _prototypes(features, images, labels, num_classes, device)
        if progress is not None:
            progress({"phase": "authorized + feature space", "step": 1, "steps": 1,
                      "seconds": time.perf_counter() - started, "phase_seconds": time.perf_counter() - t0,
                      "teacher_train_acc": _accuracy(authorized, images, labels, device)})
    else:
        authorized.load_state_dict(state["authorized"])
        features.load_state_dict(state["features"])
        snapshots = list(state["snapshots"])
        prototypes = state["prototypes"]
    authorized.eval()
    features.eval()
    set_frozen(authorized, True)
    set_frozen(features, True)
    perm = class_permutation(key, num_classes).to(device)
    prototypes = prototypes.to(device)
    snapshot_nets = []
    for snap in snapshots:
        net = copy.deepcopy(authorized)
        net.load_state_dict(snap)
        set_frozen(net, False)  # L_gm differentiates through its parameters
        snapshot_nets.append(net.eval())

    generator = build_noise_generator(1 if cfg.key_projection else 3, cfg.width, cfg.depth, cfg.seed,
                                      num_classes if cfg.label_conditioned else None, cfg.pattern_size).to(device)
    cond = (lambda yy: yy) if cfg.label_conditioned else (lambda yy: None)
    students = nn.ModuleList(
        build_surrogate(name, num_classes, cfg.student_width if name == "small_cnn" else None, seed=cfg.seed + 1 + i)
        for i, name in enumerate(cfg.students)).to(device)
    g_opt = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, weight_decay=1e-4)
    g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(g_opt, T_max=cfg.steps)
    s_opt = torch.optim.SGD(students.parameters(), lr=cfg.student_lr, momentum=0.9, weight_decay=5e-4)
    step, history, window = 0, [], []
    order, cursor = torch.randperm(n, generator=gen), 0
    if state is not None and state.get("generator") is not None:
        step = int(state["step"])
        generator.load_state_dict(state["generator"])
        students.load_state_dict(state["student"])
        g_opt.load_state_dict(state["g_opt"])
        g_sched.load_state_dict(state["g_sched"])
        s_opt.load_state_dict(state["s_opt"])
        history, window = list(state["history"]), list(state["window"])
        order, cursor = state["order"].clone(), int(state["cursor"])
    if state is not None:
        gen.set_state(state["rng"])

    def snapshot_state() -> dict[str, Any]:
        return copy.deepcopy({
            "key_seed": key, "step": step, "authorized": authorized.state_dict(), "features": features.state_dict(),
            "snapshots": snapshots, "prototypes": prototypes.cpu(), "generator": generator.state_dict(),
            "student": students.state_dict(), "g_opt": g_opt.state_dict(), "g_sched": g_sched.state_dict(),
            "s_opt": s_opt.state_dict(), "history": history, "window": window, "rng": gen.get_state(),
            "order": order, "cursor": cursor,
        })

    if state is None and checkpoint is not None and checkpoint_every:
        checkpoint(snapshot_state())  # phase 1 is never repeated on resume

    def view(t: torch.Tensor) -> torch.Tensor:
        return shift_flip(t, gen) if cfg.augment else t

    tick, seen = time.perf_counter(), 0
    while step < cfg.steps:
        if cursor + bs > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        batch = order[cursor:cursor + bs]
        cursor += bs
        idx = batch[rank::world]
        x = images[idx].to(device).float().div_(255.0)
        y = labels[idx].to(device)
        generator.train()
        pattern = None
        if cfg.label_conditioned:
            pattern = generator.class_patterns(y, (h, w)).detach().requires_grad_(True)
        delta = make_delta(x, generator(x, cond(y), pattern), cfg.epsilon, direction)
        x_u = x + delta
        pair = view(torch.cat([x, x_u], dim=1))  # the same shift and flip for both
        vx, vu = pair[:, :3], pair[:, 3:]
        with torch.no_grad():
            teacher = authorized(vu)
        parts: dict[str, torch.Tensor] = {}
        students.eval()
        if cfg.ud_weight > 0:
            parts["ud"] = sum(student_loss(st(vu), teacher, y, cfg.temperature, cfg.distill_weight)
                              for st in students) / len(students)
        if cfg.fd_weight > 0:
            targets = prototypes[perm[y]] if cfg.misalign else None
            parts["fd"] = feature_distance(features, vx, vu, targets)
        if cfg.gm_active:
            net = snapshot_nets[int(torch.randint(len(snapshot_nets), (1,), generator=gen))]
            parts["gm"] = gradient_matching(net, x, x_u, y)
        weights = {"ud": cfg.ud_weight, "fd": cfg.fd_weight, "gm": cfg.gm_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(generator.parameters(), world)
        g_opt.step()
        g_sched.step()
        if pattern is not None and pattern.grad is not None:
            _pattern_step(generator, pattern.grad, y, cfg.pattern_step, world)
        for net in snapshot_nets:
            net.zero_grad(set_to_none=True)
        # the student learns from the authorized network on the protected images
        students.train()
        s_loss = sum(student_loss(st(vu.detach()), teacher, y, cfg.temperature, cfg.distill_weight)
                     for st in students) / len(students)
        s_opt.zero_grad(set_to_none=True)
        s_loss.backward()
        sync_grads(students.parameters(), world)
        s_opt.step()
        step += 1
        seen += len(batch)
        window.append({k: float(v.detach()) for k, v in {**parts, "student": s_loss}.items()})
        if step % 20 == 0 or step == cfg.steps:
            now = time.perf_counter()
            record = {"phase": "generator", "step": step,
                      **{k: sum(r[k] for r in window) / len(window) for k in window[0]}}
            history.append(dict(record))
            if progress is not None:
                progress({**record, "steps": cfg.steps, "seconds": now - started,
                          "images_per_s": seen / max(now - tick, 1e-9)})
            window, seen, tick = [], 0, now
        if checkpoint_every and step % checkpoint_every == 0 and step < cfg.steps:
            sync_buffers(students, world)
            if checkpoint is not None:
                checkpoint(snapshot_state())
    sync_buffers(students, world)
    config = {
        "method": "uge",
        **dataclasses.asdict(cfg),
        "feature_model": feature_cfg,
        "gm_active": cfg.gm_active,
        "confidence_gate": cfg.gated,
        "key_fingerprint": key_fingerprint(key),
        "authorized_init_fingerprint": init_fingerprint,
        "num_classes": num_classes,
        "fit_size": [h, w],
        "n_train": n,
        "device": device.type,
        "processes": world,
        "loss_history": history,
        "student_train_acc_protected": _accuracy(students[0], images, labels, device,
                                                 lambda xx, yy: make_delta(xx, generator(xx, cond(yy)), cfg.epsilon,
                                                                           direction)),
        "fit_seconds": round(time.perf_counter() - started, 1),
        "fit_architectures": uge_fit_architectures(cfg.students, feature_cfg, cfg.fd_weight,
                                                   cfg.authorized if cfg.gm_active else None),
    }
    weights = {"generator": {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}}
    return config, weights


@torch.no_grad()
def _prototypes(features: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                device: torch.device) -> torch.Tensor:
    """Unit mean feature of each class on the clean images (zeros for an absent class)."""
    sums = None
    for i in range(0, len(images), 512):
        f = features(images[i:i + 512].to(device).float().div_(255.0))
        if sums is None:
            sums = torch.zeros(num_classes, f.shape[1], device=device)
        sums.index_add_(0, labels[i:i + 512].to(device), f)
    assert sums is not None
    return F.normalize(sums, dim=1).cpu()


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              protect: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """Accuracy of ``model`` on the images (plus ``protect(x, y)``, δ, when given)."""
    was = model.training
    model.eval()
    right = 0
    for i in range(0, len(images), 512):
        x = images[i:i + 512].to(device).float().div_(255.0)
        if protect is not None:
            x = x + protect(x, labels[i:i + 512].to(device))
        right += int((model(x).argmax(1).cpu() == labels[i:i + 512]).sum())
    model.train(was)
    return right / len(images)


def fit_uge_from_options(images: torch.Tensor, labels: torch.Tensor, captions: list[str | None],
                         options: dict[str, Any], progress: Progress | None = None, **kwargs: Any
                         ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The fitter registered under ``"uge"`` (needs labels; checkpoints, resumes, multi-process)."""
    return fit_uge(images, labels, UGEConfig.from_options(options), progress, **kwargs)


# --------------------------------------------------------------------------- apply


def load_uge_artifact(path: str, required: tuple[str, ...] = APPLY_FIELDS
                      ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """A UGE artifact's config and weights, the config checked against :class:`UGEArtifact`
    (``required`` fields present); a :class:`UserError` for anything unusable, among them
    the integer keys of older versions (too short to stay secret)."""
    def check(config: dict[str, Any]) -> None:
        key = config.get("key_seed")
        if isinstance(key, int) and not isinstance(key, bool):
            raise UserError(f"UGE artifact {path} holds an integer key from an older version: it has fewer than 128 "
                            "bits and its published fingerprint can be brute-forced; refit it with `uge-protect fit "
                            "uge` (it draws a fresh 256-bit key)")
        # artifacts older than these fields made δ from the image alone, and had no gate
        check_config(path, config, UGEArtifact, required=required,
                     legacy={"label_conditioned": False, "confidence_gate": False})

    return load_artifact(path, expected_method="uge", check=check)


class Ungeneralizable(ProtectionMethod):
    """Apply a fitted UGE generator: δ from each image alone (no label or caption needed)."""

    name = "uge"

    def __init__(self, config: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                 fingerprint: str | None = None):
        super().__init__(epsilon=float(config["epsilon"]))
        self._config = dict(config)
        self._fingerprint = fingerprint
        self.key_projection = bool(config["key_projection"])
        self.signs = key_signs(config["key_seed"]) if self.key_projection else None
        self.label_conditioned = bool(config.get("label_conditioned", False))
        self.num_classes = int(config["num_classes"])
        self.generator = build_noise_generator(1 if self.key_projection else 3, int(config["width"]),
                                               int(config["depth"]), seed=0,
                                               num_classes=self.num_classes if self.label_conditioned else None,
                                               pattern_size=int(config.get("pattern_size", 32)))
        try:
            self.generator.load_state_dict(weights["generator"], strict=True)
        except (KeyError, RuntimeError) as exc:
            raise UserError(f"UGE artifact's generator does not load: {str(exc).splitlines()[0]}") from exc
        self.generator.eval()
        set_frozen(self.generator, True)

    @classmethod
    def from_artifact(cls, path: str, epsilon: float | None = None) -> "Ungeneralizable":
        """Load an artifact made by ``uge-protect fit uge``; its ε is authoritative."""
        config, weights = load_uge_artifact(path)
        check_fitted_epsilon(path, config, epsilon)
        with loading(path, "UGE"):
            return cls(config, weights, fingerprint=artifact_fingerprint(path))

    @property
    def requires_label(self) -> bool:  # type: ignore[override]
        return self.label_conditioned

    def to(self, device: torch.device | str) -> "Ungeneralizable":
        super().to(device)
        self.generator.to(self.device)
        return self

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def fit_architectures(self) -> list[str]:
        """The students and the L_fd feature space (see :func:`uge_fit_architectures`)."""
        c = self._config
        student = str(c.get("student") or "")
        students = list(AUTO_STUDENTS) if student.strip() == "auto" else [x.strip() for x in student.split(",") if x.strip()]
        gm_active = not c.get("key_projection", True) and float(c.get("gm_weight") or 0) > 0
        return uge_fit_architectures(students, c.get("feature_model"), float(c.get("fd_weight") or 0),
                                     c["authorized"] if gm_active else None)

    def config(self) -> dict[str, Any]:
        """Public parameters only: the key and authorized weights appear as fingerprints."""
        keep = ("authorized", "key_projection", "key_fingerprint", "authorized_init_fingerprint", "fit_size",
                "steps", "gm_weight", "fd_weight", "ud_weight", "misalign", "student", "label_conditioned",
                "confidence_gate")
        return {**super().config(), **{k: self._config.get(k) for k in keep}, "apply_chunk": APPLY_CHUNK}

    @torch.no_grad()
    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        """δ in uint8 levels (int16): along the key direction with the key projection (exact
        after quantization), else ε·t rounded to levels."""
        labels: list[int] | None = None
        if self.label_conditioned:
            labels = []
            for lab in batch.labels:
                if lab is None or not 0 <= int(lab) < self.num_classes:
                    raise UserError(f"label {lab!r} is not one of the artifact's {self.num_classes} classes")
                labels.append(int(lab))
        x = batch.images.to(self.device)
        if labels is None:
            t = in_fixed_chunks(lambda xx: self.generator(xx), x)
        else:
            y = torch.tensor(labels, dtype=torch.long, device=self.device)
            t = in_fixed_chunks(lambda xx, yy: self.generator(xx, yy), x, y)
        if self.signs is not None:
            return levels_along_key(batch.pixels.to(self.device), t, self.signs, self.epsilon)
        q = round(self.epsilon * 255)
        levels = torch.round(t.float() * q).to(torch.int16)
        p = batch.pixels.to(self.device).to(torch.int16)
        return torch.minimum(torch.maximum(levels, -p), 255 - p)
