"""decode_image records every conversion: 16-bit channels reduced to 8, embedded ICC
profiles converted to sRGB (or recorded as dropped), and converts big images without
whole-image copies."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from tests.shards.test_decode import _png_chunk, encode
from uge_protect.shards.decode import decode_image

# --- tiny ICC v2 profiles, built by hand (no profile files are shipped) -------------------------


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    # textDescriptionType: ASCII part, then empty Unicode (8 bytes) and ScriptCode (3 + 67) parts
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * (8 + 3 + 67)


def _profile(space: bytes, tags: dict[bytes, bytes]) -> bytes:
    table, data = b"", b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, payload in tags.items():
        payload += b"\0" * (-len(payload) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(payload))
        data += payload
    header = struct.pack(">I", offset + len(data)) + b"\0" * 4 + struct.pack(">I", 0x02100000)
    header += b"mntr" + space + b"XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


_D50 = _xyz(0.9642, 1.0, 0.8249)


def linear_rgb_profile(name: str = "linear sRGB") -> bytes:
    """sRGB primaries with a linear tone curve: sRGB value 188 encodes linear 128."""
    c = _curve(1.0)
    return _profile(b"RGB ", {
        b"desc": _desc(name), b"wtpt": _D50, b"rXYZ": _xyz(0.4361, 0.2225, 0.0139),
        b"gXYZ": _xyz(0.3851, 0.7169, 0.0971), b"bXYZ": _xyz(0.1431, 0.0606, 0.7141),
        b"rTRC": c, b"gTRC": c, b"bTRC": c,
    })


def linear_gray_profile(name: str = "linear gray") -> bytes:
    return _profile(b"GRAY", {b"desc": _desc(name), b"wtpt": _D50, b"kTRC": _curve(1.0)})


def with_profile(img: Image.Image, profile: bytes, fmt: str = "PNG") -> bytes:
    return encode(img, fmt, icc_profile=profile)


# --- 16-bit channels ------------------------------------------------------------------------------


def png16(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (colour type 2: RGB, 6: RGBA, 4: gray+alpha) of ``values`` (HxWxC uint16)."""
    h, w = values.shape[:2]
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def test_48_bit_rgb_png_records_its_depth():
    values = np.random.default_rng(0).integers(0, 65536, (3, 5, 3), dtype=np.uint16)
    img = decode_image(png16(values, 2))
    assert img.converted_from == "RGB;16"
    np.testing.assert_array_equal(img.pixels, (values >> 8).astype(np.uint8))  # Pillow keeps the high byte


@pytest.mark.parametrize("colour_type, channels, recorded", [(6, 4, "RGBA;16"), (4, 2, "LA;16")])
def test_16_bit_pngs_with_alpha_record_their_depth(colour_type, channels, recorded):
    values = np.full((2, 2, channels), 65535, dtype=np.uint16)
    img = decode_image(png16(values, colour_type))
    assert img.converted_from == recorded and img.pixels.shape == (2, 2, 3)


def test_8_bit_rgb_records_nothing():
    img = decode_image(encode(Image.new("RGB", (3, 3), (1, 2, 3))))
    assert img.converted_from == "" and img.icc_profile is None


# --- ICC profiles ---------------------------------------------------------------------------------


def test_rgb_profile_is_converted_to_srgb_and_recorded():
    img = decode_image(with_profile(Image.new("RGB", (4, 4), (128, 128, 128)), linear_rgb_profile()))
    assert img.icc_profile == "converted: linear sRGB"
    assert np.abs(img.pixels.astype(int) - 188).max() <= 1  # linear 0.5 is sRGB 188
    assert img.converted_from == ""


def test_srgb_profile_keeps_the_colours():
    arr = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = decode_image(with_profile(Image.fromarray(arr), srgb))
    assert img.icc_profile.startswith("converted: sRGB")
    assert np.abs(img.pixels.astype(int) - arr).max() <= 1


