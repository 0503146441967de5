"""Train one classifier on in-memory uint8 images and measure clean test accuracy every epoch.

Augmentation (random crop with zero padding, horizontal flip) and the training-time defenses
run on batches of tensors, so a CPU spends its time in the network, not in per-image
Python. Everything random comes from generators seeded by ``TrainSettings.seed``: the same
seed gives the same initial weights and the same batch order, which makes a protected run and
its clean counterpart a paired comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from uge_protect.eval.defenses import Defense, cutout, mixup, parse_defense, pgd_attack, trivial_augment
from uge_protect.eval.metrics import accuracy_from_confusion, confusion_matrix, per_class_accuracy
from uge_protect.models.classifiers import build_classifier
from uge_protect.models.distill import distillation


@dataclass
class TrainSettings:
    """How one classifier is trained (recorded with every result)."""

    arch: str = "small_cnn"
    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adamw"         # sgd (momentum 0.9, nesterov) | adamw
    lr: float = 3e-3                 # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4
    schedule: str = "onecycle"       # onecycle | cosine
    crop_padding: int = 4            # random crop with this zero padding (0: off)
    flip: bool = True                # random horizontal flip
    cutout_size: int | None = None   # default: half the image side
    mixup_alpha: float = 1.0
    adv_epsilon: float = 8 / 255
    adv_step: float = 2 / 255
    adv_steps: int = 3
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 512


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding ``padding``) and horizontal flip of a batch (N, C, H, W)."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        out = torch.empty_like(x)
        # a slice per sample: on a CPU faster than one gather or advanced-indexing call
        for i, (oy, ox) in enumerate(zip(dy.tolist(), dx.tolist())):
            out[i] = padded[i, :, oy:oy + h, ox:ox + w]
        x = out
    if flip:
        do = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(do.view(n, 1, 1, 1), x.flip(3), x)
    return x.contiguous()


def _to_float(u8: torch.Tensor, device: str) -> torch.Tensor:
    return u8.to(device, non_blocking=True).float().div_(255.0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             device: str, batch_size: int = 512) -> torch.Tensor:
    """Confusion matrix of ``model`` on uint8 ``images``."""
    model.eval()
    preds = []
    for i in range(0, images.shape[0], batch_size):
        preds.append(model(_to_float(images[i:i + batch_size], device)).argmax(1).cpu())
    return confusion_matrix(torch.cat(preds), labels, num_classes)


def fit_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: TrainSettings,
    defense: Defense | str = "none",
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    build_model: Callable[[], torch.nn.Module] | None = None,
    teacher: torch.nn.Module | None = None,
    teacher_images: torch.Tensor | None = None,
    temperature: float = 4.0,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``settings.arch`` on uint8 (N, 3, H, W) images; test accuracy after every epoch.

    ``defense`` is applied here only when it acts at training time (cutout, mixup,
    strong-aug, adv-train); data-level defenses are applied by the caller beforehand.
    ``build_model`` replaces ``build_classifier(settings.arch)`` (e.g. a UGE authorized
    network); with a ``teacher`` the model is distilled from it (temperature-softened KL on
    the same augmented batches, no labels) instead of trained on the labels; with
    ``teacher_images`` (the teacher's own view of each training image, e.g. a key projection
    of the whole image) it is called as ``teacher(batch, view=view)``: its network sees its
    view, cropped and flipped as the student's batch was, its gate the batch itself.
    Returns the trained model and a dict of ``per_epoch`` (``epoch``, ``train_loss``, ``train_acc``, ``test_acc``,
    ``seconds``), ``final_test_acc``, ``best_test_acc``, ``best_epoch``, the final
    ``confusion`` matrix and ``per_class_acc``.
    """
    if isinstance(defense, str):
        defense = parse_defense(defense)
    s = settings
    if s.epochs < 1 or s.batch_size < 1:
        raise ValueError("epochs and batch size must be at least 1")
    g = torch.Generator().manual_seed(s.seed)
    model = (build_model() if build_model is not None else build_classifier(s.arch, num_classes, seed=s.seed)).to(s.device)
    if teacher is not None:
        teacher = teacher.to(s.device).eval()
    n = train_images.shape[0]
    if teacher_images is not None and (teacher is None or teacher_images.shape != train_images.shape):
        raise ValueError("teacher_images needs a teacher and the shape of train_images")
    opt, sched = _optimizer_and_schedule(model, s, s.epochs * max(1, math.ceil(n / s.batch_size)))
    step = _Step(model, opt, sched, s, defense, num_classes, g, teacher, temperature,
                 cut=s.cutout_size or max(1, min(train_images.shape[-2:]) // 2))
    labels = train_labels.long()
    per_epoch: list[dict[str, Any]] = []
    cm = None
    started = time.perf_counter()
    for epoch in range(1, s.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=g)
        epoch_images = train_images
        if defense.name == "strong-aug":
            epoch_images = trivial_augment(train_images, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, n, s.batch_size):
            idx = order[i:i + s.batch_size]
            if idx.numel() == 1 and n > 1:
                continue  # a last batch of one sample: batch norm cannot train on it
            view = None if teacher_images is None else teacher_images[idx]
            batch_loss, batch_correct, batch_seen = step(epoch_images[idx], labels[idx], view)
            loss_sum += batch_loss
            correct += batch_correct
            seen += batch_seen
        cm = evaluate(model, test_images, test_labels, num_classes, s.device, s.eval_batch_size)
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "test_acc": accuracy_from_confusion(cm), "seconds": time.perf_counter() - t0}
        per_epoch.append(record)
        if on_epoch is not None:
            on_epoch(record)
    assert cm is not None
    return model, _results(s, defense, per_epoch, cm, started)


def _optimizer_and_schedule(model: torch.nn.Module, s: TrainSettings, total: int
                            ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and learning-rate schedule of ``s`` over ``total`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=s.lr, momentum=0.9, nesterov=True,
                                                     weight_decay=s.weight_decay)
    elif s.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {s.optimizer!r}; choose sgd or adamw")
    if s.schedule == "onecycle" and total >= 4:
        # warm up over a quarter of the steps (at least two, so very short runs stay valid)
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=s.lr, total_steps=total, pct_start=min(0.5, max(0.25, 2.0 / total)))
    elif s.schedule in ("cosine", "onecycle"):  # onecycle needs a few steps; tiny runs use cosine
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        raise ValueError(f"unknown schedule {s.schedule!r}; choose onecycle or cosine")
    return opt, sched


@dataclass
class _Step:
    """One training step on a uint8 batch: augmentation, the training-time defense, the loss
    (labels, or a teacher's softened outputs) and the update."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    s: TrainSettings
    defense: Defense
    num_classes: int
    g: torch.Generator
    teacher: torch.nn.Module | None
    temperature: float
    cut: int

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, view: torch.Tensor | None = None
                 ) -> tuple[float, int, int]:
        """Train on one batch (``view``: the teacher's view of it, augmented alike); returns
        (summed loss, correct predictions, samples)."""
        s, g = self.s, self.g
        x = _to_float(images, s.device)
        if view is not None:  # one crop and flip for both: stacked along the channels
            both = random_crop_flip(torch.cat([x, _to_float(view, s.device)], 1), s.crop_padding, s.flip, g)
            x, view = both[:, :3].contiguous(), both[:, 3:].contiguous()
        else:
            x = random_crop_flip(x, s.crop_padding, s.flip, g)
        y = labels.to(s.device)
        soft = None
        if self.defense.name == "cutout":
            x = cutout(x, self.cut, g)
        elif self.defense.name == "mixup":
            x, soft, _ = mixup(x, y, self.num_classes, s.mixup_alpha, g)
        elif self.defense.name == "adv-train":
            x = pgd_attack(self.model, x, y, epsilon=s.adv_epsilon, step=s.adv_step, steps=s.adv_steps, generator=g)
        logits = self.model(x)
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x) if view is None else self.teacher(x, view=view)
            loss = distillation(logits, target, self.temperature)
        else:
            loss = F.cross_entropy(logits, soft if soft is not None else y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach().item() * y.shape[0], int((logits.argmax(1) == y).sum()), y.shape[0]


def _results(s: TrainSettings, defense: Defense, per_epoch: list[dict[str, Any]], cm: torch.Tensor,
             started: float) -> dict[str, Any]:
    """What :func:`fit_classifier` returns besides the model."""
    accs = [r["test_acc"] for r in per_epoch]
    best = max(range(len(accs)), key=lambda i: accs[i])
    return {
        "settings": {**asdict(s), "defense": defense.spec},
        "per_epoch": per_epoch,
        "final_test_acc": accs[-1],
        "best_test_acc": accs[best],
        "best_epoch": best + 1,
        "confusion": cm.tolist(),
        "per_class_acc": per_class_accuracy(cm),
        "seconds": time.perf_counter() - started,
    }
