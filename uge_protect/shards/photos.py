"""A deterministic image-text benchmark of real photographs, built offline.

Twelve photographs shipped by two Debian packages (``mate-backgrounds`` and
``lomiri-wallpapers-16.04``) are the classes: one class per photograph. Each photograph is
split by width into two disjoint regions with a gap between them: training crops come only
from the left region, test crops only from the right one, so no test pixel was ever part of
a training image (the gap is wider than any JPEG block, and every crop is resampled from its
own region only). A crop is a random square window at a random scale and position in its
region, resized to ``image_size`` and mirrored half the time (mirroring keeps every class).
Its caption is written from what that part of the photograph shows: a hand-written phrase
for the crop's vertical band (top, middle, bottom) of that photograph, how close the view is
(from the crop's scale), and one of a few paraphrase templates.

The photographs are verified by SHA-256 against the table below, so equal arguments give
byte-identical shards (same format as ``demo-data``: png, txt, cls, json per sample). The
photographs are only read and decoded (JPEG only, with a pixel limit); nothing from their
directory is executed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from uge_protect.atomic import atomic_write
from uge_protect.errors import UserError
from uge_protect.shards.demo import Rendered, check_int, write_split

__all__ = [
    "PHOTOS",
    "CLASS_NAMES",
    "TRAIN_REGION",
    "TEST_REGION",
    "default_photo_dirs",
    "find_photos",
    "write_photo_dataset",
]


@dataclass(frozen=True)
class Photo:
    """One source photograph: the class it stands for and what each part of it shows."""

    name: str  #: class name (used in ``classes.json`` and zero-shot prompts)
    package: str  #: Debian package that ships it
    version: str  #: package version the SHA-256 was taken from
    file: str  #: path under ``usr/share/backgrounds``
    sha256: str
    author: str
    license: str
    subject: str  #: what the whole photograph shows
    bands: tuple[str, str, str]  #: what its top, middle and bottom thirds show


_MATE = ("mate-backgrounds", "1.26.0-1")
_LOMIRI = ("lomiri-wallpapers-16.04", "20.04.0-2")

#: The photographs, in label order.
PHOTOS: tuple[Photo, ...] = (
    Photo("bridge", *_LOMIRI, "Bridge_by_Sander_Klootwijk.jpg",
          "bd86b081f9975e2b83527f71e49b9271a8ab40885428395969d9f7d834d7f050",
          "Sander Klootwijk", "CC-BY-SA-4.0",
          "the white steel tubes and dark cables of a bridge above a tidal estuary",
          ("white steel tubes and dark cables crossing a clear blue sky",
           "a white steel tube and thin dark cables against a pale blue sky",
           "sand flats and shallow water of an estuary under white clouds")),
    Photo("fig", *_LOMIRI, "Picture_0B_by_freespace.jpg",
          "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad",
          'Trevor "Freespace"', "CC-BY-4.0",
          "half a fig in a red-orange wooden bowl on grey concrete",
          ("the rim of a red-orange bowl and its dark shadow on grey concrete",
           "a glossy red-orange bowl holding the red flesh of a halved fig",
           "the curved red-orange side of a bowl on cracked grey concrete")),
    Photo("leafy tree", *_LOMIRI, "Dragonfly_by_Bolly.jpg",
          "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3",
          '"Bolly"', "CC-BY-SA-4.0",
          "a dragonfly on a twig among sunlit hazel leaves under a blue sky",
          ("sunlit green and yellow hazel leaves against a deep blue sky",
           "hazel leaves around a bare twig with a resting dragonfly and patches of blue sky",
           "dense shaded green hazel leaves with small gaps of sky")),
    Photo("larch forest", *_LOMIRI, "aitzgorri_by_Aitzol_Berasategi.jpg",
          "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36",
          "Aitzol Berasategi", "CC-BY-4.0",
          "a green meadow below an orange autumn larch forest and a grey limestone ridge",
          ("a grey limestone mountain ridge under a pale cloudy sky",
           "orange autumn larches and a dark fir in front of a hazy mountain slope",
           "a sloping green meadow scattered with fallen leaves")),
    Photo("rocky mountain", *_LOMIRI, "picosdeeuropa_by_Aitzol_Berasategi.jpg",
          "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a",
          "Aitzol Berasategi", "CC-BY-4.0",
          "a dirt trail across a grassy slope below grey rocky peaks with snow under a blue sky",
          ("grey rocky peaks and a white cloud against a deep blue sky",
           "grey limestone cliffs with patches of snow above a grassy slope",
           "a worn dirt trail and scattered stones on a green-brown grassy slope")),
    Photo("forest stream", *_LOMIRI, "life_by_Aitzol_Berasategi.jpg",
          "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05",
          "Aitzol Berasategi", "CC-BY-4.0",
          "a small stream cascading over pale limestone rocks in a green forest",
          ("green forest undergrowth, thin tree trunks and mossy rocks",
           "small waterfalls running between pale limestone boulders",
           "shallow water and mossy grey rocks along a forest stream")),
    Photo("dandelion", *_LOMIRI, "seeding_by_Clements_Engelhardt.jpg",
          "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f",
          "Clemens Engelhardt", "CC0-1.0",
          "dandelion seed heads in a meadow backlit by the setting sun",
          ("glowing dandelion clocks in front of a bright hazy sunset sky",
           "white dandelion seed heads among dark green grass",
           "dandelion stalks and blades of grass in a dim meadow")),
    Photo("forget-me-not", *_MATE, "mate/nature/LadyBird.jpg",
          "e35a9a4126ef969c90b29c038058c5a575a20eadd84106a37bf1fa9931e7b61d",
          "Charles Barbin", "GPL-2+",
          "a ladybird on a grass stem among blue forget-me-nots",
          ("pale blue forget-me-nots and pink buds above a blurred green background",
           "a green grass stem where a red ladybird walks, over a blurred green background",
           "a broad green grass blade and blurred blue forget-me-nots")),
    Photo("wooden plank", *_MATE, "mate/nature/Wood.jpg",
          "19c78500ac00a622e19907ab9cc7d06d46fe08c4a6142759a84195696150ec07",
          "Jean-François Fortin Tam", "GPL-2+",
          "pale weathered wooden planks seen at a low angle",
          ("the soft blurred surface of a pale wooden plank",
           "the grain of weathered wooden planks and the groove between them",
           "fine cracks and grain on a pale wooden board")),
    Photo("dune grass", *_MATE, "mate/nature/Dune.jpg",
          "8a67c2cb0be8c46b70c237311a4fa4d2b4ac7d39568135384787801fa5cc9a91",
          "Marco Cogoni", "GPL-2+",
          "golden dune grass blowing in front of a blue sea and sky",
          ("pale blue sky above a deep blue sea with tips of dry grass",
           "seed heads of golden dune grass against blue water and green dunes",
           "dense tangled golden stalks of dune grass")),
    Photo("grass", *_MATE, "mate/nature/GreenMeadow.jpg",
          "8fa0de0aa4089f7319c9fb7a6d006d4cab6023e8c8853731557cff53567b4832",
          "Timothy Schellhase", "GPL-2+",
          "dense young green grass blades in close-up",
          ("blurred tips of bright green grass",
           "upright blades of bright green grass",
           "closely packed green grass stems")),
    Photo("yellow flower", *_MATE, "mate/nature/YellowFlower.jpg",
          "254da96256acb7add685679775a04d1e4a5bc8cd13e5a5a3d61351ce198a5306",
          "Charles Barbin", "GPL-2+",
          "the yellow petals and dark stamens of a flower against a black background",
          ("bright yellow petals against a dark background",
           "long yellow petals curving over a dark background",
           "the centre of a yellow flower with dark stamens among yellow petals")),
)

#: Class names in label order (``classes.json``).
CLASS_NAMES: list[str] = [p.name for p in PHOTOS]

#: Fractions of a photograph's width that training and test crops come from; the gap
#: between them (6% of the width, at least 76 source pixels) is used by neither split.
TRAIN_REGION: tuple[float, float] = (0.0, 0.66)
TEST_REGION: tuple[float, float] = (0.72, 1.0)

#: Crop side as a fraction of the photograph's height (clipped to the region's width).
CROP_SCALE: tuple[float, float] = (0.10, 0.34)

#: Photographs are decoded at (at least) this height; JPEG DCT scaling makes it fast.
_WORK_HEIGHT = 1024

#: Refuse photographs with more pixels than this (after the hash check, as a second guard).
MAX_PHOTO_PIXELS = 40_000_000

#: Most bytes read from one photograph file.
_MAX_PHOTO_BYTES = 64 << 20

_VIEWS: dict[str, tuple[str, ...]] = {
    "close-up": ("a close-up of", "a detail of", "a tight crop of"),
    "medium": ("a view of", "a section of", "a crop showing"),
    "wide": ("a wide view of", "a broad view of", "a large crop showing"),
}
_SHOTS = {"close-up": "close up", "medium": "medium shot", "wide": "wide shot"}
_BANDS = ("top", "middle", "bottom")
_TEMPLATES: tuple[str, ...] = (
    "{view} {band}",
    "{view} {band}, taken from a picture of {subject}",
    "the {where} of a picture of {subject}: {band}",
    "{band}, {shot}",
)

_FETCH_HINT = "run `make photos` (apt-get download {pkg} && dpkg-deb -x into .cache/photos) or pass --photos DIR"


def default_photo_dirs() -> list[Path]:
    """Where photographs are looked for by default: the system's backgrounds and the cache
    ``make photos`` fills (next to this checkout and under the working directory)."""
    repo = Path(__file__).resolve().parents[2]
    dirs = [Path("/usr/share/backgrounds"),
            repo / ".cache/photos/usr/share/backgrounds",
            Path.cwd() / ".cache/photos/usr/share/backgrounds"]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _roots(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    """Backgrounds roots: a directory, or its ``usr/share/backgrounds`` when it has one."""
    roots = []
    for d in dirs:
        p = Path(d)
        nested = p / "usr/share/backgrounds"
        roots.append(nested if nested.is_dir() else p)
    return roots


def _read_limited(path: Path) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(_MAX_PHOTO_BYTES + 1)
    if len(data) > _MAX_PHOTO_BYTES:
        raise UserError(f"photograph {path} is larger than {_MAX_PHOTO_BYTES >> 20} MiB, not a pinned photograph")
    return data


def find_photos(dirs: Sequence[str | os.PathLike] | None = None,
                photos: Sequence[Photo] = PHOTOS) -> list[tuple[Photo, Path, bytes]]:
    """Locate and verify every photograph: ``(photo, path, file bytes)`` in label order.

    Each photograph is taken from the first of ``dirs`` (default :func:`default_photo_dirs`)
    where its SHA-256 matches. Raises :class:`UserError` naming the first photograph that is
    missing or different everywhere, and how to get it.
    """
    roots = _roots(dirs if dirs is not None else default_photo_dirs())
    found: list[tuple[Photo, Path, bytes]] = []
    for photo in photos:
        mismatch: tuple[Path, str] | None = None
        for root in roots:
            path = root / photo.file
            if not path.is_file():
                continue
            try:
                data = _read_limited(path)
            except OSError as exc:
                raise UserError(f"cannot read photograph {path}: {exc.strerror or exc}") from None
            digest = hashlib.sha256(data).hexdigest()
            if digest == photo.sha256:
                found.append((photo, path, data))
                break
            mismatch = mismatch or (path, digest)
        else:
            hint = _FETCH_HINT.format(pkg=photo.package)
            if mismatch:
                raise UserError(
                    f"photograph {mismatch[0]} has SHA-256 {mismatch[1][:16]}…, not the pinned "
                    f"{photo.sha256[:16]}… of {photo.package} {photo.version}; {hint}")
            where = ", ".join(str(r) for r in roots)
            raise UserError(f"photograph {photo.file} ({photo.package}) not found in {where}; {hint}")
    return found


def _decode(path: Path, data: bytes) -> tuple[Image.Image, tuple[int, int]]:
    """The photograph at working resolution and its full size, JPEG only, pixel-limited."""
    try:
        im = Image.open(io.BytesIO(data), formats=["JPEG"])
        size = im.size
        if size[0] * size[1] > MAX_PHOTO_PIXELS:
            raise UserError(f"photograph {path} has {size[0]}x{size[1]} pixels, over the limit")
        im.draft("RGB", (math.ceil(size[0] * _WORK_HEIGHT / size[1]), _WORK_HEIGHT))
        im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"photograph {path} does not decode: {exc}") from None
    return im, size


def region_box(size: tuple[int, int], split: str) -> tuple[int, int, int, int]:
    """The ``(x0, y0, x1, y1)`` box (source pixels) that ``split`` crops come from."""
    w, h = size
    if split == "train":
        return (0, 0, int(math.floor(w * TRAIN_REGION[1])), h)
    if split == "test":
        return (int(math.ceil(w * TEST_REGION[0])), 0, w, h)
    raise ValueError(f"unknown split {split!r}")


class _Region:
    """One split's region of one photograph, decoded, and crops of it."""

    def __init__(self, work: Image.Image, size: tuple[int, int], split: str):
        self.box = region_box(size, split)
        fx, fy = work.width / size[0], work.height / size[1]
        x0, y0, x1, y1 = self.box
        # Whole working pixels inside the region only: a crop never sees the gap or beyond.
        self.fx, self.fy = fx, fy
        self.origin = (math.ceil(x0 * fx), 0)
        self.image = work.crop((self.origin[0], 0, math.floor(x1 * fx), work.height))
        self.height = size[1]

    def sample(self, rng: np.random.Generator, image_size: int) -> tuple[Image.Image, dict[str, Any]]:
        """A random square crop (box in source pixels), resized and mirrored half the time."""
        x0, y0, x1, y1 = self.box
        side = int(round(rng.uniform(*CROP_SCALE) * self.height))
        side = max(1, min(side, x1 - x0, y1 - y0))
        cx = int(rng.integers(x0, x1 - side + 1))
        cy = int(rng.integers(y0, y1 - side + 1))
        flip = bool(rng.random() < 0.5)
        ox, oy = self.origin
        box = (max(cx * self.fx - ox, 0.0), max(cy * self.fy - oy, 0.0),
               min((cx + side) * self.fx - ox, self.image.width),
               min((cy + side) * self.fy - oy, self.image.height))
        img = self.image.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img, {"box": [cx, cy, cx + side, cy + side], "scale": round(side / self.height, 4),
                     "flip": flip}


