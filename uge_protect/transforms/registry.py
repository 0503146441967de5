"""The registry of protection methods, by name."""

from __future__ import annotations

from typing import Any

from uge_protect.errors import UserError
from uge_protect.transforms.base import ProtectionMethod
from uge_protect.transforms.random_noise import PassThrough, RandomNoise

_METHODS: dict[str, type[ProtectionMethod]] = {}


def register_method(cls: type[ProtectionMethod]) -> type[ProtectionMethod]:
    """Register a method class under its ``name`` (usable as a decorator)."""
    _METHODS[cls.name] = cls
    return cls


for _cls in (RandomNoise, PassThrough):
    register_method(_cls)


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
