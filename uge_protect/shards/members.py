"""What the members of a sample are: images, data that may carry pixels, or plain data.

The rule behind "no image is ever copied out as it came in":
- a member is an **image** when its extension (last dot-part, any case) is an image extension
  (every extension Pillow registers, plus :data:`EXTRA_IMAGE_EXTENSIONS`), or when Pillow can
  open its bytes, whatever its name;
- a member compressed with gzip, bzip2 or xz (by extension or by its magic bytes) is judged by
  what it holds (webdataset's reader un-gzips ``KEY.png.gz`` by default);
- a member is **opaque** when webdataset's default decoders turn it into an array, a tensor
  or an arbitrary object (``npy``, ``pth``, pickles — which run code when read — ...), or it
  is a video: it can carry the picture unprotected and cannot be protected, so a sample with
  one fails. So does a compressed member too large to look inside.
Everything else (captions, labels, JSON) is copied byte-for-byte.
"""

from __future__ import annotations

import bz2
import functools
import io
import lzma
import warnings
import zlib

from PIL import Image

#: Extensions counted as images even when no installed Pillow plugin registers them
#: (other libraries decode them); Pillow's own registered extensions are added at call time.
EXTRA_IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "heic", "heif", "avif", "jxl", "svg", "svgz"})

#: Extensions that webdataset decodes into arrays, tensors or objects by default, and videos.
OPAQUE_EXTENSIONS = frozenset(
    "pyd pickle pkl pth pt ten tb mp msg msgpack npy npz cbor safetensors "
    "mp4 ogv mjpeg avi mov h264 mpg mpeg webm wmv mkv".split()
)

#: Magic bytes of formats that are opaque whatever the member's name.
_OPAQUE_MAGIC = (b"\x93NUMPY",)

#: Most bytes a compressed member may expand to while we look inside it.
MAX_PEELED_BYTES = 64 << 20
#: Compression layers looked through (``x.png.gz.bz2``).
_MAX_LAYERS = 3

#: Formats never given to Pillow's opener when sniffing content. EPS is recognised by its
#: signature alone (Pillow's EPS plugin is the one that hands files to Ghostscript).
_NOT_SNIFFED = frozenset({"EPS"})

