"""Decode image bytes into RGB uint8 arrays, recording conversions and rejecting bad input.

Which members of a sample are images is decided by name *and* by content (see
:mod:`uge_protect.shards.members`); only :data:`ACCEPTED_FORMATS` are ever decoded.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from uge_protect.shards.members import (  # noqa: F401  (the image rule, re-exported)
    EXTRA_IMAGE_EXTENSIONS,
    identify_image,
    image_extensions,
    opaque_fields,
    pick_image_field,
)

try:  # Pillow built without LittleCMS has no ImageCms
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on the Pillow build
    ImageCms = None

#: Default limit on decoded pixels (width × height); larger images are rejected.
DEFAULT_MAX_PIXELS = 64_000_000

RESIZE_MODES = ("none", "center_crop", "keep_ratio")

#: Pillow formats that are decoded, whatever the field's extension says (mislabelled fields
#: are common). An image in any other format — EPS, which runs Ghostscript, PPM, TGA and the
#: many rarely used plugins — is refused (``undecodable_image``) rather than handed to its
#: decoder, and never copied out.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

#: Object reprs with addresses (``<_io.BytesIO object at 0x7f…>``) in exception messages.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

#: EXIF orientation → the pixel transpose that undoes it (same as ``ImageOps.exif_transpose``).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}

#: Pixels converted per step: large images are converted in strips of rows straight into
#: the output array, so no whole-image intermediate copies are made.
_STRIP_PIXELS = 1 << 20

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
#: The colour part of each mode (what an ICC profile describes) when it is not the mode itself.
_COLOR_MODE = {"1": "L", "P": "RGB", "PA": "RGB", "RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L"}
#: Raw modes with 16 bits per channel that Pillow reduces to 8 bits when it loads them.
_SIXTEEN_BIT_BASES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK"})
_SIXTEEN_BIT_SUFFIXES = (";16", ";16B", ";16L", ";16N")


class DecodeError(Exception):
    """An image that cannot be protected; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    """An image ready to protect: HxWx3 uint8 pixels and what was done to get them."""

    pixels: np.ndarray
    #: The source mode when it was not 8-bit RGB (e.g. "RGBA", "I;16", "RGB;16"), else "".
    converted_from: str
    #: True when an EXIF orientation tag was applied.
    exif_rotated: bool
    source_size: tuple[int, int]
    #: What happened to an embedded ICC profile: None (none embedded), "converted: <name>"
    #: (pixels converted from it to sRGB) or "dropped: <why>" (unusable; pixels taken as sRGB).
    icc_profile: str | None = None
    #: Frames (or pages) in the source when more than one: only the first is decoded.
    frames: int | None = None


# --- conversions ------------------------------------------------------------------------------


def _source_mode(img: Image.Image) -> str:
    """The mode of the stored pixels: Pillow's mode, or e.g. "RGB;16" for a 48-bit PNG that
    Pillow reduces to 8 bits per channel on load. Call before ``load()``."""
    mode = img.mode
    args = img.tile[0].args if img.tile else None
    raw = args[0] if isinstance(args, tuple) and args else args
    if isinstance(raw, str) and raw.endswith(_SIXTEEN_BIT_SUFFIXES):
        base = raw.split(";", 1)[0]
        if base in _SIXTEEN_BIT_BASES and not mode.startswith("I"):
            return f"{base};16"
    return mode


