"""Shared helpers for benchmarks: synthetic web-like shards (JPEG images + captions)."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from uge_protect.shards.tario import write_tar_atomic


def make_jpeg_shards(directory: Path, *, n_images: int, per_shard: int, size: int, seed: int = 0) -> list[Path]:
    """Write ``n_images`` smooth random JPEGs (quality 90) with captions into shards."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s, start in enumerate(range(0, n_images, per_shard)):
        members = []
        for i in range(start, min(n_images, start + per_shard)):
            # Low-frequency content with some texture, so codecs see photo-like statistics.
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            key = f"{i:08d}"
            members += [(f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"sample {i}".encode())]
        path = directory / f"bench-{s:06d}.tar"
        write_tar_atomic(path, members)
        paths.append(path)
    return paths


def workdir(name: str) -> Path:
    """A fresh temporary directory for one benchmark (under $BENCH_DIR if set)."""
    base = os.environ.get("BENCH_DIR")
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
