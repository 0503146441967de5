"""Bad input end to end: every sample is accounted for, nothing unprotected is written.

Per-sample failures: one manifest row per input sample, status ``failed`` with a reason code,
and the failed sample's key absent from the output tar. Damaged tars: samples before the damage
are protected, the damage is recorded (``corrupt_tar``), the run finishes and ``inspect`` passes.
User errors in the CLI: one ``error:`` line, a non-zero exit, no traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, simple_samples, write_shard
from tests.shards.test_decode import bomb_png
from uge_protect.cli.app import app
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.pipeline.source import is_unsafe_key
from uge_protect.pipeline.writer import reason_code
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.manifest import read_manifest
from uge_protect.shards.tario import iter_tar_samples
from uge_protect.methods.registry import create_method

runner = CliRunner()
UGE_PROTECT = Path(sys.executable).with_name("uge-protect")


def run(inputs, out, **kw):
    """Protect with ``random``; these inputs are bad on purpose, so no failure share stops the run."""
    kw.setdefault("num_workers", 0)
    kw.setdefault("max_failure_rate", 1.0)
    cfg = ShardJobConfig(inputs=[str(p) for p in inputs], output=str(out), quiet=True, **kw)
    return run_shard_job(cfg, create_method("random"))


def rows_of(out: Path, name: str) -> list[dict]:
    return read_manifest(OutputLayout(out).manifest(name)).to_pylist()


def output_members(out: Path, name: str) -> list[str]:
    """Member names of an output shard, read with the standard library."""
    with tarfile.open(OutputLayout(out).shard(name)) as tar:
        return tar.getnames()


def output_samples(out: Path, name: str):
    with open(OutputLayout(out).shard(name), "rb") as f:
        return list(iter_tar_samples(f))  # raises on a damaged output


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def check_accounting(out: Path, name: str, input_keys: list[str]) -> list[dict]:
    """The invariants every run must keep for one shard; returns the manifest rows."""
    rows = rows_of(out, name)
    assert [r["key"] for r in rows] == input_keys  # one row per input sample, in order
    assert [r["index"] for r in rows] == list(range(len(rows)))
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    assert all(r["status"] == "failed" and r["reason"] for r in failed)
    assert all(r["reason"] is None and r["output_shard"] == name for r in ok)
    written = output_samples(out, name)
    assert [s.key for s in written] == [r["key"] for r in ok]
    failed_only = {r["key"] for r in failed} - {r["key"] for r in ok}
    assert not failed_only & {s.key for s in written}
    for s, r in zip(written, ok):  # what is written is what the manifest says was written
        assert hashlib.sha256(s.fields["png"]).hexdigest() == r["sha256_protected"]
    layout = OutputLayout(out)
    assert json.loads(layout.sizes_file.read_text())[name] == len(ok)
    stats = json.loads(layout.stats(name).read_text())
    assert (stats["samples"], stats["written"], stats["failed"]) == (len(rows), len(ok), len(failed))
    return rows


# --- per-sample failures and conversions, all in one shard ---------------------------------


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high as stored
    arr[:, :10] = 250
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def _palette(transparent: bool) -> bytes:
    img = Image.new("P", (24, 24), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 12, 24))
    return encode(img, transparency=0) if transparent else encode(img)


UNICODE_TXT = "  Ein Café in Zürich — 東京の夜 🌃 naïve\n".encode("utf-8")


def _mixed_samples(rng) -> list[tuple[str, dict[str, bytes]]]:
    rgba = np.concatenate([random_image(rng), np.full((24, 24, 1), 255, np.uint8)], axis=2)
    rgba[:12, :, 3] = 0
    img = lambda: png_bytes(random_image(rng))  # noqa: E731
    return [
        ("good-0", {"png": img(), "txt": b"first good", "cls": b"0"}),
        ("gray", {"png": png_bytes(random_image(rng)[..., 0], mode="L"), "txt": b"gray"}),
        ("rgba", {"png": png_bytes(rgba, mode="RGBA"), "txt": b"rgba"}),
        ("pal", {"png": _palette(False)}),
        ("paltrans", {"png": _palette(True)}),
        ("cmyk", {"jpg": encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95)}),
        ("i16", {"png": encode(Image.fromarray(rng.integers(0, 65536, (24, 24), dtype=np.uint16)))}),
        ("exif", {"jpg": _exif_jpeg(), "txt": b"rotated"}),
        ("broken", {"png": b"\x89PNG\r\n\x1a\n this is not really a png", "txt": b"broken"}),
        ("empty", {"png": b"", "txt": b"empty"}),
        ("big", {"png": png_bytes(random_image(rng, 50, 50)), "txt": b"too big"}),
        ("bomb", {"png": bomb_png(100_000, 100_000, bit_depth=8, rows=2), "txt": b"bomb"}),
        ("noimage", {"txt": b"no image here", "cls": b"3"}),
        ("dup", {"png": img(), "txt": b"first dup"}),
        ("good-1", {"png": img(), "txt": b"second good"}),
        ("dup", {"png": img(), "txt": b"second dup"}),
        ("/abs/evil", {"png": img(), "txt": b"absolute"}),
        ("../escape", {"png": img(), "txt": b"dotdot"}),
        ("a/../b", {"png": img(), "txt": b"inner dotdot"}),
        ("uni", {"png": img(), "txt": UNICODE_TXT, "json": '{"caption": "日本語"}'.encode("utf-8")}),
        ("two-images", {"png": img(), "jpg": encode(Image.new("RGB", (24, 24)), "JPEG")}),
        ("good-2", {"png": img(), "txt": b"last good", "cls": b"2"}),
    ]


EXPECTED_FAILURES = {
    "broken": "undecodable_image",
    "empty": "empty_image",
    "big": "too_many_pixels",
    "bomb": "too_many_pixels",
    "noimage": "no_image",
    "/abs/evil": "unsafe_key",
    "../escape": "unsafe_key",
    "a/../b": "unsafe_key",
    "two-images": "multiple_images",
}

EXPECTED_CONVERSIONS = {
    "gray": "L", "rgba": "RGBA", "pal": "P", "paltrans": "P", "cmyk": "CMYK", "i16": "I;16",
}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    samples = _mixed_samples(np.random.default_rng(7))
    shard = write_shard(root / "mixed-000000.tar", samples)
    out = root / "out"
    summary = run([shard], out, batch_size=4, max_pixels=2_000)  # 24×24 passes, 50×50 does not
    return shard, samples, out, summary


def test_mixed_shard_accounts_for_every_sample(mixed_run):
    shard, samples, out, summary = mixed_run
    rows = check_accounting(out, shard.name, [key for key, _ in samples])
    status = [(r["key"], r["status"], reason_code(r["reason"] or "")) for r in rows]
    expected = []
    seen = set()
    for key, _ in samples:
        if key in EXPECTED_FAILURES:
            expected.append((key, "failed", EXPECTED_FAILURES[key]))
        elif key in seen:
            expected.append((key, "failed", "duplicate_key"))
        else:
            expected.append((key, "ok", ""))
        seen.add(key)
    assert status == expected
    n_failed = len(EXPECTED_FAILURES) + 1
    assert summary["counts"]["samples"] == len(samples)
    assert summary["counts"]["failed"] == n_failed and summary["counts"]["written"] == len(samples) - n_failed
    assert summary["failures"] == {
        "duplicate_key": 1, "empty_image": 1, "multiple_images": 1, "no_image": 1,
        "too_many_pixels": 2, "undecodable_image": 1, "unsafe_key": 3,
    }
    protection = json.loads(OutputLayout(out).protection_file.read_text())
    assert protection["failures"] == summary["failures"] and protection["shards_with_tar_errors"] == []


def test_failed_rows_carry_source_and_no_protected_data(mixed_run):
    shard, samples, out, _ = mixed_run
    for row in rows_of(out, shard.name):
        if row["status"] == "failed":
            assert row["source_shard"] == str(shard)
            assert row["output_shard"] is None and row["sha256_protected"] is None and row["linf"] is None


def test_conversions_are_recorded_and_written_as_rgb(mixed_run):
    shard, _, out, _ = mixed_run
    rows = {r["key"]: r for r in rows_of(out, shard.name) if r["status"] == "ok"}
    recorded = {k: r["converted_from"] for k, r in rows.items() if r["converted_from"]}
    assert recorded == EXPECTED_CONVERSIONS
    assert rows["good-0"]["converted_from"] is None and rows["good-0"]["exif_rotated"] is False
    written = {s.key: s for s in output_samples(out, shard.name)}
    for key in EXPECTED_CONVERSIONS:
        img = Image.open(io.BytesIO(written[key].fields["png"]))
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (24, 24)
        assert rows[key]["linf"] <= 8 and rows[key]["image_field"] in ("png", "jpg")
    # a jpg input is written as png (lossless), its other fields untouched
    assert list(written["cmyk"].fields) == ["png"]
    # transparent regions became white before protection (within the budget)
    rgba = np.asarray(Image.open(io.BytesIO(written["rgba"].fields["png"])), dtype=int)
    assert rgba[:12].min() >= 255 - 8


def test_exif_rotation_swaps_output_dimensions(mixed_run):
    shard, _, out, _ = mixed_run
    row = next(r for r in rows_of(out, shard.name) if r["key"] == "exif")
    assert row["status"] == "ok" and row["exif_rotated"] is True
    assert (row["source_width"], row["source_height"]) == (20, 10)
    assert (row["width"], row["height"]) == (10, 20)
    sample = next(s for s in output_samples(out, shard.name) if s.key == "exif")
    img = np.asarray(Image.open(io.BytesIO(sample.fields["png"])))
    assert img.shape == (20, 10, 3)
    assert img[:8].mean() > 200 and img[-8:].mean() < 50  # the bright left half is now on top
    assert sample.fields["txt"] == b"rotated"


def test_duplicate_key_keeps_the_first_occurrence(mixed_run):
    shard, samples, out, _ = mixed_run
    written = [s for s in output_samples(out, shard.name) if s.key == "dup"]
    assert len(written) == 1 and written[0].fields["txt"] == b"first dup"
    rows = [r for r in rows_of(out, shard.name) if r["key"] == "dup"]
    first_png = [f["png"] for k, f in samples if k == "dup"][0]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["sha256_original"] == hashlib.sha256(first_png).hexdigest()
    assert rows[1]["reason"] == "duplicate_key"


def test_unsafe_keys_never_reach_the_output_tar(mixed_run):
    shard, _, out, _ = mixed_run
    names = output_members(out, shard.name)
    assert names  # the good samples are there
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/")
        assert "evil" not in name and "escape" not in name and not name.startswith("a/")


def test_non_ascii_caption_is_byte_identical_and_in_the_manifest(mixed_run):
    shard, _, out, _ = mixed_run
    sample = next(s for s in output_samples(out, shard.name) if s.key == "uni")
    assert sample.fields["txt"] == UNICODE_TXT
    assert sample.fields["json"] == '{"caption": "日本語"}'.encode("utf-8")
    row = next(r for r in rows_of(out, shard.name) if r["key"] == "uni")
    assert row["caption"] == "Ein Café in Zürich — 東京の夜 🌃 naïve"


def test_inspect_passes_on_the_mixed_output(mixed_run):
    _, samples, out, _ = mixed_run
    report = inspect_output(out)
    assert report["problems"] == []
    assert report["counts"]["samples"] == len(samples)
    assert report["failures"]["unsafe_key"] == 3


def test_json_caption_field_with_non_ascii(tmp_path):
    shard = write_shard(tmp_path / "j.tar", [
        ("k", {"png": png_bytes(random_image(np.random.default_rng(0))), "json": '{"caption": "Ünïcödé 字幕"}'.encode()}),
    ])
    run([shard], tmp_path / "out", caption_field="caption")
    assert rows_of(tmp_path / "out", "j.tar")[0]["caption"] == "Ünïcödé 字幕"


# --- names and text that cannot be stored as given -------------------------------------------


@pytest.mark.parametrize(
    "key, unsafe",
    [
        ("000001", False), ("dir/000001", False), ("日本/写真", False),
        ("./000001", False), ("a/./b", False), ("..x/y", False),  # cannot escape
        ("", True), ("/abs/x", True), ("//host/x", True), ("../x", True), ("a/../b", True),
        ("a/..", True), ("a\\..\\b", True), ("dir/", True), (".", True), ("caf\udce9", True),
    ],
)
def test_unsafe_keys(key, unsafe):
    assert is_unsafe_key(key) is unsafe


def test_dot_slash_prefixed_members_are_kept_as_they_are(tmp_path):
    # what `tar -C dir -cf shard.tar .` writes
    shard = write_shard(tmp_path / "dot.tar", [(f"./{k}", f) for k, f in simple_samples("s", 3)])
    out = tmp_path / "out"
    run([shard], out)
    check_accounting(out, "dot.tar", [f"./s-{i:05d}" for i in range(3)])
    assert all(r["status"] == "ok" for r in rows_of(out, "dot.tar"))
    assert output_members(out, "dot.tar")[:2] == ["./s-00000.png", "./s-00000.txt"]
    assert inspect_output(out)["problems"] == []


def test_undecodable_names_huge_labels_and_lone_surrogates_do_not_crash_the_run(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in [
            ("ok.png", png_bytes(random_image(rng))),
            ("caf\udce9.png", png_bytes(random_image(rng))),  # the raw byte 0xE9: not UTF-8
            ("big.png", png_bytes(random_image(rng))),
            ("big.cls", b"123456789012345678901234567890"),  # beyond int64
            ("lone.png", png_bytes(random_image(rng))),
            ("lone.json", b'{"caption": "a\\ud800b"}'),  # a lone surrogate escape
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run([path], out, caption_field="caption")
    rows = check_accounting(out, "odd.tar", ["ok", "caf\\xe9", "big", "lone"])
    by_key = {r["key"]: r for r in rows}
    assert (by_key["caf\\xe9"]["status"], by_key["caf\\xe9"]["reason"]) == ("failed", "unsafe_key")
    assert by_key["big"]["status"] == "ok" and by_key["big"]["label"] is None
    assert by_key["lone"]["status"] == "ok" and by_key["lone"]["caption"] == "a\ufffdb"
    assert inspect_output(out)["problems"] == []


# --- damaged tars ------------------------------------------------------------------------------


def _offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def _damage(path: Path, kind: str) -> Path:
    """Damage the shard around sample 3 (of 6); returns the damaged copy."""
    data = bytearray(path.read_bytes())
    header_at, data_at = _offsets(path)["s-00003.png"]
    if kind == "truncated_in_data":
        data = data[: data_at + 300]
    elif kind == "truncated_in_header":
        data = data[: header_at + 200]
    elif kind == "truncated_at_member":
        data = data[:header_at]
    elif kind == "garbage_header":
        data[header_at : header_at + 512] = b"\x5a" * 512
    elif kind == "zeroed_header":
        data[header_at : header_at + 512] = b"\x00" * 512
    elif kind == "garbage_in_the_middle":
        data[header_at : header_at + 3000] = bytes(range(256)) * 11 + b"\x01" * (3000 - 2816)
    else:
        raise AssertionError(kind)
    damaged = path.with_name(f"{kind}.tar")
    damaged.write_bytes(bytes(data))
    return damaged


#: kind → (keys written, keys in the manifest). When the damage hides where a sample ends
#: (a bad or missing header), the sample being read is failed too: it may have lost fields.
DAMAGE = {
    "truncated_in_data": (["s-00000", "s-00001", "s-00002"], ["s-00000", "s-00001", "s-00002", "s-00003"]),
    "truncated_in_header": (["s-00000", "s-00001"], ["s-00000", "s-00001", "s-00002"]),
    "truncated_at_member": (["s-00000", "s-00001"], ["s-00000", "s-00001", "s-00002"]),
    "garbage_header": (["s-00000", "s-00001"], ["s-00000", "s-00001", "s-00002"]),
    "zeroed_header": (["s-00000", "s-00001"], ["s-00000", "s-00001", "s-00002"]),
    "garbage_in_the_middle": (["s-00000", "s-00001"], ["s-00000", "s-00001", "s-00002"]),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_tar_keeps_what_came_before_and_records_the_damage(tmp_path, kind):
    good = write_shard(tmp_path / "good.tar", simple_samples("s", 6))
    damaged = _damage(good, kind)
    out = tmp_path / "out"
    summary = run([damaged], out, batch_size=2)
    written, listed = DAMAGE[kind]
    rows = check_accounting(out, damaged.name, listed)
    assert [r["key"] for r in rows if r["status"] == "ok"] == written
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["key"] == listed[-1]
    assert bad[0]["reason"].startswith("corrupt_tar")
    # what was written is protected and its fields are intact
    with open(good, "rb") as f:
        originals = {s.key: s for s in iter_tar_samples(f)}
    for s in output_samples(out, damaged.name):
        assert s.fields["txt"] == originals[s.key].fields["txt"]
        assert s.fields["png"] != originals[s.key].fields["png"]
    stats = json.loads(OutputLayout(out).stats(damaged.name).read_text())
    assert stats["tar_error"].startswith("corrupt_tar") and stats["failures"] == {"corrupt_tar": 1}
    assert summary["shards_with_tar_errors"] == [damaged.name]
    assert summary["failures"] == {"corrupt_tar": 1}
    report = inspect_output(out)
    assert report["problems"] == [] and report["failures"] == {"corrupt_tar": 1}


def test_damage_before_any_sample_is_still_recorded(tmp_path):
    path = tmp_path / "garbage.tar"
    path.write_bytes(b"definitely not a tar archive " * 50)
    out = tmp_path / "out"
    summary = run([path], out)
    rows = rows_of(out, path.name)
    assert len(rows) == 1 and rows[0]["key"] == "" and rows[0]["reason"].startswith("corrupt_tar")
    assert output_samples(out, path.name) == []
    assert summary["counts"]["written"] == 0 and summary["shards_with_tar_errors"] == [path.name]
    assert inspect_output(out)["problems"] == []


def test_empty_shard_gives_an_empty_output(tmp_path):
    empty = write_shard(tmp_path / "empty.tar", [])
    out = tmp_path / "out"
    summary = run([empty], out)
    layout = OutputLayout(out)
    assert layout.shard("empty.tar").is_file()
    assert output_samples(out, "empty.tar") == [] and output_members(out, "empty.tar") == []
    assert rows_of(out, "empty.tar") == []
    assert read_manifest(layout.manifest("empty.tar")).num_columns > 0  # a real, typed table
    assert json.loads(layout.sizes_file.read_text()) == {"empty.tar": 0}
    stats = json.loads(layout.stats("empty.tar").read_text())
    assert stats["samples"] == 0 and stats["tar_error"] is None
    assert summary["counts"] == {"shards": 1, "shards_missing": 0, "samples": 0, "written": 0, "failed": 0, "skipped_members": 0}
    assert inspect_output(out)["problems"] == []


def test_good_empty_and_damaged_shards_together_with_workers(tmp_path):
    good = write_shard(tmp_path / "good.tar", simple_samples("g", 5, seed=1))
    donor = write_shard(tmp_path / "donor.tar", simple_samples("s", 6, seed=2))
    truncated = _damage(donor, "truncated_in_data")
    donor.unlink()
    empty = write_shard(tmp_path / "empty.tar", [])
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")  # a download that never started
    out = tmp_path / "out"
    summary = run([good, truncated, empty, zero], out, num_workers=2, batch_size=2)
    sizes = json.loads(OutputLayout(out).sizes_file.read_text())
    assert sizes == {"empty.tar": 0, "good.tar": 5, "truncated_in_data.tar": 3, "zero.tar": 0}
    assert sorted(summary["shards_with_tar_errors"]) == ["truncated_in_data.tar", "zero.tar"]
    zero_rows = rows_of(out, "zero.tar")
    assert len(zero_rows) == 1 and zero_rows[0]["reason"].startswith("corrupt_tar") and "empty" in zero_rows[0]["reason"]
    check_accounting(out, "good.tar", [f"g-{i:05d}" for i in range(5)])
    assert summary["counts"]["samples"] == 5 + 4 + 0 + 1
    assert inspect_output(out)["problems"] == []


# --- the command line ----------------------------------------------------------------------------


def _one_error_line(result) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_missing_input(tmp_path):
    result = runner.invoke(app, ["shard", str(tmp_path / "nope-000.tar"), "-o", str(tmp_path / "out"), "-m", "random"])
    line = _one_error_line(result)
    assert "not found" in line and "nope-000.tar" in line
    result = runner.invoke(app, ["shard", str(tmp_path / "nope-{000..003}.tar"), "-o", str(tmp_path / "out"), "-m", "random"])
    assert "not found" in _one_error_line(result)
    result = runner.invoke(app, ["shard", str(tmp_path / "*.tar"), "-o", str(tmp_path / "out"), "-m", "random"])
    assert "matches no file" in _one_error_line(result)


def test_cli_output_directory_that_cannot_be_written(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for output in (blocker / "out", blocker):  # below a file; a file itself
        result = runner.invoke(app, ["shard", str(shards[0]), "-o", str(output), "-m", "random", "--workers", "0"])
        line = _one_error_line(result)
        assert "cannot write to output directory" in line and str(output) in line
    assert blocker.read_text() == "not a directory"


def test_cli_output_in_a_filesystem_nobody_can_write(make_shards):
    # /proc refuses new directories even to root, so this runs the same as root and user.
    shards = make_shards(n_shards=1, per_shard=2)
    result = runner.invoke(app, ["shard", str(shards[0]), "-o", "/proc/uge-protect-test/out", "-m", "random"])
    assert "cannot write to output directory /proc/uge-protect-test/out" in _one_error_line(result)


def test_cli_damaged_input_finishes_and_inspect_passes(tmp_path):
    good = write_shard(tmp_path / "good.tar", simple_samples("s", 6))
    damaged = _damage(good, "garbage_header")
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(damaged), "-o", str(out), "-m", "random", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "protected 2 of 3 samples" in result.stderr and "corrupt_tar 1" in result.stderr
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output and "corrupt_tar 1" in result.output


def test_console_script_missing_input_and_unwritable_output(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args, needle in (
        ([str(tmp_path / "missing.tar"), "-o", str(tmp_path / "out")], "input shard not found"),
        ([str(shards[0]), "-o", str(blocker / "out")], "cannot write to output directory"),
    ):
        proc = subprocess.run([str(UGE_PROTECT), "shard", *args, "-m", "random"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
