"""Encoding stage: protected pixels → image bytes, hashes and quality measures."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from uge_protect.methods.budget import difference_stats
from uge_protect.pipeline.png import encode_png
from uge_protect.pipeline.stages import StageClock

#: Output field extension per image format.
FORMAT_EXTENSION = {"png": "png", "webp": "webp", "jpeg": "jpg"}


@dataclass(frozen=True)
class EncodeSettings:
    image_format: str = "png"
    lossy: bool = False
    quality: int = 95
    png_compress_level: int = 1
    #: zlib strategy: 0 default, 1 filtered, 2 Huffman only, 3 RLE.
    png_compress_type: int = 2


@dataclass
class EncodedImage:
    data: bytes
    linf: int
    psnr: float
    sha256: str


def encode_pixels(pixels: np.ndarray, s: EncodeSettings) -> bytes:
    """Encode an HxWx3 uint8 array (deterministic for equal input and settings)."""
    if s.image_format == "png":
        return encode_png(pixels, s.png_compress_level, s.png_compress_type)
    img = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if s.image_format == "webp":
        if s.lossy:
            img.save(buf, format="WEBP", quality=s.quality, method=4)
        else:
            img.save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
    elif s.image_format == "jpeg":
        img.save(buf, format="JPEG", quality=s.quality, subsampling=0 if s.quality >= 90 else 2)
    else:
        raise ValueError(f"unknown image format {s.image_format!r}")
    return buf.getvalue()


def encode_protected(original: np.ndarray, protected: np.ndarray, s: EncodeSettings,
                     clock: StageClock | None = None) -> EncodedImage:
    """Encode ``protected`` and measure L∞/PSNR against ``original`` as written; ``clock``,
    when given, counts the ``encode``, ``measure`` and ``hash`` stages.

    For lossy formats the written bytes are decoded again, so the measures describe what a
    downstream user actually reads, not what the method produced.
    """
    clock = clock or StageClock()
    with clock.timed("encode"):
        data = encode_pixels(protected, s)
    with clock.timed("measure"):
        written = protected
        if s.lossy:
            written = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
        linf, quality = difference_stats(original, written)
    with clock.timed("hash"):
        digest = hashlib.sha256(data).hexdigest()
    return EncodedImage(data=data, linf=linf, psnr=quality, sha256=digest)
