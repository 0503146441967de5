"""Shared helpers for benchmarks: synthetic web-like shards (JPEG images + captions)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from uge_protect.shards.tario import write_tar_atomic


def make_jpeg_shards(directory: Path, *, n_images: int, per_shard: int, size: int, seed: int = 0) -> list[Path]:
    """Write ``n_images`` smooth random JPEGs (quality 90) with captions into shards."""
    return make_image_shards(directory, n_images=n_images, per_shard=per_shard, size=size, seed=seed)


def make_image_shards(directory: Path, *, n_images: int, per_shard: int, size: int, seed: int = 0,
                      image_format: str = "JPEG", texture: int = 12, labels: bool = False,
                      caption: Callable[[int], str] = "sample {}".format) -> list[Path]:
    """Write ``n_images`` smooth random images (JPEG quality 90, or PNG level 6) with captions,
    and with ``labels`` a class label each (10 classes), into shards of ``per_shard``;
    ``texture`` is the amplitude of the per-pixel noise on the smooth content; ``caption``
    gives image i's caption."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[image_format]
    options = {"quality": 90} if image_format == "JPEG" else {"compress_level": 6}
    paths = []
    for s, start in enumerate(range(0, n_images, per_shard)):
        members = []
        for i in range(start, min(n_images, start + per_shard)):
            # Low-frequency content with some texture, so codecs see photo-like statistics.
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-texture, texture + 1, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format=image_format, **options)
            key = f"{i:08d}"
            members += [(f"{key}.{ext}", buf.getvalue()), (f"{key}.txt", caption(i).encode())]
            if labels:
                members.append((f"{key}.cls", str(i % 10).encode()))
        path = directory / f"bench-{s:06d}.tar"
        write_tar_atomic(path, members)
        paths.append(path)
    return paths


def workdir(name: str) -> Path:
    """A fresh temporary directory for one benchmark (under $BENCH_DIR if set)."""
    base = os.environ.get("BENCH_DIR")
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
