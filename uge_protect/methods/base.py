"""The method contract: what every protection method provides to the pipeline.

A method is fitted once (``fit``, method-specific, writing an artifact directory) and then
applied as a pure function of (artifact, batch) → perturbation. The pipeline never looks
inside a method: it hands over a :class:`ProtectBatch` and enforces the budget on the result.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from uge_protect.methods.budget import check_epsilon
from uge_protect.models.classifiers import build_classifier
from uge_protect.models.training import pick_device

#: What a fit reports its progress to: one event dict at a time (``step``/``steps`` or
#: ``round``/``max_rounds``, losses, ``seconds``; or a free-form ``message``).
Progress = Callable[[dict[str, Any]], None]

#: Methods that run a network at apply do so on chunks of exactly this many samples
#: (zero-padded): the kernels, and so every float of a sample's δ, never depend on how many
#: samples the pipeline happened to put in a batch.
APPLY_CHUNK = 64


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from the run seed and a sample key (stable across runs/processes)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def clip_arch_id(model_config: str | dict[str, Any]) -> str:
    """The name of a CLIP architecture in fit and evaluation records, by its image tower's
    family (what sees the noise), whatever its width, as a classifier counts as its
    architecture at any width: ``clip:NAME`` for an open_clip model name, ``clip:vit-pP-lL``
    for a ViT tower (patch P, L layers), ``clip:resnet-A-B-C-D`` for a modified-ResNet tower,
    else ``clip:vision-`` and a digest of the tower's config."""
    if isinstance(model_config, str):
        return f"clip:{model_config}"
    vision = model_config.get("vision_cfg")
    if isinstance(vision, dict):
        layers = vision.get("layers")
        if isinstance(layers, int) and not vision.get("timm_model_name"):
            return f"clip:vit-p{vision.get('patch_size', 16)}-l{layers}"
        if isinstance(layers, (list, tuple)) and all(isinstance(n, int) for n in layers):
            return "clip:resnet-" + "-".join(str(n) for n in layers)
    digest = hashlib.sha256(json.dumps(vision, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]
    return f"clip:vision-{digest}"


def given_options(config_cls: type, options: dict[str, Any], unknown_message: str) -> dict[str, Any]:
    """The options that are set (None means "default"), checked against the fields of the
    dataclass ``config_cls``; unknown ones raise ``UserError(unknown_message: names)``."""
    from uge_protect.errors import UserError

    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise UserError(f"{unknown_message}: {', '.join(unknown)}")
    return given


def in_fixed_chunks(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk: int = APPLY_CHUNK
                    ) -> torch.Tensor:
    """``fn`` on zero-padded chunks of exactly ``chunk`` rows of ``tensors`` (all of the same
    length); the outputs without their padding rows, concatenated."""
    n = len(tensors[0])
    outs = []
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        padded = []
        for t in tensors:
            p = torch.zeros((chunk, *t.shape[1:]), dtype=t.dtype, device=t.device)
            p[:k] = t[start:start + k]
            padded.append(p)
        outs.append(fn(*padded)[:k])
    return torch.cat(outs)


@dataclass
class ProtectBatch:
    """A batch of same-sized images and what a method may condition on.

    ``pixels`` is uint8, shape (B, 3, H, W), on the method's device, and read-only (it may
    share memory with the originals the run measures its output against); :attr:`images` gives
    the float32 [0, 1] version (computed on first use). ``seeds`` are per-sample seeds from
    :func:`sample_seed`; methods draw every random number of a sample from its own seed so
    results do not depend on batch composition.
    """

    pixels: torch.Tensor
    keys: list[str]
    seeds: list[int]
    captions: list[str | None]
    labels: list[int | None]

    @functools.cached_property
    def images(self) -> torch.Tensor:
        """Float32 images in [0, 1], contiguous (B, 3, H, W)."""
        return self.pixels.to(torch.float32).div_(255.0).contiguous()

    def __len__(self) -> int:
        return len(self.keys)


class ProtectionMethod(ABC):
    """Base class of protection methods.

    Subclasses set ``name`` and implement :meth:`perturb`. ``requires_caption`` /
    ``requires_label`` tell the pipeline to reject samples without them.
    """

    name: ClassVar[str]
    requires_caption: ClassVar[bool] = False
    requires_label: ClassVar[bool] = False
    #: Hidden methods are usable from Python (benchmarks) but never offered by the CLI.
    hidden: ClassVar[bool] = False
    #: δ depends on the caption, key, seed and image size only, never on the pixels: the
    #: noise can be made without the image (``uge-protect noise``).
    text_only: ClassVar[bool] = False
    #: The method changes every image it writes (all but the hidden pass-through benchmark
    #: control): its budget must be at least one uint8 level, and the pipeline refuses to
    #: write a sample that comes back unchanged (``no_perturbation``).
    perturbs: ClassVar[bool] = True

    def __init__(self, epsilon: float = 8 / 255):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if self.perturbs:
            check_epsilon(epsilon)
        self.epsilon = float(epsilon)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "ProtectionMethod":
        """Move the method's tensors to ``device``; returns self."""
        self.device = torch.device(device)
        return self

    def config(self) -> dict[str, Any]:
        """Public parameters, recorded in ``protection.json`` (never secrets)."""
        return {"method": self.name, "epsilon": self.epsilon, "fit_architectures": self.fit_architectures()}

    def fit_architectures(self) -> list[str]:
        """The networks δ was fitted against (surrogates, students, feature networks), named as
        ``eval`` names its rows: classifier architectures by name, a CLIP by :func:`clip_arch_id`.
        ``eval`` marks a row of one of these "seen in fit" and judges protection on the others.
        Empty for a method fitted against no network."""
        return []

    def fingerprint(self) -> str | None:
        """A fingerprint of the artifact the method was loaded from, if any."""
        return None

    @abstractmethod
    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        """Return δ with the shape of ``batch.pixels``.

        A floating-point δ is in [0, 1] image units; an integer δ is in uint8 levels. The
        pipeline quantizes δ, clips it to the budget and adds it in uint8 space, so a method
        may return values slightly outside ±epsilon. Per-sample randomness must come from
        ``batch.seeds``, never from other samples of the batch.
        """


class FittedMethod(ProtectionMethod):
    """A method applied from a fitted artifact: its ε, config and fingerprint come from it."""

    def __init__(self, config: dict[str, Any], fingerprint: str | None = None):
        super().__init__(epsilon=float(config["epsilon"]))
        self._config = dict(config)
        self._fingerprint = fingerprint

    def fingerprint(self) -> str | None:
        return self._fingerprint

    def public_config(self, keep: tuple[str, ...], **extra: Any) -> dict[str, Any]:
        """:meth:`config`: the base fields, the artifact's ``keep`` fields (public ones only),
        then ``extra``."""
        return {**ProtectionMethod.config(self), **{k: self._config.get(k) for k in keep}, **extra}


@dataclass(frozen=True)
class FitContext:
    """Where and how a fit runs, handed to every fitter by the pipeline.

    ``rank``/``world``: this process among the processes of a launch (process group already
    joined); each takes every ``world``-th sample of a batch. ``device`` overrides a config's
    ``auto`` device (the process's own accelerator under a launch); None leaves it to the
    config. ``state`` resumes from an earlier ``checkpoint`` call; ``checkpoint`` (the main
    process only) receives the full training state every ``checkpoint_every`` steps (0:
    never). Fitters that cannot checkpoint ignore both and run the same in every process.
    """

    rank: int = 0
    world: int = 1
    device: str | None = None
    state: dict[str, Any] | None = None
    checkpoint: Callable[[dict[str, Any]], None] | None = None
    checkpoint_every: int = 0
    progress: Progress | None = None

    def report(self, event: dict[str, Any]) -> None:
        """Hand ``event`` to the progress callback, if any."""
        if self.progress is not None:
            self.progress(event)

    def pick_device(self, name: str) -> torch.device:
        """The device a fit runs on, for its config's device option ``name``."""
        return torch.device(self.device) if name == "auto" and self.device else pick_device(name)

    def checkpoint_due(self, step: int, total: int) -> bool:
        """Whether a checkpoint is due after ``step`` of ``total`` (never after the last)."""
        return bool(self.checkpoint_every) and step % self.checkpoint_every == 0 and step < total


@dataclass(frozen=True)
class AuthorizedModel:
    """A model row that an artifact adds to an evaluation (e.g. the owner's authorized network).

    ``build(num_classes)`` makes a fresh model (None: the plain architecture ``arch``, seeded
    by the run); ``tag`` identifies the model beyond its label in the run cache (never a
    secret); ``teach_tag`` is what the model adds to the tag of a student distilled from it
    (a part that changes no training run of its own but what it teaches); ``teacher`` is the
    model a row is distilled from (no labels).
    """

    label: str
    arch: str
    build: Callable[[int], torch.nn.Module] | None = field(default=None, compare=False)
    tag: str = ""
    teach_tag: str = ""
    teacher: "AuthorizedModel | None" = None
    #: The authorized network trained with the artifact's own key (the owner's row).
    owner: bool = False
    #: The authorized architecture behind another key (a hacker who knows the architecture).
    other_key: bool = False
    #: A layer an attacker who knows the method puts in front of the plain architecture
    #: (seeded by the run); None: none.
    front: Callable[[], torch.nn.Module] | None = field(default=None, compare=False)
    #: Rows of one attacker strategy that tries several fronts (e.g. every key it can
    #: enumerate); the attacker keeps the one that scores best on its small clean set.
    group: str | None = None
    #: A transform of whole uint8 images (N, 3, H, W) → uint8 that the row's model trains and
    #: is tested on, applied before any crop or flip (e.g. a key projection of image blocks).
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)

    @property
    def attacker(self) -> bool:
        """Whether the row is a method-aware attacker's (a front layer in front of ``arch``, or
        a transform of its images that is neither the owner's nor another key's)."""
        return self.front is not None or (self.transform is not None and not (self.owner or self.other_key))

    def factory(self, num_classes: int, seed: int = 0) -> Callable[[], torch.nn.Module] | None:
        """What builds the model (None: the plain architecture, seeded by the run); a
        ``front`` row is that front before the architecture seeded with ``seed``."""
        if self.front is not None:
            front, arch = self.front, self.arch

            def build_front() -> torch.nn.Module:
                return torch.nn.Sequential(front(), build_classifier(arch, num_classes, seed=seed))
            return build_front
        if self.build is None:
            return None
        build = self.build
        return lambda: build(num_classes)

    def cache_tag(self) -> str:
        """What identifies the model beyond its label, for the run cache (no secret)."""
        tag = self.tag
        if self.teacher is not None:
            teach = f":{self.teacher.teach_tag}" if self.teacher.teach_tag else ""
            tag += f"<-{self.teacher.cache_tag()}{teach}"
        return tag