def _eight_bit(img: Image.Image) -> Callable[[Image.Image], Image.Image] | None:
    """For 16/32-bit integer and float modes, a strip function to 8-bit "L" (scaled by a
    peak taken from the whole image); None for other modes."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        peak = 65535.0 if mode.startswith("I;16") or img.getextrema()[1] > 255 else 255.0
        scale = 255.0 / peak
    elif mode == "F":
        scale = 1.0 if img.getextrema()[1] > 1.0 else 255.0
    else:
        return None

    def to_l(strip: Image.Image) -> Image.Image:
        arr = np.asarray(strip).astype(np.float64)
        arr8 = np.clip(np.round(arr * scale if scale != 1.0 else arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L")

    return to_l


def _clean_text(text: str, limit: int = 80) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:limit]


@functools.lru_cache(maxsize=32)
def _icc_transform(profile: bytes, color_mode: str):
    """(transform from ``profile`` to sRGB for ``color_mode`` pixels or None, manifest note)."""
    if ImageCms is None:
        return None, "dropped: Pillow has no LittleCMS"
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        return None, "dropped: unreadable ICC profile"
    try:
        name = _clean_text(ImageCms.getProfileDescription(source))
    except (ImageCms.PyCMSError, OSError, ValueError):
        name = ""
    space = _clean_text(getattr(source.profile, "xcolor_space", "") or "?")
    try:
        transform = ImageCms.buildTransform(source, _srgb(), color_mode, "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None, f"dropped: a {space} profile does not fit {color_mode} pixels"
    return transform, f"converted: {name}" if name else "converted"


@functools.lru_cache(maxsize=1)
def _srgb():
    return ImageCms.createProfile("sRGB")


def _strip_converter(img: Image.Image, profile: bytes | None) -> tuple[Callable[[Image.Image], Image.Image], str | None]:
    """A function turning a strip (crop) of ``img`` into 8-bit RGB, and the ICC note.

    Colours are converted from an embedded ICC profile to sRGB first; transparent pixels
    are then composited onto white, so the picture looks as it did in a viewer.
    """
    to_l = _eight_bit(img)
    mode = "L" if to_l else img.mode
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    color_mode = _COLOR_MODE.get(mode, mode)
    transform, note = _icc_transform(profile, color_mode) if profile else (None, None)

    def convert(strip: Image.Image) -> Image.Image:
        if to_l is not None:
            strip = to_l(strip)
        if not has_alpha:
            if transform is None:
                return strip if strip.mode == "RGB" else strip.convert("RGB")
            color = strip if strip.mode == color_mode else strip.convert(color_mode)
            return ImageCms.applyTransform(color, transform)
        rgba = strip.convert("RGBA")  # palettes, transparency keys, premultiplied alpha
        if transform is not None:
            rgb = ImageCms.applyTransform(rgba.convert(color_mode), transform)
            rgba = Image.merge("RGBA", (*rgb.split(), rgba.getchannel("A")))
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")

    return convert, note


def _to_rgb_array(img: Image.Image, convert: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Convert ``img`` strip by strip into a new HxWx3 uint8 array (peak memory: the
    source image, the output array and one strip)."""
    w, h = img.size
    out = np.empty((h, w, 3), np.uint8)
    rows = max(1, _STRIP_PIXELS // w)
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        strip = img if (top, bottom) == (0, h) else img.crop((0, top, w, bottom))
        out[top:bottom] = np.asarray(convert(strip))
    return out


def resize_image(img: Image.Image, size: int | None, mode: str) -> Image.Image:
    """Resize for a fixed training resolution.

    ``center_crop``: shorter side to ``size`` then a centred ``size``×``size`` crop;
    ``keep_ratio``: shorter side to ``size``, aspect ratio kept; ``none``: unchanged.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    if mode == "none" or size is None:
        return img
    w, h = img.size
    new_w, new_h = _shorter_side_to(w, h, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if mode == "center_crop":
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _draft_for_resize(img: Image.Image, size: int | None, mode: str) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the resize
    that follows shrinks it that far: the decoded image stays at least as large as the
    resize's intermediate size, so only the bicubic step's input changes, not the output's
    size. Other formats, and ``mode == "none"``, are left alone."""
    if mode == "none" or size is None or img.format != "JPEG":
        return
    w, h = img.size
    if size / min(w, h) <= 0.5:
        img.draft(img.mode, _shorter_side_to(w, h, size))


def _shorter_side_to(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) of a ``w``×``h`` image scaled so that its shorter side is ``size``."""
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_size: int | None = None,
    resize_mode: str = "none",
) -> DecodedImage:
    """Decode ``data`` into an RGB uint8 array.

    Applies EXIF orientation, converts an embedded ICC profile's colours to sRGB, converts
    any mode (grayscale, palette, RGBA, CMYK, 16-bit) to 8-bit RGB and records all of it,
    refuses images over ``max_pixels`` before decoding their pixels, and optionally resizes
    (a JPEG that shrinks by half or more is decoded at a reduced DCT scale first).
    Raises :class:`DecodeError` with a reason code on failure.
    """
    if not data:
        raise DecodeError("empty_image", "the image field has no bytes")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    # Pillow's own bomb check uses the same limit while we decode; the global is restored
    # after, so a small --max-pixels does not leak into later, unrelated image reads.
    saved_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise DecodeError("undecodable_image", f"invalid size {w}x{h}")
            if w * h > max_pixels:
                raise DecodeError("too_many_pixels", f"{w}x{h} exceeds --max-pixels {max_pixels}")
            source_mode = _source_mode(img)
            frames = _frame_count(img)
            _draft_for_resize(img, image_size, resize_mode)
            img.load()
            orientation = _orientation(img)
            convert, icc_note = _strip_converter(img, img.info.get("icc_profile") or None)
            pixels = _to_rgb_array(img, convert)
            del img
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("undecodable_image", _unaccepted_detail(data)) from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        detail = _OBJECT_REPR.sub("<object>", f"{type(exc).__name__}: {exc}")
        raise DecodeError("undecodable_image", detail) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    if orientation in _ORIENT:
        pixels = np.ascontiguousarray(_ORIENT[orientation](pixels))
    if resize_mode != "none" and image_size is not None:
        pixels = np.array(resize_image(Image.fromarray(pixels), image_size, resize_mode), dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DecodeError("undecodable_image", f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(
        pixels=pixels,
        converted_from="" if source_mode == "RGB" else source_mode,
        exif_rotated=orientation in _ORIENT,
        source_size=(w, h),
        icc_profile=icc_note,
        frames=frames,
    )


def _unaccepted_detail(data: bytes) -> str:
    """Why Pillow's accepted decoders refused ``data`` (no object addresses: manifests stay
    reproducible)."""
    accepted = ", ".join(ACCEPTED_FORMATS)
    fmt = identify_image(data)
    if fmt is not None:
        return f"{fmt} is not an accepted image format (accepted: {accepted}); convert it first"
    return f"not a recognised image (accepted: {accepted})"


def _frame_count(img: Image.Image) -> int | None:
    """The number of frames or pages when more than one (animations, multi-page TIFF)."""
    try:
        n = int(getattr(img, "n_frames", 1))
        img.seek(0)
    except Exception:
        return None
    return n if n > 1 else None


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1