IMAGE, OPAQUE, DATA = "image", "opaque", "data"


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (no dot) that make a member an image: every extension an
    installed Pillow plugin registers, plus :data:`EXTRA_IMAGE_EXTENSIONS`."""
    registered = Image.registered_extensions()  # runs Image.init() once
    return _extensions_of(tuple(registered))


@functools.lru_cache(maxsize=4)
def _extensions_of(registered: tuple[str, ...]) -> frozenset[str]:
    """Built again only when a plugin registered more extensions."""
    return EXTRA_IMAGE_EXTENSIONS | {ext.lstrip(".").lower() for ext in registered}


def _sniff_formats() -> list[str]:
    Image.init()
    return [fmt for fmt in Image.OPEN if fmt not in _NOT_SNIFFED]


def _eps_signature(data: bytes) -> bool:
    return data.startswith(b"%!PS") or data.startswith(b"\xc5\xd0\xd3\xc6")


def identify_image(data: bytes) -> str | None:
    """The Pillow format that ``data`` opens as, or None.

    Only the header is read (``Image.open`` is lazy; no pixels are decoded), no external
    program is run, and a size over Pillow's bomb limit still counts as an image.
    """
    if not data:
        return None
    if _eps_signature(data):
        return "EPS"
    if len(data) <= _CACHED_BYTES:  # labels and short captions repeat: each is opened once
        return _identify_short(data, len(Image.OPEN))
    return _identify(data)


#: Members up to this size have their identification cached (by content).
_CACHED_BYTES = 256


@functools.lru_cache(maxsize=4096)
def _identify_short(data: bytes, plugins: int) -> str | None:
    """:func:`_identify`, cached (``plugins``: looked again once more plugins are registered)."""
    return _identify(data)


def _identify(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=_sniff_formats()) as img:
                return img.format or "unknown"
    except Image.DecompressionBombError:
        return "unknown"
    except Exception:  # not an image, or one Pillow cannot open: nobody decodes it with Pillow
        return None


class _TooLarge(Exception):
    pass


def _decompress_all(make, data: bytes) -> bytes:
    """Every stream of ``data`` (gzip, bzip2 and xz files may hold several, and their readers
    return them all, one after the other), never more than :data:`MAX_PEELED_BYTES`."""
    out = bytearray()
    rest = data
    while rest:
        d = make()
        out += d.decompress(rest, MAX_PEELED_BYTES + 1 - len(out))
        if len(out) > MAX_PEELED_BYTES:
            raise _TooLarge
        if not d.eof:
            break  # cut short: what came out is all a reader gets too
        rest = d.unused_data
    return bytes(out)


#: extension → (magic bytes, a fresh decompressor)
_COMPRESSIONS = {
    "gz": (b"\x1f\x8b", lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)),
    "bz2": (b"BZh", bz2.BZ2Decompressor),
    "xz": (b"\xfd7zXZ\x00", lzma.LZMADecompressor),
}


def _peel(name: str, data: bytes) -> tuple[str, bytes] | None:
    """One compression layer off (``x.png.gz`` → ``x.png``), or None when not compressed.
    Raises ``_TooLarge`` for a member that expands past :data:`MAX_PEELED_BYTES`, and
    ``ValueError``-like errors for damaged data (then it is not looked into)."""
    head, _, last = name.lower().rpartition(".")
    for ext, (magic, make) in _COMPRESSIONS.items():
        if last == ext or data.startswith(magic):
            try:
                inner = _decompress_all(make, data)
            except _TooLarge:
                raise
            except Exception:
                return None  # not really compressed (a caption that starts like a magic)
            return (head if last == ext else name), inner
    return None


def member_kind(name: str, data: bytes) -> str:
    """:data:`IMAGE`, :data:`OPAQUE` or :data:`DATA` for the member ``KEY.<name>`` (see the
    module docstring for the rule)."""
    images = image_extensions()
    for _ in range(_MAX_LAYERS + 1):
        last = name.lower().rsplit(".", 1)[-1]
        if last in images or identify_image(data) is not None:
            return IMAGE
        if last in OPAQUE_EXTENSIONS or data.startswith(_OPAQUE_MAGIC):
            return OPAQUE
        try:
            peeled = _peel(name, data)
        except _TooLarge:
            return OPAQUE
        if peeled is None:
            return DATA
        name, data = peeled
    return OPAQUE  # more layers than anyone uses: not looked into further


def member_kinds(fields: dict[str, bytes]) -> dict[str, str]:
    """:func:`member_kind` of every field of a sample, in sample order (each member is
    looked at once; pass the result to :func:`pick_image_field` and :func:`opaque_fields`)."""
    return {name: member_kind(name, data) for name, data in fields.items()}


def pick_image_field(fields: dict[str, bytes], kinds: dict[str, str] | None = None) -> list[str]:
    """The fields of a sample that hold an image, in sample order (see :func:`member_kind`;
    ``kinds``: the sample's :func:`member_kinds`, when already known).

    The pipeline protects a sample's image only when there is exactly one
    (``multiple_images`` otherwise): an image is never copied out as it came in.
    """
    kinds = kinds if kinds is not None else member_kinds(fields)
    return [name for name in fields if kinds[name] == IMAGE]


def opaque_fields(fields: dict[str, bytes], kinds: dict[str, str] | None = None) -> list[str]:
    """The fields that may carry pixels but cannot be protected (arrays, tensors, pickles,
    videos, compressed members too large to look into)."""
    kinds = kinds if kinds is not None else member_kinds(fields)
    return [name for name in fields if kinds[name] == OPAQUE]
