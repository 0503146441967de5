"""Which members of a sample are images: by extension (every one Pillow registers) and by
content (whatever the name); only the accepted formats are decoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from uge_protect.shards.decode import (
    ACCEPTED_FORMATS,
    DecodeError,
    decode_image,
    identify_image,
    image_extensions,
    pick_image_field,
)

Image.init()
REGISTERED = sorted({ext.lstrip(".").lower() for ext in Image.registered_extensions()})


def saved(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes | None:
    """A small picture in Pillow format ``fmt``, or None when Pillow cannot write one here."""
    if fmt not in Image.SAVE:
        return None
    for mode in ("RGB", "L", "1", "P"):
        buf = io.BytesIO()
        try:
            Image.new("RGB", size, (200, 30, 60)).convert(mode).save(buf, format=fmt)
        except Exception:
            continue
        return buf.getvalue()
    return None


#: Formats Pillow can both write and open again (PDF and PALM are write-only).
ROUND_TRIP = [fmt for fmt in sorted(Image.SAVE) if fmt in Image.OPEN and saved(fmt) is not None]


@pytest.mark.parametrize("ext", REGISTERED)
def test_every_registered_extension_is_an_image_by_name(ext):
    fields = {"png": b"", ext: b"not really an image", "txt": b"caption"}
    assert ext in image_extensions()
    assert pick_image_field(fields) == (["png"] if ext == "png" else ["png", ext])
    assert pick_image_field({"txt": b"", f"thumb.{ext.upper()}": b"x"}) == [f"thumb.{ext.upper()}"]


@pytest.mark.parametrize("fmt", ROUND_TRIP)
def test_every_format_pillow_opens_is_an_image_by_content(fmt):
    data = saved(fmt)
    assert identify_image(data) is not None
    assert pick_image_field({"jpg": b"", "bin": data, "txt": b"caption"}) == ["jpg", "bin"]


def test_text_members_are_not_images():
    for text in (b"", b"a photo of a cat", b'{"caption": "x", "label": 3}', b"7", b"P3 engine", b"P1 hello"):
        assert identify_image(text) is None, text
    assert pick_image_field({"txt": b"P6 camera", "json": b"{}", "cls": b"1", "png.txt": b""}) == []


def test_png_bytes_under_txt_are_an_image():
    png = saved("PNG")
    assert pick_image_field({"txt": png}) == ["txt"]
    assert pick_image_field({"jpg": saved("JPEG"), "txt": png}) == ["jpg", "txt"]


def test_eps_is_recognised_by_its_signature_without_being_opened(monkeypatch):
    eps = saved("EPS")
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("EPS must not reach Image.open"))
    assert identify_image(eps) == "EPS"
    assert identify_image(b"%!PS-Adobe-3.0 EPSF-3.0\n") == "EPS"


def test_decompression_bomb_header_still_counts_as_an_image():
    from tests.shards.test_decode import bomb_png

    assert identify_image(bomb_png(100_000, 100_000, bit_depth=8, rows=2)) is not None


def test_tiff_is_decoded_whatever_its_name():
    arr = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    np.testing.assert_array_equal(decode_image(buf.getvalue()).pixels, arr)


@pytest.mark.parametrize("fmt", [f for f in ROUND_TRIP if f not in ACCEPTED_FORMATS and f != "MPO"])
def test_formats_outside_the_accepted_list_fail_and_name_their_format(fmt):
    with pytest.raises(DecodeError) as info:
        decode_image(saved(fmt))
    assert info.value.reason == "undecodable_image"
    assert "is not an accepted image format" in info.value.detail, info.value.detail
