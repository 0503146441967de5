"""Zero-contact protection: noise from text alone, applied on the image owner's device.

``make_noise`` turns a caption into a noise file with a text-only method (T2UE): a PNG whose
pixels are ``128 + δ`` in uint8 levels, with the settings in a PNG text chunk.
``apply_noise`` adds such a file to an image. The image never has to leave its owner's
device, and the result equals what ``uge-protect shard`` writes for the same caption, key,
seed and image.
"""

from __future__ import annotations

import io
import json
import math
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from uge_protect.atomic import atomic_write
from uge_protect.errors import UserError
from uge_protect.shards.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from uge_protect.methods.artifact import read_artifact_config
from uge_protect.methods.base import ProtectBatch, sample_seed
from uge_protect.methods.budget import apply_perturbation, budget_levels, delta_levels
from uge_protect.methods.registry import create_method

OFFSET = 128
META_KEY = "uge-protect-noise"
#: Longest ``--text`` and ``--key`` (characters): far above any caption the tokenizers keep
#: (77 tokens), and the noise file's metadata stays under Pillow's 1 MiB text-chunk limit.
MAX_TEXT_CHARS = 16_384
#: Largest noise (height × width): the pixel limit ``shard`` decodes images under.
MAX_NOISE_PIXELS = DEFAULT_MAX_PIXELS


def _check_text(value: str, option: str) -> None:
    if len(value) > MAX_TEXT_CHARS:
        raise UserError(f"{option} is {len(value)} characters long; at most {MAX_TEXT_CHARS} are accepted")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{option} is not valid UTF-8 text") from None


