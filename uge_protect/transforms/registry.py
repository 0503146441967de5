"""The registry of protection methods, by name."""

from __future__ import annotations

from typing import Any, Callable

import torch

from uge_protect.errors import UserError
from uge_protect.transforms.base import ProtectionMethod
from uge_protect.transforms.em import ErrorMinimizing, fit_em_from_options
from uge_protect.transforms.random_noise import PassThrough, RandomNoise

_METHODS: dict[str, type[ProtectionMethod]] = {}


def register_method(cls: type[ProtectionMethod]) -> type[ProtectionMethod]:
    """Register a method class under its ``name`` (usable as a decorator)."""
    _METHODS[cls.name] = cls
    return cls


for _cls in (RandomNoise, PassThrough, ErrorMinimizing):
    register_method(_cls)

#: A fitter takes uint8 images (N, 3, H, W), int64 labels (N,), an options dict and an
#: optional progress callback, and returns ``(config, weights)`` for ``save_artifact``.
Fitter = Callable[..., tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]]

_FITTERS: dict[str, Fitter] = {}


def register_fitter(name: str, fitter: Fitter) -> Fitter:
    """Register the fit function of method ``name`` (used by ``uge-protect fit NAME``)."""
    _FITTERS[name] = fitter
    return fitter


register_fitter("em", fit_em_from_options)


def get_fitter(name: str) -> Fitter:
    """The fit function of method ``name``; :class:`UserError` when it has none."""
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
        return from_artifact(artifact, **options)
    if from_artifact is not None and getattr(cls, "needs_artifact", True):
        raise UserError(f"method {name!r} needs --artifact DIR (made by `uge-protect fit {name}`)")
    return cls(**options)
