"""Decode image bytes into RGB uint8 arrays, recording conversions and rejecting bad input."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Field extensions recognised as images, in order of preference.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

#: Default limit on decoded pixels (width × height); larger images are rejected.
DEFAULT_MAX_PIXELS = 64_000_000

RESIZE_MODES = ("none", "center_crop", "keep_ratio")

#: Pillow formats accepted whatever the field's extension says (mislabelled fields are
#: common). Others — EPS, which runs Ghostscript, and the many rarely used plugins — are
#: refused as undecodable rather than handed to their decoders.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

#: Object reprs with addresses (``<_io.BytesIO object at 0x7f…>``) in exception messages.
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

#: EXIF orientation values that ask for a flip or rotation.
_ROTATING_ORIENTATIONS = frozenset(range(2, 9))


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
    #: The source mode when it was not RGB (e.g. "RGBA", "I;16"), or "" when already RGB.
    converted_from: str
    #: True when an EXIF orientation tag was applied.
    exif_rotated: bool
    source_size: tuple[int, int]


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr8 = np.clip(np.round(arr if arr.max(initial=0) > 1.0 else arr * 255.0), 0, 255)
        return Image.fromarray(arr8.astype(np.uint8), mode="L").convert("RGB")
    if mode in ("P", "L") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparent pixels onto white so the picture looks as it did.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if mode == "center_crop":
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_size: int | None = None,
    resize_mode: str = "none",
) -> DecodedImage:
    """Decode ``data`` into an RGB uint8 array.

    Applies EXIF orientation, converts any mode (grayscale, palette, RGBA, CMYK, 16-bit) to
    RGB and records it, refuses images over ``max_pixels`` before decoding their pixels, and
    optionally resizes. Raises :class:`DecodeError` with a reason code on failure.
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
            img.load()
            source_mode = img.mode
            rotated = _has_rotation(img)
            if rotated:
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        # Pillow's message names the BytesIO object's address: keep reasons reproducible.
        raise DecodeError(
            "undecodable_image", f"not a recognised image (accepted: {', '.join(ACCEPTED_FORMATS)})"
        ) from exc
    except Exception as exc:  # Pillow raises many types for corrupt data
        detail = _OBJECT_REPR.sub("<object>", f"{type(exc).__name__}: {exc}")
        raise DecodeError("undecodable_image", detail) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit
    rgb = resize_image(rgb, image_size, resize_mode)
    pixels = np.array(rgb, dtype=np.uint8)  # a writable copy
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DecodeError("undecodable_image", f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        converted_from="" if source_mode == "RGB" else source_mode,
        exif_rotated=rotated,
        source_size=(w, h),
    )


def _has_rotation(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in _ROTATING_ORIENTATIONS
    except Exception:
        return False


def pick_image_field(fields: dict[str, bytes]) -> list[str]:
    """The fields of a sample that hold an image (case-insensitive).

    Compound extensions count by their last part (``thumb.jpg``, ``seg.png``): a second image
    in a sample would otherwise be copied out unprotected, so the pipeline refuses samples
    with more than one image (``multiple_images``).
    """
    return [ext for ext in fields if ext.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
