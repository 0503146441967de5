"""The PNG writer of protected images: standard files that decode to the exact pixels."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from uge_protect.pipeline.png import SIGNATURE, encode_png


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.startswith(SIGNATURE)
    out, pos = [], len(SIGNATURE)
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + body)
        out.append((kind, body))
        pos += 12 + n
    return out


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 9, 3), (7, 1, 3), (31, 45, 3), (64, 64, 3)])
@pytest.mark.parametrize("level,strategy", [(0, 0), (1, 2), (6, 0), (9, 1), (1, 3)])
def test_decodes_to_the_exact_pixels_with_every_setting(shape, level, strategy):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(pixels, level, strategy)
    Image.open(io.BytesIO(data)).verify()  # CRCs and structure, by Pillow's reader
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(img), pixels)


def test_only_the_three_required_chunks_and_a_standard_header():
    data = encode_png(np.zeros((3, 5, 3), np.uint8))
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (5, 3, 8, 2, 0, 0, 0)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == 3 * (1 + 5 * 3) and all(raw[r * 16] == 1 for r in range(3))  # each row: Sub


def test_same_pixels_same_bytes_and_views_are_encoded_as_their_values():
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert encode_png(pixels) == encode_png(pixels.copy())
    flipped = pixels[:, ::-1]  # not contiguous
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(flipped)))), flipped)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.int16), np.zeros((0, 4, 3), np.uint8)])
def test_refuses_what_is_not_rgb_uint8_pixels(bad):
    with pytest.raises(ValueError):
        encode_png(bad)
