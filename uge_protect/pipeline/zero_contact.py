"""Zero-contact protection: noise from text alone, applied on the image owner's device.

``make_noise`` turns a caption into a noise file with a text-only method (T2UE): a PNG whose
pixels are ``128 + δ`` in uint8 levels, with the settings in a PNG text chunk.
``apply_noise`` adds such a file to an image. The image never has to leave its owner's
device, and the result equals what ``uge-protect shard`` writes for the same caption, key,
seed and image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from uge_protect.errors import UserError
from uge_protect.shards.decode import DecodeError, decode_image
from uge_protect.transforms.artifact import read_artifact_config
from uge_protect.transforms.base import ProtectBatch, sample_seed
from uge_protect.transforms.budget import apply_perturbation, budget_levels, delta_levels
from uge_protect.transforms.registry import create_method

OFFSET = 128
META_KEY = "uge-protect-noise"


def noise_levels(artifact: str, text: str, size: tuple[int, int], *, key: str | None = None, seed: int = 0
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """δ in uint8 levels, (H, W, 3) int16, for ``text`` at ``size`` (H, W), and its settings.

    The sample's seed comes from ``key`` (default: the text itself) and ``seed`` exactly as in
    ``shard``, so the same caption, key and seed give the noise ``shard`` adds.
    """
    h, w = size
    if h < 1 or w < 1:
        raise UserError(f"noise size must be positive, got {h}x{w}")
    if not text:
        raise UserError("give the caption with --text")
    method = read_artifact_config(artifact)["method"]
    protector = create_method(method, artifact)
    if not protector.text_only or not protector.requires_caption:
        raise UserError(f"method {method!r} does not make noise from text alone")
    key = text if key is None else key
    batch = ProtectBatch(torch.zeros((1, 3, h, w), dtype=torch.uint8), [key], [sample_seed(seed, key)], [text], [None])
    with torch.no_grad():
        delta = protector.perturb(batch)
    q = budget_levels(protector.epsilon)
    levels = delta_levels(delta, protector.epsilon)[0]
    meta = {"method": method, "epsilon": protector.epsilon, "budget_levels": q, "key": key, "seed": seed,
            "text": text, "size": [h, w], "artifact_fingerprint": protector.fingerprint()}
    return levels.permute(1, 2, 0).numpy(), meta


def make_noise(artifact: str, text: str, size: tuple[int, int], output: str | Path, *, key: str | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Write the noise for ``text`` to a PNG file (pixels ``128 + δ``); returns its settings."""
    levels, meta = noise_levels(artifact, text, size, key=key, seed=seed)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(META_KEY, json.dumps(meta, ensure_ascii=False))
    out = Path(output)
    try:
        Image.fromarray((levels + OFFSET).astype(np.uint8), "RGB").save(out, format="PNG", pnginfo=info)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return meta


def read_noise(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A noise file's δ in levels (H, W, 3) int16 and its settings; :class:`UserError` if it is not one."""
    try:
        with Image.open(path) as im:
            meta_text = im.info.get(META_KEY)
            pixels = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read noise file {path}: {exc}") from None
    if meta_text is None:
        raise UserError(f"{path} is not a noise file made by `uge-protect noise`")
    meta = json.loads(meta_text)
    levels = pixels.astype(np.int16) - OFFSET
    q = int(meta.get("budget_levels", 0))
    if np.abs(levels).max(initial=0) > q:
        raise UserError(f"noise file {path} exceeds its own budget of {q} levels; it was altered")
    return levels, meta


def apply_noise(image: str | Path, noise: str | Path, output: str | Path) -> dict[str, Any]:
    """Add a noise file to an image (decoded as ``shard`` decodes it) and write a PNG."""
    levels, meta = read_noise(noise)
    try:
        data = Path(image).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read image {image}: {exc.strerror or exc}") from None
    try:
        decoded = decode_image(data)
    except DecodeError as exc:
        raise UserError(f"cannot decode image {image}: {exc}") from None
    pixels = decoded.pixels
    if pixels.shape[:2] != levels.shape[:2]:
        h, w = pixels.shape[:2]
        raise UserError(f"the noise is {levels.shape[0]}x{levels.shape[1]} but the image is {h}x{w}; "
                        f"make the noise with --size {h} {w}")
    protected = apply_perturbation(torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(levels),
                                   float(meta["epsilon"])).numpy()
    try:
        Image.fromarray(protected, "RGB").save(output, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
    return {**meta, "image": str(image), "output": str(output)}
