"""Method artifacts: a directory with ``config.json`` and safetensors weights.

Loading never unpickles: weights are read with safetensors, configuration with json.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from uge_protect import __version__
from uge_protect.errors import UserError

CONFIG_NAME = "config.json"


def save_artifact(
    directory: str | os.PathLike,
    config: dict[str, Any],
    weights: dict[str, dict[str, torch.Tensor]],
) -> Path:
    """Write ``config`` (must contain ``method``) and named weight groups to ``directory``.

    ``weights`` maps a group name (e.g. ``"generator"``) to a state dict; each group is
    saved as ``<group>.safetensors``. Returns the directory path.
    """
    if "method" not in config:
        raise ValueError("artifact config must name its 'method'")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    full = {**config, "package_version": __version__, "weights": sorted(weights)}
    for group, state in weights.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(out / f"{group}.safetensors"))
    tmp = out / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out / CONFIG_NAME)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"artifact config is not valid JSON: {cfg_path} ({exc})") from exc
    if not isinstance(config, dict) or "method" not in config:
        raise UserError(f"artifact config does not name a method: {cfg_path}")
    if expected_method is not None and config["method"] != expected_method:
        raise UserError(
            f"artifact {path} was made by method {config['method']!r}, not {expected_method!r}"
        )
    return config


def load_artifact(
    directory: str | os.PathLike, expected_method: str | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Read an artifact; raises :class:`UserError` with a clear message when it is unusable."""
    path = Path(directory)
    config = read_artifact_config(path, expected_method)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for group in config.get("weights", []):
        file = path / f"{group}.safetensors"
        if not file.is_file():
            raise UserError(f"artifact is missing its weights file: {file}")
        try:
            weights[group] = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types by version
            raise UserError(f"artifact weights are unreadable: {file} ({exc})") from exc
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