def _caption(rng: np.random.Generator, photo: Photo, crop: dict[str, Any],
             height: int) -> tuple[str, dict[str, Any]]:
    """A caption for ``crop`` of ``photo`` (``height`` pixels high) from its band and scale."""
    y0, y1 = crop["box"][1], crop["box"][3]
    band = min(int((y0 + y1) * 3 // (2 * height)), 2)
    scale = (y1 - y0) / height
    view = "close-up" if scale < 0.17 else ("medium" if scale < 0.26 else "wide")
    template = int(rng.integers(len(_TEMPLATES)))
    phrases = _VIEWS[view]
    caption = _TEMPLATES[template].format(
        view=phrases[int(rng.integers(len(phrases)))], band=photo.bands[band],
        subject=photo.subject, where=_BANDS[band], shot=_SHOTS[view])
    return caption, {"band": _BANDS[band], "view": view, "template": template}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_photo_dataset(out_dir: str | os.PathLike, *, train_per_class: int = 200,
                        test_per_class: int = 80, image_size: int = 32,
                        samples_per_shard: int = 1000, seed: int = 0,
                        photo_dirs: Sequence[str | os.PathLike] | None = None) -> dict[str, Any]:
    """Write the photographs benchmark as WebDataset shards under ``out_dir``.

    Layout as ``demo-data``: ``train/photos-train-000000.tar``, ...,
    ``test/photos-test-000000.tar``, ..., ``classes.json``, plus ``photos.json`` (where each
    photograph came from, its SHA-256 and the regions each split was cropped from). Sample
    ``{split}-{index:06d}`` has ``.png``, ``.txt`` (caption), ``.cls`` (label) and ``.json``
    (label, class_name, attrs); classes are interleaved (label ``index % classes``). Every
    sample has its own RNG stream spawned from ``seed``, so equal arguments give
    byte-identical files. Raises :class:`UserError` when a photograph is missing or
    different (see :func:`find_photos`).

    Returns ``out_dir``, ``classes``, ``classes_path``, ``photos_path``, ``image_size``,
    ``seed``, ``samples_per_shard``, ``counts`` (per class and split) and ``splits``.
    """
    per_split = {"train": check_int("train_per_class", train_per_class, 1),
                 "test": check_int("test_per_class", test_per_class, 1)}
    image_size = check_int("image_size", image_size, 8)
    samples_per_shard = check_int("samples_per_shard", samples_per_shard, 1)
    seed = check_int("seed", seed, 0)

    sources = find_photos(photo_dirs)
    decoded = [_decode(path, data) for _, path, data in sources]
    root = Path(out_dir)
    n_classes = len(sources)
    split_seeds = dict(zip(("train", "test"), np.random.SeedSequence(seed).spawn(2)))
    splits: dict[str, Any] = {}
    for split, per_class in per_split.items():
        regions = [_Region(work, size, split) for work, size in decoded]

        def render(rng: np.random.Generator, index: int) -> Rendered:
            label = index % n_classes
            photo = sources[label][0]
            image, crop = regions[label].sample(rng, image_size)
            caption, words = _caption(rng, photo, crop, regions[label].height)
            return image, label, caption, {"label": label, "class_name": photo.name,
                                           "attrs": {"photo": photo.file, **crop, **words}}

        n = per_class * n_classes
        shards = write_split(root / split, "photos", split, split_seeds[split].spawn(n), samples_per_shard, render)
        splits[split] = {"n": n, "shards": shards}

    classes_path = root / "classes.json"
    _write_json(classes_path, [p.name for p, _, _ in sources])
    photos_path = root / "photos.json"
    _write_json(photos_path, {
        "seed": seed, "image_size": image_size, "crop_scale": list(CROP_SCALE),
        "train_region_fraction": list(TRAIN_REGION), "test_region_fraction": list(TEST_REGION),
        "photos": [{
            "label": label, "class_name": photo.name, "package": photo.package,
            "package_version": photo.version, "file": f"usr/share/backgrounds/{photo.file}",
            "sha256": photo.sha256, "author": photo.author, "license": photo.license,
            "size": list(size), "subject": photo.subject,
            "train_region": list(region_box(size, "train")), "test_region": list(region_box(size, "test")),
            "train": per_split["train"], "test": per_split["test"],
        } for label, ((photo, _, _), (_, size)) in enumerate(zip(sources, decoded))],
    })
    counts = {p.name: dict(per_split) for p, _, _ in sources}
    return {
        "out_dir": str(root), "classes": [p.name for p, _, _ in sources],
        "classes_path": str(classes_path), "photos_path": str(photos_path),
        "image_size": image_size, "seed": seed, "samples_per_shard": samples_per_shard,
        "counts": counts, "splits": splits,
    }
