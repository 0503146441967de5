"""Hostile images end to end: extra image members in any format or under any name, keys
with control characters, recorded colour conversions, and the pixel budget per batch."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, write_shard
from tests.pipeline.test_bad_input import check_accounting, output_members, rows_of, run
from tests.pipeline.test_shard_run import output_bytes
from tests.shards.test_colour_profiles import linear_rgb_profile, png16
from tests.shards.test_image_members import REGISTERED, saved
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.pipeline.records import SampleRecord
from uge_protect.pipeline.source import batch_records, is_unsafe_key, printable_key
from uge_protect.shards.tario import iter_tar_samples

Image.init()
FORMAT_OF = {ext.lstrip(".").lower(): fmt for ext, fmt in Image.registered_extensions().items()}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def output_fields(out, name) -> dict[str, dict[str, bytes]]:
    with open(out / "shards" / name, "rb") as f:
        return {s.key: s.fields for s in iter_tar_samples(f)}


# --- a second image, in any format, under any name -----------------------------------------------


@pytest.fixture(scope="module")
def members_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    rng = np.random.default_rng(5)
    img = lambda: png_bytes(random_image(rng))  # noqa: E731
    tiff = encode(Image.fromarray(random_image(rng)), "TIFF")
    samples = [("good", {"png": img(), "txt": b"caption"})]
    for ext in REGISTERED:  # the real format where Pillow can write it, else only the name
        if ext != "png":
            samples.append((f"ext-{ext}", {"png": img(), ext: saved(FORMAT_OF[ext]) or b"\x00 opaque", "txt": b"x"}))
    samples += [
        ("upper-PPM", {"jpg": encode(Image.new("RGB", (8, 8)), "JPEG"), "PPM": saved("PPM")}),
        ("thumb", {"png": img(), "thumb.tif": tiff}),
        ("txt-png-and-jpg", {"jpg": encode(Image.new("RGB", (8, 8)), "JPEG"), "txt": img()}),
        ("json-tiff", {"png": img(), "json": tiff}),
        ("eps-in-bin", {"png": img(), "bin": saved("EPS")}),
        ("tif-alone", {"tif": tiff, "txt": b"a tiff"}),
        ("tiff-in-png", {"png": tiff, "txt": b"tiff bytes named png"}),
        ("png-in-txt", {"txt": img(), "cls": b"1"}),
        ("ppm-alone", {"ppm": saved("PPM"), "txt": b"not decoded"}),
        ("good-2", {"png": img(), "txt": b"caption"}),
    ]
    shard = write_shard(root / "members.tar", samples)
    out = root / "out"
    run([shard], out, batch_size=8)
    return shard, samples, out


def test_every_registered_extension_next_to_a_png_fails_and_is_not_written(members_run):
    shard, samples, out = members_run
    rows = {r["key"]: r for r in check_accounting(out, shard.name, [k for k, _ in samples])}
    multiple = [k for k in rows if k.startswith("ext-")] + ["upper-PPM", "thumb", "txt-png-and-jpg", "json-tiff", "eps-in-bin"]
    assert len(multiple) >= len(REGISTERED) + 4
    for key in multiple:
        assert (rows[key]["status"], rows[key]["reason"]) == ("failed", "multiple_images"), key
    written = output_fields(out, shard.name)
    assert not set(multiple) & set(written)
    assert not any(n.startswith("ext-") for n in output_members(out, shard.name))


def test_one_image_in_an_accepted_format_is_protected_whatever_its_name(members_run):
    shard, _, out = members_run
    rows, written = {r["key"]: r for r in rows_of(out, shard.name)}, output_fields(out, shard.name)
    for key, field in [("tif-alone", "tif"), ("tiff-in-png", "png"), ("png-in-txt", "txt")]:
        assert rows[key]["status"] == "ok" and rows[key]["image_field"] == field, key
        assert set(written[key]) == {"png"} | ({"txt"} if key != "png-in-txt" else {"cls"}), written[key].keys()
        assert Image.open(io.BytesIO(written[key]["png"])).format == "PNG"
    assert written["tif-alone"]["txt"] == b"a tiff"
    assert inspect_output(out)["problems"] == []


def test_one_image_in_another_format_fails_and_is_not_copied(members_run):
    shard, _, out = members_run
    row = {r["key"]: r for r in rows_of(out, shard.name)}["ppm-alone"]
    assert row["status"] == "failed" and row["reason"].startswith("undecodable_image: PPM is not an accepted")
    assert "ppm-alone" not in output_fields(out, shard.name)


# --- keys with control characters ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["a\x01b", "line\nbreak", "tab\there", "esc\x1b[31m", "del\x7f", "c1\x85x", "c1\x9f"])
def test_control_characters_make_a_key_unsafe(key):
    assert is_unsafe_key(key)
    assert printable_key(key).isprintable()


@pytest.mark.parametrize("key", ["caf\u00e9", "nbsp\u00a0x", "日本/写真", "emoji-🌃"])
def test_printable_non_ascii_keys_stay_safe(key):
    assert not is_unsafe_key(key) and printable_key(key) == key


def test_control_character_keys_are_refused_and_never_written(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "ctl.tar"
    keys = ["ok", "a\x01b", "line\nbreak", "del\x7f", "c1\x85"]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key in keys:
            for ext, data in (("png", png_bytes(random_image(rng))), ("txt", b"caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run([path], out)
    rows = check_accounting(out, "ctl.tar", ["ok", "a\\x01b", "line\\x0abreak", "del\\x7f", "c1\\x85"])
    assert [(r["status"], r["reason"]) for r in rows[1:]] == [("failed", "unsafe_key")] * 4
    assert output_members(out, "ctl.tar") == ["ok.png", "ok.txt"]
    assert inspect_output(out)["problems"] == []


# --- conversions recorded in the manifest ---------------------------------------------------------


def test_bit_depth_and_icc_conversions_are_recorded(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (8, 8, 3), dtype=np.uint16)
    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    shard = write_shard(tmp_path / "colour.tar", [
        ("rgb48", {"png": png16(values, 2)}),
        ("icc", {"png": encode(grey, "PNG", icc_profile=linear_rgb_profile())}),
        ("icc-jpeg", {"jpg": encode(grey, "JPEG", quality=95, icc_profile=linear_rgb_profile("wide"))}),
        ("bad-icc", {"png": encode(grey, "PNG", icc_profile=b"garbage")}),
        ("plain", {"png": encode(grey, "PNG")}),
    ])
    out = tmp_path / "out"
    run([shard], out)
    rows = {r["key"]: r for r in check_accounting(out, "colour.tar", ["rgb48", "icc", "icc-jpeg", "bad-icc", "plain"])}
    assert {k: (r["converted_from"], r["icc_profile"]) for k, r in rows.items()} == {
        "rgb48": ("RGB;16", None),
        "icc": (None, "converted: linear sRGB"),
        "icc-jpeg": (None, "converted: wide"),
        "bad-icc": (None, "dropped: unreadable ICC profile"),
        "plain": (None, None),
    }
    written = output_fields(out, "colour.tar")
    protected = np.asarray(Image.open(io.BytesIO(written["icc"]["png"])), dtype=int)
    assert np.abs(protected - 188).max() <= 1 + 8  # sRGB 188 (linear 128), within the budget
    assert "icc_profile" not in Image.open(io.BytesIO(written["icc"]["png"])).info
    assert inspect_output(out)["problems"] == []  # inspect re-decodes the sources the same way


# --- pixel budget per batch -----------------------------------------------------------------------


def _records(sizes: list[int | None]) -> list[SampleRecord]:
    recs = []
    for i, side in enumerate(sizes):
        rec = SampleRecord(key=f"k{i}", index=i)
        if side is None:
            rec.fail("undecodable_image")
        else:
            rec.pixels = torch.zeros((side, side, 3), dtype=torch.uint8)
        recs.append(rec)
    return recs


def test_batches_stay_within_the_pixel_budget():
    sizes = [10, 10, 10, None, 20, 5, 5, 5, 30, 1]  # pixels: 100 ×3, 0, 400, 25 ×3, 900, 1
    batches = list(batch_records(_records(sizes), "s.tar", batch_size=4, max_pixels=300))
    keys = [[r.key for r in b.records] for b in batches]
    assert keys == [["k0", "k1", "k2", "k3"], ["k4"], ["k5", "k6", "k7"], ["k8"], ["k9"]]
    assert [b.last for b in batches] == [False] * 4 + [True]
    for b in batches:  # over the budget only as a batch of one image
        pixels = sum(r.pixels.shape[0] * r.pixels.shape[1] for r in b.records if r.pixels is not None)
        assert pixels <= 300 or len(b.records) == 1


def test_default_budget_keeps_batches_of_small_images_whole():
    batches = list(batch_records(_records([64] * 10), "s.tar", batch_size=4))
    assert [len(b.records) for b in batches] == [4, 4, 2]


def test_pixel_budget_does_not_change_output_bytes(tmp_path):
    rng = np.random.default_rng(9)
    samples = [(f"k{i:02d}", {"png": png_bytes(random_image(rng, *hw)), "txt": b"c"})
               for i, hw in enumerate([(24, 24), (40, 30), (24, 24), (8, 64), (40, 30), (24, 24), (33, 17)])]
    samples.insert(3, ("broken", {"png": b"\x89PNG broken"}))
    shard = write_shard(tmp_path / "sizes.tar", samples)
    run([shard], tmp_path / "default", batch_size=4)
    for budget in (1, 1500):
        run([shard], tmp_path / f"b{budget}", batch_size=4, max_batch_pixels=budget)
        assert output_bytes(tmp_path / f"b{budget}") == output_bytes(tmp_path / "default")


def test_max_batch_pixels_is_validated_and_reaches_the_cli(tmp_path):
    shard = write_shard(tmp_path / "one.tar", [("k", {"png": png_bytes(random_image(np.random.default_rng(0)))})])
    with pytest.raises(UserError, match="--max-batch-pixels must be positive"):
        run([shard], tmp_path / "bad", max_batch_pixels=0)
    result = CliRunner().invoke(app, ["shard", str(shard), "-o", str(tmp_path / "cli"), "-m", "random", "-q",
                                      "--workers", "0", "--max-batch-pixels", "0"])
    assert result.exit_code == 2 and "--max-batch-pixels must be positive" in result.output
    result = CliRunner().invoke(app, ["shard", str(shard), "-o", str(tmp_path / "cli"), "-m", "random", "-q",
                                      "--workers", "0", "--max-batch-pixels", "100"])
    assert result.exit_code == 0, result.output