def test_profile_is_converted_before_transparency_is_composited():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 128
    rgba[0, 0, 3] = 0  # transparent: white whatever the profile
    rgba[1:, :, 3] = rgba[0, 1, 3] = 255
    img = decode_image(with_profile(Image.fromarray(rgba, "RGBA"), linear_rgb_profile()))
    assert img.converted_from == "RGBA" and img.icc_profile == "converted: linear sRGB"
    assert img.pixels[0, 0].tolist() == [255, 255, 255]
    assert np.abs(img.pixels[1, 1].astype(int) - 188).max() <= 1


@pytest.mark.parametrize("mode, value", [("L", 128), ("LA", (128, 255))])
def test_gray_profile_on_gray_pixels(mode, value):
    img = decode_image(with_profile(Image.new(mode, (3, 3), value), linear_gray_profile()))
    assert img.icc_profile == "converted: linear gray" and img.converted_from == mode
    assert np.abs(img.pixels.astype(int) - 188).max() <= 1


def test_palette_image_with_a_profile_is_converted():
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([128, 128, 128] + [0] * 765)
    img = decode_image(with_profile(pal, linear_rgb_profile()))
    assert img.icc_profile == "converted: linear sRGB" and img.converted_from == "P"
    assert np.abs(img.pixels.astype(int) - 188).max() <= 1


def test_jpeg_profile_is_converted():
    img = decode_image(with_profile(Image.new("RGB", (8, 8), (128, 128, 128)), linear_rgb_profile(), "JPEG"))
    assert img.icc_profile == "converted: linear sRGB"
    assert np.abs(img.pixels.astype(int) - 188).max() <= 3


@pytest.mark.parametrize(
    "profile, mode, expected",
    [
        (b"not an icc profile at all", "RGB", "dropped: unreadable ICC profile"),
        (linear_gray_profile(), "RGB", "dropped: a GRAY profile does not fit RGB pixels"),
        (linear_rgb_profile(), "L", "dropped: a RGB profile does not fit L pixels"),
    ],
    ids=["garbage", "gray-on-rgb", "rgb-on-gray"],
)
def test_unusable_profile_is_recorded_as_dropped_and_pixels_are_kept(profile, mode, expected):
    source = Image.new(mode, (3, 3), 100 if mode == "L" else (100, 150, 200))
    img = decode_image(with_profile(source, profile))
    assert img.icc_profile == expected
    np.testing.assert_array_equal(img.pixels, np.asarray(source.convert("RGB")))


# --- big images: strip conversion, orientation -------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16"])
def test_strip_conversion_matches_whole_image_conversion(mode, monkeypatch):
    monkeypatch.setattr("uge_protect.shards.decode._STRIP_PIXELS", 64)  # many strips of 2 rows
    rng = np.random.default_rng(3)
    if mode == "I;16":
        src = Image.fromarray(rng.integers(0, 65536, (37, 29), dtype=np.uint16))
    else:
        src = Image.fromarray(rng.integers(0, 256, (37, 29, 4), dtype=np.uint8), "RGBA")
        src = src if mode == "RGBA" else src.convert(mode)
    strips = decode_image(encode(src)).pixels
    monkeypatch.setattr("uge_protect.shards.decode._STRIP_PIXELS", 1 << 30)  # one strip
    np.testing.assert_array_equal(strips, decode_image(encode(src)).pixels)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_every_exif_orientation_matches_pillow(orientation):
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(arr), exif=exif.tobytes())
    img = decode_image(data)
    assert img.exif_rotated is True
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(img.pixels, expected)
    assert img.pixels.flags.c_contiguous and img.pixels.flags.writeable


def test_large_rgba_decode_makes_no_whole_image_copies():
    """A 16-Mpx RGBA image needs Pillow's copy (64 MB), the RGB output (48 MB) and a strip;
    converting the whole image at once took about three more whole-image copies."""
    data = encode(Image.new("RGBA", (4000, 4000), (10, 20, 30, 200)), compress_level=1)
    code = (  # in a fresh process, so the high-water mark is this decode's
        "import resource, sys\n"
        "from uge_protect.shards.decode import decode_image\n"
        "data = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "pixels = decode_image(data).pixels\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True).stdout
    assert int(out) < 160 * 2**20, f"{int(out) / 2**20:.0f} MiB"
