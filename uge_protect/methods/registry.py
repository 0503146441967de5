"""The registry of protection methods, by name."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from uge_protect.errors import UserError
from uge_protect.methods.base import ProtectionMethod
from uge_protect.methods.em.method import ErrorMinimizing, em_fit_needs, fit_em_from_options
from uge_protect.methods.random_noise import PassThrough, RandomNoise
from uge_protect.methods.t2ue.method import TextToUnlearnable, fit_t2ue_from_options
from uge_protect.methods.uge.method import Ungeneralizable, fit_uge_from_options

_METHODS: dict[str, type[ProtectionMethod]] = {}


def register_method(cls: type[ProtectionMethod]) -> type[ProtectionMethod]:
    """Register a method class under its ``name`` (usable as a decorator)."""
    _METHODS[cls.name] = cls
    return cls


for _cls in (RandomNoise, PassThrough, ErrorMinimizing, TextToUnlearnable, Ungeneralizable):
    register_method(_cls)

#: A fitter takes uint8 images (N, 3, H, W), int64 labels (N,), captions (N,), an options
#: dict and an optional progress callback, and returns ``(config, weights)`` for
#: ``save_artifact``.
Fitter = Callable[..., tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]
#: What a fit needs of every training sample, given its options: "labels" or "captions".
Needs = Callable[[dict[str, Any]], str]

_FITTERS: dict[str, tuple[Fitter, Needs, bool]] = {}


def register_fitter(name: str, fitter: Fitter, needs: Needs = lambda options: "labels",
                    checkpoints: bool = False) -> Fitter:
    """Register the fit function of method ``name`` (used by ``uge-protect fit NAME``).

    ``checkpoints``: the fitter also takes ``state``, ``checkpoint``, ``checkpoint_every``,
    ``rank`` and ``world`` keywords (resumable, multi-process fits)."""
    _FITTERS[name] = (fitter, needs, checkpoints)
    return fitter


register_fitter("em", fit_em_from_options, em_fit_needs)
register_fitter("t2ue", fit_t2ue_from_options, lambda options: "captions", checkpoints=True)
register_fitter("uge", fit_uge_from_options, checkpoints=True)


def get_fitter(name: str) -> Fitter:
    """The fit function of method ``name``; :class:`UserError` when it has none."""
    return _fitter_entry(name)[0]


def fit_needs(name: str, options: dict[str, Any]) -> str:
    """What fitting ``name`` with ``options`` needs of each sample: "labels" or "captions"."""
    return _fitter_entry(name)[1](options)


def fitter_supports_checkpoints(name: str) -> bool:
    """Whether ``fit NAME`` can checkpoint, resume and spread over processes."""
    return _fitter_entry(name)[2]


def _fitter_entry(name: str) -> tuple[Fitter, Needs, bool]:
    if name not in _FITTERS:
        raise UserError(f"method {name!r} cannot be fitted; fittable methods: {', '.join(sorted(_FITTERS))}")
    return _FITTERS[name]


def method_names(include_hidden: bool = False) -> list[str]:
    """Registered method names; hidden (benchmark-only) methods are left out by default."""
    return sorted(n for n, c in _METHODS.items() if include_hidden or not c.hidden)


def create_method(
    name: str, artifact: str | None = None, *, allow_hidden: bool = False, **options: Any
) -> ProtectionMethod:
    """Build a method by name, from an artifact directory when the method needs one."""
    cls = _METHODS.get(name)
    if cls is None or (cls.hidden and not allow_hidden):
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    from_artifact = getattr(cls, "from_artifact", None)
    if artifact is not None:
        if from_artifact is None:
            raise UserError(f"method {name!r} takes no --artifact")
        _check_options(name, from_artifact, options)
        return from_artifact(artifact, **options)
    if from_artifact is not None and getattr(cls, "needs_artifact", True):
        raise UserError(f"method {name!r} needs --artifact DIR (made by `uge-protect fit {name}`)")
    _check_options(name, cls, options)
    return cls(**options)


def _check_options(name: str, factory: Callable[..., Any] | None, options: dict[str, Any]) -> None:
    """A clear error for an option the method does not take (e.g. ``--mode`` for ``random``)."""
    if factory is None:
        return
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise UserError(f"method {name!r} takes no {flags}")
