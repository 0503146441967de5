"""decode_image: conversions to RGB (recorded), EXIF rotation, bad bytes, pixel limits, resizing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uge_protect.shards.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_image,
    pick_image_field,
    resize_image,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_array(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def decode_error(data: bytes, **kw) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kw)
    return info.value


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int, *, bit_depth: int = 1, rows: int | None = None) -> bytes:
    """A grayscale PNG declaring width×height, its IDAT the zlib of all-zero rows.

    ``rows=None`` writes every row (a real, highly compressible bomb); a small ``rows`` keeps
    just the start (a huge declared size in a file of a few hundred bytes).
    """
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)  # filter byte + packed zero pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# --- plain RGB -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgb_lossless_decodes_exactly_and_records_nothing(fmt):
    arr = rgb_array()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    img = decode_image(encode(Image.fromarray(arr), fmt, **kw))
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == (6, 8, 3)
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.converted_from == "" and img.exif_rotated is False
    assert img.source_size == (8, 6)  # (width, height)
    assert img.pixels.flags.writeable and img.pixels.flags.c_contiguous


def test_rgb_jpeg_decodes_close_to_source():
    arr = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    img = decode_image(encode(Image.fromarray(arr), "JPEG", quality=95))
    assert img.converted_from == "" and img.pixels.shape == (16, 16, 3)
    assert np.abs(img.pixels.astype(int) - arr).max() <= 4


# --- conversions to RGB ------------------------------------------------------------------


def test_grayscale_is_replicated_to_three_channels():
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    img = decode_image(encode(Image.fromarray(gray, mode="L")))
    assert img.converted_from == "L"
    np.testing.assert_array_equal(img.pixels, np.repeat(gray[..., None], 3, axis=2))


def test_grayscale_with_transparency_is_composited_on_white():
    gray = np.full((4, 4), 10, np.uint8)
    gray[0, 0] = 77  # the transparent grey level
    img = decode_image(encode(Image.fromarray(gray, mode="L"), transparency=77))
    assert img.converted_from == "L"
    assert img.pixels[0, 0].tolist() == [255, 255, 255]
    assert img.pixels[1, 1].tolist() == [10, 10, 10]


def test_one_bit_image_is_converted():
    bits = Image.new("1", (5, 3), 0)
    bits.putpixel((0, 0), 1)
    img = decode_image(encode(bits))
    assert img.converted_from == "1"
    assert img.pixels[0, 0].tolist() == [255, 255, 255] and img.pixels[2, 4].tolist() == [0, 0, 0]


def test_rgba_transparency_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 20, 60)
    rgba[0, 0, 3] = 255  # opaque: colour kept
    rgba[0, 1, 3] = 0  # transparent: white
    rgba[0, 2, 3] = 128  # half: a blend towards white
    rgba[1, :, 3] = 255
    img = decode_image(encode(Image.fromarray(rgba, mode="RGBA")))
    assert img.converted_from == "RGBA"
    assert img.pixels[0, 0].tolist() == [200, 20, 60]
    assert img.pixels[0, 1].tolist() == [255, 255, 255]
    half = img.pixels[0, 2].astype(int)
    expected = np.array([200, 20, 60]) * 128 / 255 + 255 * 127 / 255
    assert np.abs(half - expected).max() <= 1


def test_grayscale_alpha_is_composited_on_white():
    la = Image.new("LA", (2, 1), (30, 255))
    la.putpixel((1, 0), (30, 0))
    img = decode_image(encode(la))
    assert img.converted_from == "LA"
    assert img.pixels[0].tolist() == [[30, 30, 30], [255, 255, 255]]


def _palette_image() -> Image.Image:
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0] + [0] * (256 * 3 - 9))
    pal.putpixel((1, 0), 1)
    pal.putpixel((2, 0), 2)
    return pal


def test_palette_without_transparency_uses_the_palette_colours():
    img = decode_image(encode(_palette_image()))
    assert img.converted_from == "P"
    assert img.pixels[0, :3].tolist() == [[255, 0, 0], [0, 0, 255], [0, 128, 0]]
    assert img.pixels[2, 3].tolist() == [255, 0, 0]


def test_palette_with_transparency_makes_transparent_entries_white():
    data = encode(_palette_image(), transparency=0)  # palette entry 0 (red) is transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    img = decode_image(data)
    assert img.converted_from == "P"
    assert img.pixels[0, :3].tolist() == [[255, 255, 255], [0, 0, 255], [0, 128, 0]]


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.converted_from == "CMYK" and img.pixels.shape == (8, 8, 3)
    assert np.abs(img.pixels.reshape(-1, 3).astype(int) - [255, 0, 0]).max() <= 3


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = decode_image(data)
    assert img.converted_from == "I;16" and img.pixels.shape == (2, 4, 3)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(img.pixels[..., 0], expected)
    np.testing.assert_array_equal(img.pixels[..., 1], img.pixels[..., 2])


def test_gif_in_a_mislabelled_field_is_accepted():
    img = decode_image(encode(_palette_image(), "GIF"))
    assert img.converted_from == "P" and img.pixels.shape == (3, 4, 3)


# --- EXIF orientation --------------------------------------------------------------------


def _with_orientation(arr: np.ndarray, orientation: int, fmt: str = "PNG", **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), fmt, exif=exif.tobytes(), **kw)


def test_exif_orientation_6_rotates_clockwise_and_swaps_dimensions():
    arr = rgb_array(h=4, w=7)
    img = decode_image(_with_orientation(arr, 6))
    assert img.exif_rotated is True
    assert img.pixels.shape == (7, 4, 3)  # height and width swapped
    assert img.source_size == (7, 4)  # as stored in the file
    np.testing.assert_array_equal(img.pixels, np.rot90(arr, k=-1))  # 90° clockwise
    assert img.converted_from == ""


def test_exif_rotated_jpeg():
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = 255  # left half white
    img = decode_image(_with_orientation(arr, 6, "JPEG", quality=95))
    assert img.exif_rotated is True and img.pixels.shape == (32, 16, 3)
    assert img.pixels[2, 8].min() > 200 and img.pixels[-3, 8].max() < 50  # left half → top


@pytest.mark.parametrize("orientation", [1, 0, 9])
def test_identity_or_invalid_orientation_is_not_reported_as_rotated(orientation):
    arr = rgb_array(h=4, w=7)
    img = decode_image(_with_orientation(arr, orientation))
    assert img.exif_rotated is False
    np.testing.assert_array_equal(img.pixels, arr)


# --- bad bytes ---------------------------------------------------------------------------


def test_empty_image():
    err = decode_error(b"")
    assert err.reason == "empty_image"


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"\x13" * 50],
    ids=["garbage", "png-signature-only", "jpeg-soi-garbage"],
)
def test_undecodable_bytes(data):
    err = decode_error(data)
    assert err.reason == "undecodable_image"
    assert "0x" not in err.detail  # no object addresses: manifests stay reproducible


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image_is_undecodable(fmt):
    data = encode(Image.fromarray(rgb_array(32, 32)), fmt)
    err = decode_error(data[: len(data) // 2])
    assert err.reason == "undecodable_image"


def test_formats_outside_the_accepted_list_are_refused():
    for fmt in ("PPM", "TGA", "EPS"):
        err = decode_error(encode(Image.fromarray(rgb_array()), fmt))
        assert err.reason == "undecodable_image", fmt


def test_decode_error_carries_reason_and_detail():
    err = DecodeError("too_many_pixels", "9x9")
    assert (err.reason, err.detail, str(err)) == ("too_many_pixels", "9x9", "too_many_pixels: 9x9")
    assert str(DecodeError("no_image")) == "no_image"


# --- pixel limits ------------------------------------------------------------------------


def test_max_pixels_is_inclusive():
    data = encode(Image.fromarray(rgb_array(h=10, w=12)))
    assert decode_image(data, max_pixels=120).pixels.shape == (10, 12, 3)
    for limit in (119, 60, 10):  # above the limit, and far above it (Pillow's own check)
        assert decode_error(data, max_pixels=limit).reason == "too_many_pixels"


def test_decompression_bomb_png_is_refused_without_decoding():
    bomb = bomb_png(100_000, 100_000, bit_depth=8, rows=4)
    assert len(bomb) < 1_000  # a huge declared size in a tiny file
    assert decode_error(bomb).reason == "too_many_pixels"
    assert "100000" in decode_error(bomb).detail


def test_real_compressible_bomb_is_refused_at_the_default_limit():
    bomb = bomb_png(12_000, 12_000)  # 144 M pixels of zeros
    assert len(bomb) < 64_000
    assert 12_000 * 12_000 > DEFAULT_MAX_PIXELS
    assert decode_error(bomb).reason == "too_many_pixels"
    # under a generous limit the same bytes are a valid image (so it was the limit that refused)
    small = bomb_png(300, 200)
    assert decode_image(small, max_pixels=60_000).pixels.shape == (200, 300, 3)


def test_pixel_limit_does_not_leak_into_pillow():
    before = Image.MAX_IMAGE_PIXELS
    decode_error(encode(Image.fromarray(rgb_array(h=20, w=20))), max_pixels=10)
    decode_image(encode(Image.fromarray(rgb_array())), max_pixels=1_000)
    assert Image.MAX_IMAGE_PIXELS == before
    # an unrelated read of a bigger image still works
    Image.open(io.BytesIO(encode(Image.fromarray(rgb_array(h=64, w=64))))).load()


# --- resizing ----------------------------------------------------------------------------


def test_resize_none_keeps_the_image():
    arr = rgb_array(h=20, w=40)
    img = decode_image(encode(Image.fromarray(arr)), image_size=16, resize_mode="none")
    np.testing.assert_array_equal(img.pixels, arr)


@pytest.mark.parametrize(
    "size, mode, expected",
    [
        ((40, 20), "center_crop", (16, 16)),
        ((20, 40), "center_crop", (16, 16)),
        ((40, 20), "keep_ratio", (16, 32)),  # (height, width): shorter side → 16
        ((20, 40), "keep_ratio", (32, 16)),
        ((8, 8), "keep_ratio", (16, 16)),  # small images are scaled up
        ((16, 16), "center_crop", (16, 16)),
    ],
)
def test_resize_modes(size, mode, expected):
    w, h = size
    img = decode_image(encode(Image.fromarray(rgb_array(h=h, w=w))), image_size=16, resize_mode=mode)
    assert img.pixels.shape == (*expected, 3)
    assert img.source_size == (w, h)


def test_center_crop_takes_the_centre():
    arr = np.zeros((16, 48, 3), np.uint8)
    arr[:, 16:32] = 255  # only the middle third is white
    out = resize_image(Image.fromarray(arr), 16, "center_crop")
    assert out.size == (16, 16)
    assert np.asarray(out).min() == 255


def test_same_size_is_left_untouched():
    arr = rgb_array(h=16, w=16)
    for mode in ("center_crop", "keep_ratio"):
        np.testing.assert_array_equal(np.asarray(resize_image(Image.fromarray(arr), 16, mode)), arr)


def test_resize_without_size_is_a_no_op_and_unknown_modes_are_refused():
    img = Image.fromarray(rgb_array())
    assert resize_image(img, None, "center_crop") is img
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_image(img, 16, "stretch")
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize_image(img, None, "stretch")
    with pytest.raises(ValueError, match="unknown resize mode"):
        decode_image(encode(img), image_size=16, resize_mode="stretch")


def test_resize_happens_after_rotation_and_conversion():
    gray = np.zeros((10, 30), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = decode_image(encode(Image.fromarray(gray, mode="L"), exif=exif.tobytes()), image_size=5, resize_mode="keep_ratio")
    assert img.pixels.shape == (15, 5, 3)  # rotated to 10 wide × 30 high, then shorter side → 5
    assert img.converted_from == "L" and img.exif_rotated


def test_pick_image_field():
    assert pick_image_field({"txt": b"", "jpg": b"", "json": b""}) == ["jpg"]
    assert pick_image_field({"PNG": b"", "cls": b""}) == ["PNG"]
    assert pick_image_field({"png": b"", "webp": b""}) == ["png", "webp"]
    assert pick_image_field({"txt": b"", "seg.png": b""}) == ["seg.png"]  # never copied unprotected
    assert pick_image_field({"png.txt": b""}) == []


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(np.sin(x / 9) + 1) * 120, (np.cos(y / 13) + 1) * 110, (x + 2 * y) % 200], -1).astype(np.uint8)


def _reference(data: bytes, size: int, mode: str, draft: tuple[int, int] | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if draft:
            im.draft(im.mode, draft)
        return np.asarray(resize_image(im.convert("RGB"), size, mode))


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio"])
def test_a_jpeg_shrunk_by_a_quarter_decodes_at_a_reduced_dct_scale(mode):
    data = encode(Image.fromarray(_smooth(160, 240)), "JPEG", quality=95)
    img = decode_image(data, image_size=32, resize_mode=mode)
    # the decoder's 1/4 scale (60x40 ≥ the 48x32 intermediate), then the usual bicubic step
    np.testing.assert_array_equal(img.pixels, _reference(data, 32, mode, draft=(48, 32)))
    full = _reference(data, 32, mode)
    assert img.pixels.shape == full.shape and img.source_size == (240, 160)
    assert not np.array_equal(img.pixels, full)  # the DCT-scaled path was taken
    assert np.abs(img.pixels.astype(int) - full).mean() < 2  # and it is the same picture
    np.testing.assert_array_equal(decode_image(data, image_size=32, resize_mode=mode).pixels, img.pixels)


def test_dct_scaling_is_only_for_jpegs_shrunk_by_half_or_more():
    arr = _smooth(160, 240)
    jpeg, png = encode(Image.fromarray(arr), "JPEG", quality=95), encode(Image.fromarray(arr))
    # shrinking by less than half: the full decode
    np.testing.assert_array_equal(decode_image(jpeg, image_size=100, resize_mode="center_crop").pixels,
                                  _reference(jpeg, 100, "center_crop"))
    # a PNG is never drafted; no resize keeps every pixel
    np.testing.assert_array_equal(decode_image(png, image_size=32, resize_mode="center_crop").pixels,
                                  _reference(png, 32, "center_crop"))
    assert decode_image(jpeg).pixels.shape == (160, 240, 3)


def test_dct_scaling_keeps_exif_rotation_and_the_pixel_limit():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(_smooth(160, 240)), "JPEG", quality=95, exif=exif.tobytes())
    img = decode_image(data, image_size=32, resize_mode="keep_ratio")
    assert img.pixels.shape == (48, 32, 3) and img.exif_rotated  # 160 wide × 240 high after rotation
    # the limit judges the stored size, not the reduced decode
    assert decode_error(data, max_pixels=240 * 160 - 1, image_size=32, resize_mode="keep_ratio").reason == "too_many_pixels"