def noise_levels(artifact: str, text: str, size: tuple[int, int], *, key: str | None = None, seed: int = 0
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """δ in uint8 levels, (H, W, 3) int16, for ``text`` at ``size`` (H, W), and its settings.

    The sample's seed comes from ``key`` (default: the text itself) and ``seed`` exactly as in
    ``shard``, so the same caption, key and seed give the noise ``shard`` adds. A noise that
    is zero everywhere (it would protect nothing) is a :class:`UserError`.
    """
    h, w = size
    if h < 1 or w < 1:
        raise UserError(f"noise size must be positive, got {h}x{w}")
    if h * w > MAX_NOISE_PIXELS:
        raise UserError(f"noise size {h}x{w} exceeds the {MAX_NOISE_PIXELS} pixels `shard` decodes images under")
    if not text:
        raise UserError("give the caption with --text")
    _check_text(text, "--text")
    if key is not None:
        _check_text(key, "--key")
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
    if not bool(levels.any()):
        raise UserError("the artifact made no noise for this caption (zero everywhere): it would leave the image "
                        "unprotected (no_perturbation); nothing was written")
    meta = {"method": method, "epsilon": protector.epsilon, "budget_levels": q, "key": key, "seed": seed,
            "text": text, "size": [h, w], "artifact_fingerprint": protector.fingerprint()}
    return levels.permute(1, 2, 0).numpy(), meta


def _write_png(pixels: np.ndarray, output: str | Path, pnginfo: PngImagePlugin.PngInfo | None = None) -> None:
    """Encode RGB ``pixels`` as PNG and put the file at ``output`` whole or not at all."""
    out = Path(output)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", pnginfo=pnginfo)
    try:
        atomic_write(out, buf.getvalue())
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def make_noise(artifact: str, text: str, size: tuple[int, int], output: str | Path, *, key: str | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Write the noise for ``text`` to a PNG file (pixels ``128 + δ``); returns its settings."""
    levels, meta = noise_levels(artifact, text, size, key=key, seed=seed)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(META_KEY, json.dumps(meta, ensure_ascii=False))
    _write_png((levels + OFFSET).astype(np.uint8), output, info)
    return meta


def _regular_file(path: str | Path, what: str) -> Path:
    """``path`` when it is a regular file (not a FIFO or device, which could block or never end)."""
    p = Path(path)
    try:
        regular = stat.S_ISREG(p.stat().st_mode)
    except OSError as exc:
        raise UserError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if not regular:
        raise UserError(f"{what} {p} is not a regular file")
    return p


def _noise_pixels(path: Path) -> tuple[np.ndarray, Any]:
    """The RGB pixels and metadata text of a noise PNG; only Pillow's PNG decoder runs, and the
    size is checked against :data:`MAX_NOISE_PIXELS` before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as im:
                w, h = im.size
                if w * h > MAX_NOISE_PIXELS:
                    raise UserError(f"noise file {path} is {w}x{h}, over the {MAX_NOISE_PIXELS}-pixel limit")
                if im.mode != "RGB":
                    raise UserError(f"noise file {path} is a {im.mode} PNG, not the RGB one `uge-protect noise` writes")
                im.load()
                return np.asarray(im), im.info.get(META_KEY)
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"noise file {path} is a decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        raise UserError(f"noise file {path} is not a PNG (only PNG noise files are read)") from None
    except Exception as exc:  # Pillow raises many types for damaged data
        raise UserError(f"cannot read noise file {path}: {type(exc).__name__}: {exc}") from None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_noise_meta(meta: Any, shape: tuple[int, int], where: str) -> dict[str, Any]:
    """A noise file's settings, checked: ``budget_levels`` an integer in [1, 255], ``epsilon``
    a number in (0, 1] that rounds to it, and the optional fields of their types (``size``
    the pixels' own). Anything else is a :class:`UserError` naming the field."""
    if not isinstance(meta, dict):
        raise UserError(f"{where}: its settings are not a JSON object")
    missing = [name for name in ("epsilon", "budget_levels") if name not in meta]
    if missing:
        raise UserError(f"{where}: its settings lack {' and '.join(repr(m) for m in missing)}")
    q, eps = meta["budget_levels"], meta["epsilon"]
    if not _int(q) or not 1 <= q <= 255:
        raise UserError(f"{where}: 'budget_levels' must be an integer from 1 to 255, got {_shown(q)}")
    if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps)
            or not 0 < eps <= 1 or budget_levels(eps) != q):
        raise UserError(f"{where}: 'epsilon' must be a number in (0, 1] of {q} uint8 levels, got {_shown(eps)}")
    for name, ok in (("method", lambda v: isinstance(v, str)), ("key", lambda v: isinstance(v, str)),
                     ("text", lambda v: isinstance(v, str)), ("seed", _int),
                     ("artifact_fingerprint", lambda v: v is None or isinstance(v, str)),
                     ("size", lambda v: isinstance(v, list) and v == list(shape))):
        if name in meta and not ok(meta[name]):
            raise UserError(f"{where}: {name!r} is not what `uge-protect noise` writes, got {_shown(meta[name])}")
    return meta


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_noise(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A noise file's δ in levels (H, W, 3) int16 and its settings; :class:`UserError` if it is
    not one: not a regular RGB PNG under the pixel limit, settings missing or malformed
    (:func:`check_noise_meta`), δ over its own budget, or δ zero everywhere."""
    path = _regular_file(path, "noise file")
    pixels, meta_text = _noise_pixels(path)
    if not isinstance(meta_text, str):
        raise UserError(f"{path} is not a noise file made by `uge-protect noise`")
    where = f"noise file {path}"
    try:
        meta = json.loads(meta_text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{where}: its settings are not valid JSON ({type(exc).__name__})") from None
    meta = check_noise_meta(meta, pixels.shape[:2], where)
    levels = pixels.astype(np.int16) - OFFSET
    q = meta["budget_levels"]
    if int(np.abs(levels).max(initial=0)) > q:
        raise UserError(f"{where} exceeds its own budget of {q} levels; it was altered")
    if not levels.any():
        raise UserError(f"{where} holds no noise (zero everywhere): the image would be written unprotected "
                        "(no_perturbation); make the noise again with `uge-protect noise`")
    return levels, meta


def apply_noise(image: str | Path, noise: str | Path, output: str | Path) -> dict[str, Any]:
    """Add a noise file to an image (decoded as ``shard`` decodes it) and write a PNG.

    Nothing is written when the noise file is refused (:func:`read_noise`), the image does
    not decode, the sizes differ, or the result would equal the image (``no_perturbation``)."""
    levels, meta = read_noise(noise)
    source = _regular_file(image, "image")
    try:
        data = source.read_bytes()
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
    if np.array_equal(protected, pixels):
        raise UserError(f"the noise leaves {image} unchanged (clipped away at 0 or 255): it would be written "
                        "unprotected (no_perturbation); nothing was written")
    _write_png(protected, output)
    return {**meta, "image": str(image), "output": str(output)}
