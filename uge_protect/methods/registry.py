"""The registry of protection methods: one typed entry per method, by name.

An entry is everything the pipeline and evaluation may know of a method: its class, its fit
config class, its fit function, its artifact loader, what a fit needs of each sample,
whether the fit checkpoints, and optional hooks (the models an artifact's owner is
authorized to train). ``pipeline/`` and ``eval/`` reach a method only through its entry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from uge_protect.errors import UserError
from uge_protect.methods.artifact import read_artifact_config
from uge_protect.methods.base import AuthorizedModel, FitContext, ProtectionMethod
from uge_protect.methods.em.config import EMConfig
from uge_protect.methods.em.fit import em_fit_needs, fit_em_from_options
from uge_protect.methods.em.method import ErrorMinimizing, em_from_artifact
from uge_protect.methods.fitting import FitResult
from uge_protect.methods.random_noise import PassThrough, RandomNoise
from uge_protect.methods.t2ue.config import T2UEApplyOptions, T2UEConfig
from uge_protect.methods.t2ue.fit import fit_t2ue_from_options
from uge_protect.methods.t2ue.method import TextToUnlearnable
from uge_protect.methods.uge import attacks as uge_attacks
from uge_protect.methods.uge import authorized as uge_authorized
from uge_protect.methods.uge.config import UGEConfig
from uge_protect.methods.uge.fit import fit_uge_from_options
from uge_protect.methods.uge.method import Ungeneralizable

class Fitter(Protocol):
    """A fit: uint8 images (N, 3, H, W), int64 labels (N,, -1 where absent), captions (N,),
    an options dict (None values mean "default") and the :class:`FitContext`; returns
    ``(config, weights)`` for ``save_artifact``."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, captions: list[str | None],
                 options: dict[str, Any], ctx: FitContext | None = None) -> FitResult: ...


