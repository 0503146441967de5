"""Method artifacts: a directory with ``config.json`` and safetensors weights.

Loading never unpickles: weights are read with safetensors, configuration with json. An
artifact is untrusted input when it is loaded: its config is checked against the method's
schema (:func:`check_config`), its weights must be finite. Every file is written owner-only
(mode 0600, created so), since an artifact may hold a secret (UGE's key) or the owner's
networks, and atomically (a temporary name, then a rename; ``config.json`` last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from uge_protect import __version__
from uge_protect.atomic import atomic_open
from uge_protect.errors import UserError

CONFIG_NAME = "config.json"
#: Mode of every artifact file: readable by its owner only.
FILE_MODE = 0o600
#: Names of weight groups (each is a file ``<group>.safetensors`` next to the config).
_GROUP = re.compile(r"[A-Za-z0-9_-]+")


def write_private(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically,
    the file created with mode 0600 (never wider, whatever the umask)."""
    with atomic_open(path, mode=FILE_MODE) as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            data(f)


def non_finite_weight(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor of ``state`` holding a NaN or an Inf, or None."""
    for name, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def save_artifact(
    directory: str | os.PathLike,
    config: dict[str, Any],
    weights: dict[str, dict[str, torch.Tensor]],
) -> Path:
    """Write ``config`` (must contain ``method``) and named weight groups to ``directory``.

    ``weights`` maps a group name (e.g. ``"generator"``) to a state dict; each group is
    saved as ``<group>.safetensors``. Every file is created with mode 0600 and renamed into
    place; the config is written last. A non-finite weight (a diverged fit) is a
    :class:`UserError` and nothing is written. Returns the directory path.
    """
    if "method" not in config:
        raise ValueError("artifact config must name its 'method'")
    bad = [g for g in weights if not _GROUP.fullmatch(g)]
    if bad:
        raise ValueError(f"weight group names must be letters, digits, '_' or '-': {bad}")
    for group, state in weights.items():
        name = non_finite_weight(state)
        if name is not None:
            raise UserError(f"the fit diverged: weight {name!r} of group {group!r} is not finite (NaN or Inf); "
                            "nothing was saved: refit with a lower learning rate or another seed")
    out = Path(directory)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    full = {**config, "package_version": __version__, "weights": sorted(weights)}
    for group, state in weights.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        write_private(out / f"{group}.safetensors", safetensors_bytes(tensors))
    write_private(out / CONFIG_NAME, json.dumps(full, indent=2, sort_keys=True).encode("utf-8"))
    return out


def read_artifact_config(directory: str | os.PathLike, expected_method: str | None = None) -> dict[str, Any]:
    """An artifact's ``config.json`` (which names its method); :class:`UserError` when unusable."""
    path = Path(directory)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise UserError(f"artifact directory not found: {path}")
    if not cfg_path.is_file():
        raise UserError(f"not an artifact (no {CONFIG_NAME}): {path}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"artifact config is unreadable: {cfg_path} ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"artifact config is not valid JSON: {cfg_path} ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise UserError(f"artifact config does not name a method: {cfg_path}")
    groups = config.get("weights", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and _GROUP.fullmatch(g) for g in groups):
        raise UserError(f"artifact config's 'weights' must be a list of weight group names: {cfg_path}")
    if expected_method is not None and config["method"] != expected_method:
        raise UserError(
            f"artifact {path} was made by method {config['method']!r}, not {expected_method!r}"
        )
    return config


def load_artifact(
    directory: str | os.PathLike, expected_method: str | None = None,
    check: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read an artifact; raises :class:`UserError` with a clear message when it is unusable.

    ``check`` (e.g. a :func:`check_config` call) vets the config before any weight is read."""
    path = Path(directory)
    config = read_artifact_config(path, expected_method)
    if check is not None:
        check(config)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for group in config.get("weights", []):
        file = path / f"{group}.safetensors"
        if not file.is_file():
            raise UserError(f"artifact is missing its weights file: {file}")
        try:
            weights[group] = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types by version
            raise UserError(f"artifact weights are unreadable: {file} ({exc})") from exc
        name = non_finite_weight(weights[group])
        if name is not None:
            raise UserError(f"artifact weight {name!r} in {file} is not finite (NaN or Inf): the fit that made it "
                            "diverged; refit it")
    return config, weights


def artifact_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 over the artifact's config and weight files (names and bytes), hex."""
    path = Path(directory)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(file.name.encode("utf-8") + b"\x00")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_fitted_epsilon(path: str | os.PathLike, config: dict[str, Any], epsilon: float | None) -> None:
    """Refuse a requested ``epsilon`` other than the artifact's fitted one (a :class:`UserError`).

    ``None`` and the CLI's default 8/255 asked of an artifact fitted with a tighter budget are
    accepted: the fitted budget is authoritative."""
    fitted = float(config["epsilon"])
    if epsilon is None or abs(float(epsilon) - fitted) <= 1e-9:
        return
    if abs(float(epsilon) - 8 / 255) <= 1e-9 and fitted < 8 / 255:
        return
    raise UserError(f"artifact {path} was fitted with epsilon {fitted:.6g}, not {float(epsilon):.6g}; "
                    "pass the artifact's epsilon (or refit with the one you want)")


# --------------------------------------------------------------------------- config schema


def _describe(tp: Any) -> str:
    """A JSON type annotation in words, for messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "null", dict: "an object", list: "a list", typing.Any: "any value"}
    if tp in names:
        return names[tp]
    if origin is dict:
        return "an object"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return repr(tp)


def json_type_matches(value: Any, tp: Any) -> bool:
    """Whether a JSON ``value`` has the type annotation ``tp``: bool is a real JSON bool, int
    is not a bool (and fits in 64 bits), float accepts a (finite) int or float, unions,
    ``list[X]``/``tuple[X, ...]`` (JSON lists), ``dict[K, V]``, None and Any."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(json_type_matches(value, a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 2**63
                and math.isfinite(value))
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict:
        return isinstance(value, dict) and (not args or all(
            json_type_matches(k, args[0]) and json_type_matches(v, args[1]) for k, v in value.items()))
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(json_type_matches(v, a) for v, a in zip(value, args))
        return not args or all(json_type_matches(v, args[0]) for v in value)
    raise TypeError(f"unsupported schema annotation {tp!r}")


def check_config(path: str | os.PathLike, config: Mapping[str, Any], schema: type, *,
                 required: Iterable[str] = (), legacy: Mapping[str, Any] | None = None) -> Any:
    """Check an artifact's ``config`` against the dataclass ``schema``; returns its instance.

    Every field of ``schema`` present in ``config`` must have its annotated JSON type
    (:func:`json_type_matches`); every name in ``required`` must be present. An absent field
    takes its value from ``legacy`` (what the loader assumes for artifacts older than the
    field) or the dataclass default. The instance's ``validate()`` then checks the ranges.
    Fields the schema does not name are ignored (never read). Any problem is one
    :class:`UserError` naming the artifact and the field.
    """
    where = f"artifact config {Path(path) / CONFIG_NAME}"
    legacy = legacy or {}
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    missing = [name for name in required if name not in config]
    for field in dataclasses.fields(schema):
        name, tp = field.name, hints[field.name]
        if name in config:
            if not json_type_matches(config[name], tp):
                shown = json.dumps(config[name])
                raise UserError(f"{where}: {name!r} must be {_describe(tp)}, got "
                                f"{shown if len(shown) <= 40 else shown[:37] + '...'}; refit the artifact or fix the field")
            kwargs[name] = config[name]
        elif name in legacy:
            kwargs[name] = legacy[name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            missing.append(name)
    if missing:
        raise UserError(f"{where} lacks {', '.join(repr(m) for m in dict.fromkeys(missing))}; refit the artifact")
    try:
        instance = schema(**kwargs)
        validate = getattr(instance, "validate", None)
        if validate is not None:
            validate()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return instance


def check_fit_size(fit_size: list[int] | None) -> None:
    """A :class:`UserError` unless ``fit_size`` is None or [height, width], both >= 1."""
    if fit_size is not None and (len(fit_size) != 2 or min(fit_size) < 1):
        raise UserError(f"fit_size must be [height, width] of at least 1 pixel, got {fit_size}")


@dataclasses.dataclass
class FitRecord:
    """What every fit records about itself in its artifact's ``config.json``, beside its options
    (the fields an artifact schema of :func:`check_config` inherits)."""

    #: The networks δ was fitted against (written by the fit, for readers; loaders derive it).
    fit_architectures: list[str] | None = None
    #: [height, width] of the training images (see :func:`check_fit_size`).
    fit_size: list[int] | None = None
    n_train: int | None = None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Keep huggingface_hub (and transformers and timm, which use it) offline for the duration:
    a second guard, behind the config checks, that building a method from an artifact fetches
    nothing. The setting is process-wide, so it is restored on exit."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - open_clip depends on it
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def loading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Build a method from an artifact's (checked) config and weights with the Hub offline
    (:func:`hub_offline`), turning any error raised meanwhile into one :class:`UserError`
    naming the artifact: the artifact is untrusted input."""
    try:
        with hub_offline():
            yield
    except UserError:
        raise
    except Exception as exc:  # whatever torch, open_clip, timm or transformers raise for a hostile config
        lines = [line for line in str(exc).splitlines() if line.strip()]
        detail = "".join(c if c.isprintable() else "?" for c in (lines[0] if lines else type(exc).__name__))
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise UserError(f"{what} artifact {path} does not load ({type(exc).__name__}: {detail}); "
                        "refit it or fix its config.json") from exc
