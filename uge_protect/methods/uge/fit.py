"""Fitting UGE (see :mod:`uge_protect.methods.uge.method` for the method).

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
from uge_protect.methods.base import FitContext
from uge_protect.methods.em.method import build_surrogate
from uge_protect.methods.fitting import (BatchCursor, FitResult, ProgressWindow, check_images, check_labels,
    check_shares, fit_record, module_weights, restore, snapshot)
from uge_protect.methods.uge.config import UGEConfig
from uge_protect.methods.uge.generator import build_noise_generator
from uge_protect.methods.uge.key import (Key, along_key, build_authorized, derived_seed, key_direction, key_fingerprint,
    new_key, normalize_key, state_fingerprint)
from uge_protect.methods.uge.losses import feature_distance, gradient_matching
from uge_protect.methods.uge.texture_key import (TextureProjection, along_texture, block_coefficients, texture_phases,
    texture_tiles)
from uge_protect.methods.uge.method import uge_fit_architectures
from uge_protect.models.classifiers import set_frozen
from uge_protect.models.clip import TINY_CLIP_CONFIG, build_clip_model, resolve_model_config
from uge_protect.models.distill import distillation
from uge_protect.models.training import shift_flip, sync_buffers, sync_grads


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
    # OneCycleLR divides by zero at exactly 4 steps (its warm-up would end at step 0.25·4 − 1 = 0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 2) + (total == 4),
                                                pct_start=0.25)
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


def _checked(images: torch.Tensor, labels: torch.Tensor, cfg: UGEConfig, ctx: FitContext
             ) -> tuple[UGEConfig, torch.Tensor, int]:
    """A validated copy of ``cfg`` (students resolved, key drawn or resumed), the labels as
    int64 and the number of classes; a :class:`UserError` for unusable inputs or options."""
    cfg = dataclasses.replace(cfg)
    cfg.validate()
    check_images(images)
    labels = check_labels(images, labels)
    if len(labels) < 2 or int(labels.min()) < 0:
        raise UserError("UGE needs at least two training images, each with a class label >= 0")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise UserError("UGE needs at least two classes in the training labels")
    check_shares(cfg.batch_size, len(images), ctx.world)
    if not cfg.students:
        raise UserError("UGE needs at least one L_ud student architecture")
    cfg.student = ",".join(cfg.students)  # the artifact records the resolved list
    if "small_cnn" not in cfg.students:
        cfg.student_width = None
    if cfg.authorized in cfg.students and not cfg.key_projection:
        raise UserError("without the key projection the L_ud students must be other architectures than the "
                        "authorized one (with it, the plain authorized architecture is a hacker like any other)")
    if ctx.state is not None:
        if not isinstance(ctx.state.get("key_seed"), str):
            raise UserError("the checkpoint holds an integer key from an older version; delete it and start over")
        cfg.key_seed = normalize_key(ctx.state["key_seed"])
    elif cfg.key_seed is None:
        cfg.key_seed = _shared_new_key(ctx.world)
    else:
        cfg.key_seed = normalize_key(cfg.key_seed)
    return cfg, labels, num_classes


class _UGEFit:
    """One UGE fit: its networks, optimizers and random generator, step by step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: UGEConfig, num_classes: int,
                 ctx: FitContext):
        self.images, self.labels, self.cfg, self.num_classes, self.ctx = images, labels, cfg, num_classes, ctx
        self.key: str = cfg.key_seed  # type: ignore[assignment]  # resolved by _checked
        self.started = time.perf_counter()
        self.n, _, self.h, self.w = images.shape
        self.device = ctx.pick_device(cfg.device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.bs = min(cfg.batch_size, self.n)
        texture = cfg.key_scheme == "texture"
        self.direction = key_direction(self.key) if cfg.key_projection and not texture else None
        self.tiles = texture_tiles(self.key, num_classes) if texture else None
        self.authorized = build_authorized(cfg.authorized, num_classes, self.key, cfg.key_projection,
                                           scheme=cfg.key_scheme).to(self.device)
        # what the authorized network trains on: the owner's view (the texture key projects whole images)
        self.owner_images = TextureProjection(self.key, num_classes)(images) if texture else images
        self.init_fingerprint = state_fingerprint(self.authorized.state_dict())
        self.feature_cfg = resolve_model_config(cfg.feature_model, TINY_CLIP_CONFIG,
                                                image_size=self.h if self.h == self.w else None)
        self.features = FeatureSpace(self.feature_cfg, cfg.feature_pretrained, cfg.seed).to(self.device)
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.prototypes = torch.zeros(num_classes, 1)
        self.step = 0
        self.history: list[dict[str, Any]] = []

    def phase_one(self) -> None:
        """Train the authorized network and the feature space on the clean images (or take
        them from the checkpoint), then freeze both."""
        cfg, ctx, state = self.cfg, self.ctx, self.ctx.state
        if state is None:
            t0 = time.perf_counter()
            self.snapshots = _train_supervised(
                self.authorized, None, self.owner_images, self.labels, cfg.authorized_epochs, cfg.authorized_lr, self.bs,
                self.gen, self.device, ctx.rank, ctx.world, cfg.snapshots if cfg.gm_active else 0)
            if cfg.feature_pretrained is None and cfg.feature_epochs > 0 and cfg.fd_weight > 0:
                with torch.no_grad():
                    dim = int(self.features(self.images[:2].to(self.device).float().div(255.0)).shape[1])
                with torch.random.fork_rng(devices=[]):  # the head's init from the fit's seed, not the global RNG
                    torch.manual_seed(derived_seed(cfg.seed, "feature-head"))
                    head = nn.Linear(dim, self.num_classes).to(self.device)
                _train_supervised(self.features, head, self.images, self.labels, cfg.feature_epochs,
                                  cfg.authorized_lr, self.bs, self.gen, self.device, ctx.rank, ctx.world)
            self.features.eval()
            self.prototypes = _prototypes(self.features, self.images, self.labels, self.num_classes, self.device)
            if ctx.progress is not None:
                ctx.report({"phase": "authorized + feature space", "step": 1, "steps": 1,
                            "seconds": time.perf_counter() - self.started, "phase_seconds": time.perf_counter() - t0,
                            "teacher_train_acc": _accuracy(self.authorized, self.owner_images, self.labels,
                                                           self.device)})
        else:
            restore(state, {"authorized": self.authorized, "features": self.features})
            self.snapshots = list(state["snapshots"])
            self.prototypes = state["prototypes"]
        for net in (self.authorized, self.features):
            net.eval()
            set_frozen(net, True)
        self.perm = class_permutation(self.key, self.num_classes).to(self.device)
        self.prototypes = self.prototypes.to(self.device)
        self.snapshot_nets = []
        for snap in self.snapshots:
            net = copy.deepcopy(self.authorized)
            net.load_state_dict(snap)
            set_frozen(net, False)  # L_gm differentiates through its parameters
            self.snapshot_nets.append(net.eval())

    def players(self) -> None:
        """Build the generator and the L_ud students with their optimizers (from the
        checkpoint when resuming), and the batch cursor."""
        cfg = self.cfg
        self.generator = build_noise_generator(
            1 if cfg.key_projection else 3, cfg.width, cfg.depth, cfg.seed,
            self.num_classes if cfg.label_conditioned else None, cfg.pattern_size).to(self.device)
        self.students = nn.ModuleList(
            build_surrogate(name, self.num_classes, cfg.student_width if name == "small_cnn" else None,
                            seed=cfg.seed + 1 + i)
            for i, name in enumerate(cfg.students)).to(self.device)
        self.g_opt = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lr, weight_decay=1e-4)
        self.g_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.g_opt, T_max=cfg.steps)
        self.s_opt = torch.optim.SGD(self.students.parameters(), lr=cfg.student_lr, momentum=0.9, weight_decay=5e-4)
        self.cursor = BatchCursor(self.n, self.bs, self.gen)
        state = self.ctx.state
        if self.tiles is not None and self.generator.patterns is not None:
            self.generator.patterns.fill_(1.0)  # start from every class's texture at full strength
        self.window = ProgressWindow(self.started)
        if state is not None and state.get("generator") is not None:
            self.step = int(state["step"])
            restore(state, self._stateful())
            self.history = list(state["history"])
            self.window = ProgressWindow(self.started, state["window"])
            self.cursor.restore(state)
        if state is not None:
            self.gen.set_state(state["rng"])

    def _stateful(self) -> dict[str, Any]:
        return {"generator": self.generator, "student": self.students, "g_opt": self.g_opt,
                "g_sched": self.g_sched, "s_opt": self.s_opt}

    def snapshot(self) -> dict[str, Any]:
        """The full training state, for a checkpoint."""
        return snapshot(self.step, self.gen, self.cursor, self.window, self.history, {
            "key_seed": self.key, "authorized": self.authorized, "features": self.features,
            "snapshots": self.snapshots, "prototypes": self.prototypes.cpu(), **self._stateful()})

    def _cond(self, y: torch.Tensor) -> torch.Tensor | None:
        return y if self.cfg.label_conditioned else None

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return shift_flip(t, self.gen) if self.cfg.augment else t

    def _delta(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """δ for [0, 1] images ``x`` (exactly uint8 levels / 255) from the generator's output t."""
        if self.tiles is None:
            return make_delta(x, t, self.cfg.epsilon, self.direction)
        phases = texture_phases(self.key, torch.round(x.detach() * 255).to(torch.uint8).cpu())
        return along_texture(x, block_coefficients(t), y, self.tiles, phases, self.cfg.epsilon)

    def generator_losses(self, x: torch.Tensor, y: torch.Tensor, owner_x: torch.Tensor | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The generator's losses on a batch: L_ud, L_fd and L_gm as they are active, with the
        augmented protected images, the teacher's logits on them and the class patterns.
        ``owner_x``: what the authorized network sees of the batch when it is not ``x + δ``
        through its own first layer (the texture key's projected images)."""
        cfg = self.cfg
        self.generator.train()
        pattern = None
        if cfg.label_conditioned:
            pattern = self.generator.class_patterns(y, (self.h, self.w)).detach().requires_grad_(True)
        x_u = x + self._delta(x, self.generator(x, self._cond(y), pattern), y)
        views = [x, x_u] if owner_x is None else [x, x_u, owner_x]
        stacked = self._view(torch.cat(views, dim=1))  # the same shift and flip for all
        vx, vu = stacked[:, :3], stacked[:, 3:6]
        with torch.no_grad():
            teacher = self.authorized(vu if owner_x is None else stacked[:, 6:])
        parts: dict[str, torch.Tensor] = {}
        self.students.eval()
        if cfg.ud_weight > 0:
            parts["ud"] = sum(student_loss(st(vu), teacher, y, cfg.temperature, cfg.distill_weight)
                              for st in self.students) / len(self.students)
        if cfg.fd_weight > 0:
            targets = self.prototypes[self.perm[y]] if cfg.misalign else None
            parts["fd"] = feature_distance(self.features, vx, vu, targets)
        if cfg.gm_active:
            net = self.snapshot_nets[int(torch.randint(len(self.snapshot_nets), (1,), generator=self.gen))]
            parts["gm"] = gradient_matching(net, x, x_u, y)
        return parts, vu, teacher, pattern

    def train_step(self) -> None:
        """One generator step, then one student step on the protected images."""
        cfg, world = self.cfg, self.ctx.world
        batch = self.cursor.next()
        idx = batch[self.ctx.rank::world]
        x = self.images[idx].to(self.device).float().div_(255.0)
        y = self.labels[idx].to(self.device)
        owner_x = self.owner_images[idx].to(self.device).float().div_(255.0) if self.tiles is not None else None
        parts, vu, teacher, pattern = self.generator_losses(x, y, owner_x)
        weights = {"ud": cfg.ud_weight, "fd": cfg.fd_weight, "gm": cfg.gm_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        self.g_opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.generator.parameters(), world)
        self.g_opt.step()
        self.g_sched.step()
        if pattern is not None and pattern.grad is not None:
            _pattern_step(self.generator, pattern.grad, y, cfg.pattern_step, world)
        for net in self.snapshot_nets:
            net.zero_grad(set_to_none=True)
        # the student learns from the authorized network on the protected images
        self.students.train()
        s_loss = sum(student_loss(st(vu.detach()), teacher, y, cfg.temperature, cfg.distill_weight)
                     for st in self.students) / len(self.students)
        self.s_opt.zero_grad(set_to_none=True)
        s_loss.backward()
        sync_grads(self.students.parameters(), world)
        self.s_opt.step()
        self.step += 1
        self.window.add({k: float(v.detach()) for k, v in {**parts, "student": s_loss}.items()}, len(batch))

    def run(self) -> None:
        """Phase 2: generator and student steps to ``cfg.steps``, reporting and checkpointing."""
        cfg, ctx = self.cfg, self.ctx
        if ctx.state is None and ctx.checkpoint is not None and ctx.checkpoint_every:
            ctx.checkpoint(self.snapshot())  # phase 1 is never repeated on resume
        while self.step < cfg.steps:
            self.train_step()
            if self.step % 20 == 0 or self.step == cfg.steps:
                self.history.append(dict(self.window.close("generator", self.step, cfg.steps, ctx)))
            if ctx.checkpoint_due(self.step, cfg.steps):
                sync_buffers(self.students, ctx.world)
                if ctx.checkpoint is not None:
                    ctx.checkpoint(self.snapshot())
        sync_buffers(self.students, ctx.world)

    def result(self) -> FitResult:
        """The artifact's config (with the key: the artifact is the owner's) and weights (the
        generator only)."""
        cfg = self.cfg

        def protect(xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return self._delta(xx, self.generator(xx, self._cond(yy)), yy)

        config = fit_record(
            "uge", cfg, feature_model=self.feature_cfg, gm_active=cfg.gm_active, confidence_gate=cfg.gated,
            key_fingerprint=key_fingerprint(self.key), authorized_init_fingerprint=self.init_fingerprint,
            num_classes=self.num_classes, fit_size=[self.h, self.w], n_train=self.n, device=self.device.type,
            processes=self.ctx.world, loss_history=self.history,
            student_train_acc_protected=_accuracy(self.students[0], self.images, self.labels, self.device, protect),
            fit_seconds=round(time.perf_counter() - self.started, 1),
            fit_architectures=uge_fit_architectures(cfg.students, self.feature_cfg, cfg.fd_weight,
                                                    cfg.authorized if cfg.gm_active else None))
        return config, {"generator": module_weights(self.generator)}


def fit_uge(images: torch.Tensor, labels: torch.Tensor, cfg: UGEConfig, ctx: FitContext | None = None
            ) -> FitResult:
    """Fit a UGE generator on uint8 ``images`` (N, 3, H, W) with int ``labels`` (N,).

    ``ctx.state`` resumes from an earlier ``ctx.checkpoint`` call (made every
    ``checkpoint_every`` generator steps, and once after phase 1). Under a launch of
    ``ctx.world`` processes each takes every ``world``-th sample of each batch and gradients
    are averaged. Returns ``(config, weights)`` for :func:`artifact.save_artifact`; the config
    holds the key (the artifact is the owner's), the weights only the generator.
    """
    ctx = ctx or FitContext()
    cfg, labels, num_classes = _checked(images, labels, cfg, ctx)
    fit = _UGEFit(images, labels, cfg, num_classes, ctx)
    fit.phase_one()
    fit.players()
    fit.run()
    return fit.result()


def fit_uge_from_options(images: torch.Tensor, labels: torch.Tensor, captions: list[str | None],
                         options: dict[str, Any], ctx: FitContext | None = None) -> FitResult:
    """The fitter registered under ``"uge"`` (needs labels; checkpoints, resumes, multi-process)."""
    return fit_uge(images, labels, UGEConfig.from_options(options), ctx)