#: What a fit needs of every training sample, given its options: "labels" or "captions".
Needs = Callable[[dict[str, Any]], str]
#: The extra evaluation rows of an artifact: (artifact, other keys, students to distil, gate).
AuthorizedModels = Callable[[str, list[int], list[str], bool], list[AuthorizedModel]]
#: What a report says of those rows: (artifact, gate) → a JSON-ready summary.
AuthorizedSummary = Callable[[str, bool], dict[str, Any]]
#: The rows of an attacker who knows the method but holds no artifact: (the protection's
#: public method record, hacker architectures, protected training images and labels, the
#: attacker's small clean set and its labels; images uint8) → rows with a front layer.
AttackerModels = Callable[[dict[str, Any], list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                          list[AuthorizedModel]]


def _labels(options: dict[str, Any]) -> str:
    return "labels"


@dataclass(frozen=True)
class MethodEntry:
    """One registered method."""

    name: str
    method: type[ProtectionMethod]
    #: The dataclass of the fit's options (None: nothing to fit).
    config: type | None = None
    fit: Fitter | None = None
    #: Builds the method from an artifact directory (and apply options); None: the method
    #: takes no artifact and is built from its class.
    from_artifact: Callable[..., ProtectionMethod] | None = None
    needs: Needs = _labels
    #: The fit takes ``FitContext.state``/``checkpoint`` (resumable) and shares batches
    #: over the processes of a launch.
    checkpoints: bool = False
    authorized_models: AuthorizedModels | None = None
    authorized_summary: AuthorizedSummary | None = None
    #: The dataclass of the method's own ``shard`` options (None: it has none).
    apply_options: type | None = None
    attacker_models: AttackerModels | None = None


_METHODS: dict[str, MethodEntry] = {}


def apply_option_sources() -> list[tuple[type, str]]:
    """Each method's own ``shard`` options dataclass with the method's name, in registry order."""
    return [(e.apply_options, e.name) for e in _METHODS.values() if e.apply_options is not None]


def register_method(entry: MethodEntry) -> MethodEntry:
    """Register ``entry`` under its name (replacing any entry of that name)."""
    _METHODS[entry.name] = entry
    return entry


for _entry in (
    MethodEntry(RandomNoise.name, RandomNoise),
    MethodEntry(PassThrough.name, PassThrough),
    MethodEntry("em", ErrorMinimizing, EMConfig, fit_em_from_options, em_from_artifact, em_fit_needs),
    MethodEntry("t2ue", TextToUnlearnable, T2UEConfig, fit_t2ue_from_options, TextToUnlearnable.from_artifact,
                lambda options: "captions", checkpoints=True, apply_options=T2UEApplyOptions),
    MethodEntry("uge", Ungeneralizable, UGEConfig, fit_uge_from_options, Ungeneralizable.from_artifact,
                checkpoints=True, authorized_models=uge_authorized.authorized_models,
                authorized_summary=uge_authorized.authorized_summary, attacker_models=uge_attacks.attacker_models),
):
    register_method(_entry)


def method_entry(name: str) -> MethodEntry:
    """The entry of method ``name``; :class:`UserError` when there is none."""
    entry = _METHODS.get(name)
    if entry is None:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    return entry


def _fit_entry(name: str) -> MethodEntry:
    entry = _METHODS.get(name)
    if entry is None or entry.fit is None:
        fittable = sorted(n for n, e in _METHODS.items() if e.fit is not None)
        raise UserError(f"method {name!r} cannot be fitted; fittable methods: {', '.join(fittable)}")
    return entry


def get_fitter(name: str) -> Fitter:
    """The fit function of method ``name``; :class:`UserError` when it has none."""
    fit = _fit_entry(name).fit
    assert fit is not None
    return fit


def fit_needs(name: str, options: dict[str, Any]) -> str:
    """What fitting ``name`` with ``options`` needs of each sample: "labels" or "captions"."""
    return _fit_entry(name).needs(options)


def fitter_supports_checkpoints(name: str) -> bool:
    """Whether ``fit NAME`` can checkpoint, resume and spread over processes."""
    return _fit_entry(name).checkpoints


def method_names(include_hidden: bool = False) -> list[str]:
    """Registered method names; hidden (benchmark-only) methods are left out by default."""
    return sorted(n for n, e in _METHODS.items() if include_hidden or not e.method.hidden)


def create_method(
    name: str, artifact: str | None = None, *, allow_hidden: bool = False, **options: Any
) -> ProtectionMethod:
    """Build a method by name, from an artifact directory when the method needs one."""
    entry = _METHODS.get(name)
    if entry is None or (entry.method.hidden and not allow_hidden):
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    if artifact is not None:
        if entry.from_artifact is None:
            raise UserError(f"method {name!r} takes no --artifact")
        _check_options(name, entry.from_artifact, options)
        return entry.from_artifact(artifact, **options)
    if entry.from_artifact is not None:
        raise UserError(f"method {name!r} needs --artifact DIR (made by `uge-protect fit {name}`)")
    _check_options(name, entry.method, options)
    return entry.method(**options)


def _authorized_entry(artifact: str) -> MethodEntry:
    """The entry of the method that made ``artifact``, which must have authorized models."""
    method = read_artifact_config(artifact)["method"]
    entry = _METHODS.get(method)
    if entry is None or entry.authorized_models is None or entry.authorized_summary is None:
        able = sorted(n for n, e in _METHODS.items() if e.authorized_models is not None)
        raise UserError(f"artifact {artifact} was made by method {method!r}, which has no authorized models; "
                        f"--authorized takes an artifact of: {', '.join(able)}")
    return entry


def authorized_models(artifact: str, other_keys: list[int], distill: list[str], gate: bool = True
                      ) -> list[AuthorizedModel]:
    """The models the owner of ``artifact`` is authorized to train, with the ``other_keys``
    and ``distill`` rows around them (see the method's hook)."""
    hook = _authorized_entry(artifact).authorized_models
    assert hook is not None
    return hook(artifact, list(other_keys), list(distill), gate)


def authorized_summary(artifact: str, gate: bool = True) -> dict[str, Any]:
    """What a report says of the authorized models of ``artifact`` (no secret)."""
    hook = _authorized_entry(artifact).authorized_summary
    assert hook is not None
    return hook(artifact, gate)


def attacker_models(record: dict[str, Any], archs: list[str], protected: torch.Tensor, protected_labels: torch.Tensor,
                    clean: torch.Tensor, clean_labels: torch.Tensor) -> list[AuthorizedModel]:
    """The rows of an attacker who knows the method of a protection (its ``protection.json``
    method record) but not its artifact: every strategy of the method's hook, in front of
    each of ``archs``; a :class:`UserError` for a method that has none."""
    name = record.get("method") if isinstance(record, dict) else None
    entry = _METHODS.get(name) if isinstance(name, str) else None
    if entry is None or entry.attacker_models is None:
        shown = repr(name) if isinstance(name, str) and name.isprintable() and len(name) < 40 else "(not recorded)"
        raise UserError(f"the protection's method {shown} has no method-aware attacker; leave --method-aware out")
    return entry.attacker_models(record, list(archs), protected, protected_labels, clean, clean_labels)


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
