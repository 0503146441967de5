"""The embedded, deterministic demo image-text dataset.

A small synthetic corpus for tests, examples and quick benchmarks: one coloured shape per
image on a textured background, with a caption describing it. The class is the shape; the
caption combines size, colour, shape, position, background and an optional distractor, so
there are far more distinct captions than classes and text-image retrieval is meaningful.

Everything is a pure function of the seed: :func:`write_demo_dataset` writes byte-identical
WebDataset shards for equal arguments. Only numpy and Pillow are used.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from uge_protect.atomic import atomic_write
from uge_protect.shards.tario import write_tar_atomic

__all__ = [
    "CLASS_NAMES",
    "COLORS",
    "BACKGROUNDS",
    "render_sample",
    "write_demo_dataset",
]

#: Shape classes; the label of a sample is the index of its shape in this list. Every class
#: is closed under mirroring (shapes are drawn mirrored half the time), so horizontal flips
#: are label-preserving augmentations.
CLASS_NAMES: list[str] = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "heart",
    "crescent",
    "arrow",
]

#: Named colours (RGB) used for objects, distractors and backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 50),
    "green": (50, 165, 60), "cyan": (40, 195, 210), "blue": (40, 75, 215),
    "purple": (135, 60, 185), "pink": (240, 125, 180), "brown": (125, 80, 40),
    "white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128),
}

#: Background textures.
BACKGROUNDS: list[str] = ["plain", "gradient", "striped", "checkered", "mottled", "dotted"]

SIZES: dict[str, tuple[float, float]] = {
    # object "radius" as a fraction of the image side
    "small": (0.20, 0.245),
    "medium": (0.255, 0.30),
    "large": (0.31, 0.37),
}

# (name, normalized centre) of the nine position cells.
POSITIONS: list[tuple[str, tuple[float, float]]] = [
    ("top left", (0.27, 0.27)),
    ("top", (0.5, 0.27)),
    ("top right", (0.73, 0.27)),
    ("left", (0.27, 0.5)),
    ("center", (0.5, 0.5)),
    ("right", (0.73, 0.5)),
    ("bottom left", (0.27, 0.73)),
    ("bottom", (0.5, 0.73)),
    ("bottom right", (0.73, 0.73)),
]

_POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}

_CAPTION_TEMPLATES: list[str] = [
    "a {size} {color} {shape} {pos} on a {bg} background{extra}",
    "a photo of a {size} {color} {shape} {pos}, {bg} background{extra}",
    "{size} {color} {shape} {pos} against a {bg} backdrop{extra}",
    "an image of a {color} {shape}, {size}, {pos} on a {bg} background{extra}",
]

#: Shapes are rotated uniformly within +/- this many degrees (and mirrored half the time).
_MAX_ROTATION_DEG = 30.0

#: Minimum RGB distance between the object colour and the mean background colour.
_MIN_CONTRAST = 120.0


def _unit_outline(shape: str) -> list[tuple[str, Any]]:
    """Drawing operations for ``shape`` in unit coordinates (radius about 1, centred at 0).

    Each op is ``("poly", Nx2 array, fill)``; fill 255 adds to the mask and 0 cuts it out.
    """

    def regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
        t = phase + 2 * math.pi * np.arange(n) / n
        return radius * np.stack([np.cos(t), np.sin(t)], axis=1)

    def disc(radius: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
        return regular(64, radius) + np.array([cx, cy])

    if shape == "circle":
        return [("poly", disc(0.95), 255)]
    if shape == "square":
        return [("poly", regular(4, 1.1, math.pi / 4), 255)]
    if shape == "triangle":
        return [("poly", regular(3, 1.15) + np.array([0.0, 0.15]), 255)]
    if shape == "star":
        outer = regular(5, 1.1)
        inner = regular(5, 0.45, -math.pi / 2 + math.pi / 5)
        pts = np.empty((10, 2))
        pts[0::2], pts[1::2] = outer, inner
        return [("poly", pts, 255)]
    if shape == "cross":
        a, w = 1.0, 0.32
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
               (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        return [("poly", np.array(pts, dtype=float), 255)]
    if shape == "ring":
        return [("poly", disc(1.0), 255), ("poly", disc(0.55), 0)]
    if shape == "diamond":
        pts = [(0.0, -1.1), (0.6, 0.0), (0.0, 1.1), (-0.6, 0.0)]
        return [("poly", np.array(pts), 255)]
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 80, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], axis=1) / 15.5
        return [("poly", pts, 255)]
    if shape == "crescent":
        return [("poly", disc(1.0), 255), ("poly", disc(0.85, 0.5, -0.1), 0)]
    if shape == "arrow":
        pts = [(-1.0, -0.2), (0.1, -0.2), (0.1, -0.6), (1.05, 0.0),
               (0.1, 0.6), (0.1, 0.2), (-1.0, 0.2)]
        return [("poly", np.array(pts), 255)]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float,
                angle: float, aspect: float, mirrored: bool = False) -> np.ndarray:
    """Antialiased coverage mask (float32 in [0, 1], ``size`` x ``size``) of a shape."""
    ss = 4 if size <= 128 else 2
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    for _, pts, fill in _unit_outline(shape):
        p = pts * np.array([-aspect if mirrored else aspect, 1.0 / aspect])
        p = (p @ rot.T) * radius + np.array([cx, cy])
        p = p * ss
        draw.polygon([(float(x), float(y)) for x, y in p], fill=fill)
    mask = canvas.resize((size, size), Image.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _jitter_color(rng: np.random.Generator, name: str, amount: float = 18.0) -> np.ndarray:
    base = np.asarray(COLORS[name], dtype=np.float32)
    return np.clip(base + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 255)


def _background(rng: np.random.Generator, size: int, kind: str, c1: np.ndarray) -> np.ndarray:
    """A ``size`` x ``size`` x 3 float32 background of texture ``kind`` around colour ``c1``."""
    lum = float(c1 @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    target = np.zeros(3, np.float32) if lum > 140 else np.full(3, 255.0, np.float32)
    c2 = c1 + (target - c1) * rng.uniform(0.2, 0.35)
    scale = size / 32.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == "striped":
        period = rng.uniform(4.0, 9.0) * scale
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
    elif kind == "checkered":
        cell = rng.uniform(3.0, 7.0) * scale
        ox, oy = rng.uniform(0, cell, 2)
        t = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2).astype(np.float32)
    elif kind == "mottled":
        n = int(rng.integers(3, 7))
        small = rng.uniform(0, 255, (n, n)).astype(np.uint8)
        t = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255.0
    elif kind == "dotted":
        step = rng.uniform(5.0, 8.0) * scale
        r = rng.uniform(1.0, 1.8) * scale
        ox, oy = rng.uniform(0, step, 2)
        dx = (xx + ox) % step - step / 2
        dy = (yy + oy) % step - step / 2
        t = np.clip(r + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)
    else:
        raise ValueError(f"unknown background {kind!r}")
    t = t[..., None]
    return c1 * (1 - t) + c2 * t


def _add_distractor(rng: np.random.Generator, img: np.ndarray, cx: float, cy: float,
                    radius: float) -> tuple[np.ndarray, str | None]:
    """Half the time, a small blob of a random colour kept clear of the object (centre
    ``cx, cy``, ``radius``) so that the label stays unambiguous; returns the image and its colour."""
    if rng.random() >= 0.5:
        return img, None
    S = img.shape[0]
    color_names = list(COLORS)
    d_name = color_names[int(rng.integers(len(color_names)))]
    d_rgb = _jitter_color(rng, d_name)
    d_r = rng.uniform(0.06, 0.11) * S
    d_aspect = rng.uniform(0.6, 1.0)
    d_angle = rng.uniform(0, 2 * math.pi)
    for _ in range(8):
        dx, dy = rng.uniform(d_r, S - d_r, 2)
        if math.hypot(dx - cx, dy - cy) > radius * 1.05 + d_r:
            blob = _shape_mask("circle", S, dx, dy, d_r, d_angle, d_aspect)[..., None]
            return img * (1 - blob) + d_rgb * blob, d_name
    return img, None


def _photometric_jitter(rng: np.random.Generator, img: np.ndarray) -> tuple[Image.Image, float]:
    """Global contrast and brightness jitter and sensor-like noise; returns the image and the noise sigma."""
    contrast = rng.uniform(0.85, 1.1)
    brightness = rng.uniform(-15, 15)
    noise_sigma = rng.uniform(2.0, 6.0)
    img = (img - 128.0) * contrast + 128.0 + brightness
    img = img + rng.normal(0.0, noise_sigma, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)), noise_sigma


def render_sample(rng: np.random.Generator,
                  image_size: int) -> tuple[Image.Image, int, str, dict[str, Any]]:
    """Render one demo sample.

    Returns ``(image, label, caption, attrs)``: an RGB ``image_size`` x ``image_size`` image
    of one shape (the class) with random colour, size, position, aspect, rotation (within
    +/-30 degrees) and mirroring on a random textured background, sometimes with a small
    distractor blob, plus mild brightness/contrast jitter and pixel noise. ``attrs`` holds
    every drawn attribute (JSON-serializable). The output is a pure function of the
    generator's state.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    S = image_size
    label = int(rng.integers(len(CLASS_NAMES)))
    shape = CLASS_NAMES[label]

    # Background.
    color_names = list(COLORS)
    bg_kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_name = color_names[int(rng.integers(len(color_names)))]
    bg = _background(rng, S, bg_kind, _jitter_color(rng, bg_name))
    bg_mean = bg.reshape(-1, 3).mean(axis=0)

    # Object colour: any named colour that stands out from the background.
    candidates = [n for n in color_names
                  if float(np.linalg.norm(np.asarray(COLORS[n], np.float32) - bg_mean))
                  >= _MIN_CONTRAST]
    if not candidates:  # cannot happen with the palette above; kept for safety
        candidates = color_names
    obj_name = candidates[int(rng.integers(len(candidates)))]
    obj_rgb = _jitter_color(rng, obj_name)

    # Geometry.
    size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
    lo, hi = SIZES[size_name]
    radius = rng.uniform(lo, hi) * S
    pos_name, (px, py) = POSITIONS[int(rng.integers(len(POSITIONS)))]
    margin = 0.85 * radius
    cx = float(np.clip((px + rng.uniform(-0.06, 0.06)) * S, margin, S - margin))
    cy = float(np.clip((py + rng.uniform(-0.06, 0.06)) * S, margin, S - margin))
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    mirrored = bool(rng.random() < 0.5)
    aspect = math.sqrt(rng.uniform(0.8, 1.25))

    img, distractor = _add_distractor(rng, bg, cx, cy, radius)

    # Object with a soft linear shading across it.
    mask = _shape_mask(shape, S, cx, cy, radius, angle, aspect, mirrored)[..., None]
    shade_dir = rng.uniform(0, 2 * math.pi)
    shade_amt = rng.uniform(0.0, 0.2)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    g = ((xx - cx) * math.cos(shade_dir) + (yy - cy) * math.sin(shade_dir)) / radius
    shaded = np.clip(obj_rgb * (1 + shade_amt * np.clip(g, -1, 1))[..., None], 0, 255)
    image, noise_sigma = _photometric_jitter(rng, img * (1 - mask) + shaded * mask)

    bg_phrase = f"{bg_kind} {bg_name}"
    extra = f" with a small {distractor} blob" if distractor else ""
    template = int(rng.integers(len(_CAPTION_TEMPLATES)))
    caption = _CAPTION_TEMPLATES[template].format(
        size=size_name, color=obj_name, shape=shape, pos=_POSITION_PHRASES[pos_name],
        bg=bg_phrase, extra=extra)

    attrs: dict[str, Any] = {
        "shape": shape,
        "color": obj_name,
        "size": size_name,
        "position": pos_name,
        "background": bg_kind,
        "background_color": bg_name,
        "distractor": distractor,
        "center": [round(cx / S, 4), round(cy / S, 4)],
        "radius": round(float(radius) / S, 4),
        "rotation_deg": round(math.degrees(angle), 2),
        "mirrored": mirrored,
        "aspect": round(aspect, 4),
        "noise_sigma": round(float(noise_sigma), 3),
        "template": template,
    }
    return image, label, caption, attrs


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int (a bool or non-integer is a ValueError), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (zlib level 6: byte-identical for equal pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


#: What a dataset writer's ``render(rng, index)`` returns for one sample: the image, its
#: label, caption and ``.json`` metadata.
Rendered = tuple[Image.Image, int, str, dict[str, Any]]


def write_split(split_dir: Path, prefix: str, split: str, seeds: Sequence[np.random.SeedSequence],
                samples_per_shard: int, render: Callable[[np.random.Generator, int], Rendered]) -> list[str]:
    """Write samples ``{split}-{index:06d}`` (index < ``len(seeds)``, each drawn by ``render``
    from its own seed) as shards ``{prefix}-{split}-{shard:06d}.tar`` of ``samples_per_shard``
    under ``split_dir``, with ``.png``, ``.txt``, ``.cls`` and ``.json`` members; returns their paths."""
    split_dir.mkdir(parents=True, exist_ok=True)
    n = len(seeds)
    shards: list[str] = []
    for shard_idx, start in enumerate(range(0, n, samples_per_shard)):
        members: list[tuple[str, bytes]] = []
        for index in range(start, min(start + samples_per_shard, n)):
            image, label, caption, meta = render(np.random.Generator(np.random.PCG64(seeds[index])), index)
            key = f"{split}-{index:06d}"
            members += [
                (f"{key}.png", encode_png(image)),
                (f"{key}.txt", caption.encode("utf-8")),
                (f"{key}.cls", str(label).encode("ascii")),
                (f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")),
            ]
        path = split_dir / f"{prefix}-{split}-{shard_idx:06d}.tar"
        write_tar_atomic(path, members)
        shards.append(str(path))
    return shards


def write_demo_dataset(out_dir: str | os.PathLike, *, n_train: int = 5000, n_test: int = 1000,
                       image_size: int = 32, samples_per_shard: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """Write the demo dataset as WebDataset shards under ``out_dir``.

    Layout: ``train/demo-train-000000.tar``, ... and ``test/demo-test-000000.tar``, ...,
    plus ``classes.json``. Each sample ``{split}-{index:06d}`` has ``.png`` (lossless RGB),
    ``.txt`` (caption), ``.cls`` (label, ASCII decimal) and ``.json`` (label, class_name,
    attrs). Train and test come from independent RNG streams spawned from ``seed``, and
    every sample from its own child stream, so equal arguments give byte-identical files and
    a sample does not depend on the split size. Existing shards with the same names are
    replaced; other files are left alone.

    Returns a summary: ``out_dir``, ``classes``, ``classes_path``, ``image_size``, ``seed``
    and per split ``{"n": count, "shards": [paths]}`` under ``splits``.
    """
    n_train = check_int("n_train", n_train, 1)
    n_test = check_int("n_test", n_test, 1)
    image_size = check_int("image_size", image_size, 16)
    samples_per_shard = check_int("samples_per_shard", samples_per_shard, 1)
    seed = check_int("seed", seed, 0)

    root = Path(out_dir)
    train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
    splits: dict[str, Any] = {}
    def render(rng: np.random.Generator, _index: int) -> Rendered:
        image, label, caption, attrs = render_sample(rng, image_size)
        return image, label, caption, {"label": label, "class_name": CLASS_NAMES[label], "attrs": attrs}

    for split, n, split_ss in (("train", n_train, train_ss), ("test", n_test, test_ss)):
        shards = write_split(root / split, "demo", split, split_ss.spawn(n), samples_per_shard, render)
        splits[split] = {"n": n, "shards": shards}

    classes_path = root / "classes.json"
    atomic_write(classes_path, json.dumps(CLASS_NAMES, indent=2) + "\n")

    return {
        "out_dir": str(root),
        "classes": list(CLASS_NAMES),
        "classes_path": str(classes_path),
        "image_size": image_size,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "splits": splits,
    }
