"""Helpers for tests: tiny shards made on the fly."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from uge_protect.shards.tario import write_tar_atomic


def png_bytes(pixels: np.ndarray, mode: str | None = None) -> bytes:
    """Encode an array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def random_image(rng: np.random.Generator, h: int = 24, w: int = 24) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> Path:
    """Write a shard from (key, {ext: bytes}) pairs, members in the given order."""
    members = [(f"{key}.{ext}" if ext else key, data) for key, fields in samples for ext, data in fields.items()]
    write_tar_atomic(path, members)
    return path


def simple_samples(prefix: str, n: int, seed: int = 0, size: tuple[int, int] = (24, 24)):
    """n samples with png, txt, cls and json fields."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        key = f"{prefix}-{i:05d}"
        yield key, {
            "png": png_bytes(random_image(rng, *size)),
            "txt": f"a photo number {i} of {prefix} — café".encode("utf-8"),
            "cls": str(i % 10).encode("ascii"),
            "json": f'{{"caption": "json caption {i}", "label": {i % 10}}}'.encode("utf-8"),
        }
