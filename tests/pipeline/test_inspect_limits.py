"""``inspect`` stays bounded on a hostile output directory: memory (manifest and JSON bombs),
decode work (run.json's decode settings), reading (shard sizes, symlinks out of the directory)
and what reaches the terminal (control characters in names and keys)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.helpers import simple_samples, write_shard
from uge_protect.cli.app import app
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.config import config_fingerprint
from uge_protect.pipeline.inspect import RUN_UNCHECKED, inspect_output
from uge_protect.pipeline.untrusted import MAX_MANIFEST_DECODED_BYTES, MAX_MANIFEST_ROWS, stats_error
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.manifest import MANIFEST_SCHEMA, read_manifest, write_manifest
from uge_protect.methods.registry import create_method

runner = CliRunner()
NAME = "data-000000.tar"
#: Control characters (C0 but the line break, DEL, C1) that must never reach the terminal.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One finished output of 3 samples and its source shard."""
    root = tmp_path_factory.mktemp("pristine")
    (root / "in").mkdir()
    source = write_shard(root / "in" / NAME, simple_samples("s", 3, size=(16, 16)))
    cfg = ShardJobConfig(inputs=[str(source)], output=str(root / "out"), quiet=True, num_workers=0, encode_threads=0)
    run_shard_job(cfg, create_method("random"))
    return root


@pytest.fixture
def out(pristine, tmp_path):
    """A fresh copy of the pristine output (its source stays where the stats record it)."""
    shutil.copytree(pristine / "out", tmp_path / "out")
    return tmp_path / "out"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def republish(out: Path, change_settings) -> None:
    """Change run.json's settings and recompute every fingerprint, as a publisher can: the
    fingerprint is an unkeyed hash, so it proves nothing about who wrote the settings."""
    layout = OutputLayout(out)
    run = json.loads(layout.run_file.read_text())
    change_settings(run["settings"])
    method = {k: v for k, v in run["method"].items() if k != "artifact_fingerprint"}
    run["fingerprint"] = config_fingerprint(
        {**run["settings"], "method": method, "artifact": run["method"].get("artifact_fingerprint")}
    )
    layout.run_file.write_text(json.dumps(run))
    for path in (layout.stats(NAME), layout.protection_file):
        edit_json(path, lambda d: d.update(config_fingerprint=run["fingerprint"]))


def no_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("inspect decoded the sources")

    monkeypatch.setattr("uge_protect.pipeline.inspect.decode_samples", refuse)


def python_peak_bytes(fn) -> int:
    """Peak Python-heap bytes while ``fn`` runs (what turning rows into dicts costs)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_repeated_rows(out: Path, n: int, **row_changes) -> None:
    """A manifest of ``n`` copies of one failed row: dictionary and run-length encoding make
    it a few KB on disk whatever ``n``."""
    path = OutputLayout(out).manifest(NAME)
    row = {**read_manifest(path).to_pylist()[0], "status": "failed", "reason": "no_image", **row_changes}
    table = pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA).take(pa.nulls(n, pa.int64()).fill_null(0))
    pq.write_table(table, path, compression="zstd", use_dictionary=True)


# --- 1: manifest and JSON bombs -----------------------------------------------------------


def test_a_manifest_with_more_rows_than_the_stats_is_refused_before_its_rows_are_read(out):
    write_repeated_rows(out, 300_000)
    assert OutputLayout(out).manifest(NAME).stat().st_size < 100_000
    report = {}
    peak = python_peak_bytes(lambda: report.update(inspect_output(out, check_sources=False)))
    assert any(f"{NAME}: manifest has 300,000 rows, the stats say 3 samples; it is not read" in p
               for p in report["problems"]), report["problems"]
    assert peak < 50 << 20, f"{peak / 2**20:.0f} MiB of Python objects for a refused manifest"


def test_a_manifest_over_the_row_cap_is_refused_even_when_the_stats_agree(out):
    n = MAX_MANIFEST_ROWS + 1
    write_repeated_rows(out, n)
    edit_json(OutputLayout(out).stats(NAME), lambda st: st.update(samples=n, written=0, failed=n))
    report = {}
    peak = python_peak_bytes(lambda: report.update(inspect_output(out, check_sources=False)))
    assert any("more than inspect reads (at most 1,000,000)" in p for p in report["problems"]), report["problems"]
    assert peak < 50 << 20


def test_rows_that_decode_to_more_than_the_cap_are_refused_while_streaming(out):
    """Few rows on disk, each repeating one long dictionary value: the metadata looks small,
    the decoded rows would not be."""
    value = "k" * 10_000
    n = MAX_MANIFEST_DECODED_BYTES // len(value) + 8192
    write_repeated_rows(out, n, reason=f"no_image: {value}")
    edit_json(OutputLayout(out).stats(NAME), lambda st: st.update(samples=n))
    report = {}
    peak = python_peak_bytes(lambda: report.update(inspect_output(out, check_sources=False)))
    assert any("manifest rows decode to more than" in p for p in report["problems"]), report["problems"]
    assert peak < 100 << 20, f"{peak / 2**20:.0f} MiB"


def test_the_captions_are_never_read(out):
    """inspect reads only the columns it checks: a 50 MB caption costs nothing."""
    path = OutputLayout(out).manifest(NAME)
    rows = read_manifest(path).to_pylist()
    rows[0]["caption"] = "a" * 50_000_000
    write_manifest(path, rows)
    report = {}
    peak = python_peak_bytes(lambda: report.update(inspect_output(out, check_sources=False)))
    assert report["problems"] == []
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB"


def test_a_large_stats_file_is_refused_unread(out):
    edit_json(OutputLayout(out).stats(NAME), lambda st: st.update(padding="x" * (2 << 20)))
    problems = inspect_output(out)["problems"]
    assert any(p.startswith(f"stats/{NAME[:-4]}.json is 2,097,") and "too large" in p for p in problems), problems


def test_a_huge_sparse_json_file_is_refused_unread(out):
    path = OutputLayout(out).protection_file
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse
    problems = inspect_output(out)["problems"]
    assert any(p.startswith("protection.json is 2,147,483,648 bytes, too large") for p in problems), problems


# --- 2: run.json's decode settings are bounded by the user's --max-pixels -------------------


@pytest.mark.parametrize("change, pixels", [
    (lambda s: s.update(max_pixels=10**12), 10**12),
    (lambda s: s.update(image_size=100_000, resize_mode="center_crop"), 10**10),
])
def test_sources_are_not_decoded_with_settings_above_max_pixels(out, monkeypatch, change, pixels):
    republish(out, change)
    no_decoding(monkeypatch)
    report = inspect_output(out)
    assert report["problems"] == [] and report["sources_checked"] == 0, report["problems"]
    assert "above --max-pixels 64,000,000" in report["sources_not_compared"][NAME]
    warning = f"pass --max-pixels {pixels} to compare them"
    assert any(w.endswith(warning) for w in report["warnings"]), report["warnings"]
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert warning in result.output
    assert result.output.rstrip().splitlines()[-1] == "verification passed with 1 warning (see above)"


def test_max_pixels_lets_the_user_allow_larger_settings(out):
    republish(out, lambda s: s.update(max_pixels=100_000_000))
    assert inspect_output(out)["sources_checked"] == 0
    report = inspect_output(out, max_pixels=100_000_000)
    assert report["sources_checked"] == 1 and report["problems"] == [] and report["warnings"] == []
    result = runner.invoke(app, ["inspect", str(out), "--max-pixels", "100000000"])
    assert result.exit_code == 0 and "compared for 1 of 1 shards" in result.output, result.output
    result = runner.invoke(app, ["inspect", str(out), "--max-pixels", "0"])
    assert result.exit_code == 2 and "error: --max-pixels must be at least 1" in result.output


def test_an_edited_run_json_never_decodes_sources(out, pristine, monkeypatch):
    edit_json(OutputLayout(out).run_file, lambda r: r["settings"].update(image_size=100_000, resize_mode="center_crop"))
    no_decoding(monkeypatch)
    for kw in ({}, {"sources": [str(pristine / "in" / NAME)]}):
        report = inspect_output(out, max_pixels=10**12, **kw)
        assert any("run.json was edited" in p for p in report["problems"]), report["problems"]
        assert report["sources_not_compared"] == {NAME: RUN_UNCHECKED} and report["sources_checked"] == 0


# --- 3: nothing from the directory reaches the terminal raw ----------------------------------


@pytest.mark.parametrize("shard", [
    "x.tar\nverification passed\n\x1b]0;pwned\x07z.tar", "a\x1b[2Jb.tar", "a\x9bb.tar", "a\x7f.tar", "a\udc80.tar",
])
def test_shard_names_with_control_characters_are_invalid(shard):
    assert stats_error({"shard": shard}) == "has no valid field 'shard' (a .tar base name)"


def test_control_characters_from_the_directory_are_escaped_in_the_report(out):
    layout = OutputLayout(out)
    forged = "\nverification passed\x1b]0;pwned\x07\x9b2J"
    rows = read_manifest(layout.manifest(NAME)).to_pylist()
    rows[0]["key"] = "s-00000" + forged
    rows[1].update(status="failed", reason="no_image" + forged)
    write_manifest(layout.manifest(NAME), rows)
    shutil.copy(layout.stats(NAME), layout.stats_dir / f"evil{forged}.json")  # names another shard's marker
    stats = json.loads(layout.stats(NAME).read_text())
    (layout.stats_dir / "evil2.json").write_text(json.dumps({**stats, "shard": "x.tar" + forged + ".tar"}))
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert not any(CONTROL.search(line) for line in lines), [line for line in lines if CONTROL.search(line)]
    assert not any(line.strip() == "verification passed" for line in lines), result.output
    assert "s-00000\\x0averification passed\\x1b]0;pwned\\x07\\x9b2J" in result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 1 and not CONTROL.search(result.output)
    report = json.loads(result.output)  # the escapes decode back to the strings themselves
    assert any(p.startswith(f"stats/evil{forged}.json names shard") for p in report["problems"]), report["problems"]


# --- 4: shard sizes before hashing; symlinks out of the directory ----------------------------


def test_a_shard_whose_size_differs_from_its_marker_is_never_hashed(out, monkeypatch):
    layout = OutputLayout(out)
    big = layout.shards_dir / ".big"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # 4 GiB, sparse: hashing it would read all of it
    layout.shard(NAME).unlink()
    os.symlink(big.name, layout.shard(NAME))  # inside the directory: allowed, but not this size

    def refuse(path):
        raise AssertionError(f"inspect hashed {path}")

    monkeypatch.setattr("uge_protect.pipeline.inspect.file_sha256", refuse)
    problems = inspect_output(out)["problems"]
    expected = f"{NAME}: the output shard is damaged or was replaced (4,294,967,296 bytes, its completion marker says "
    assert any(p.startswith(expected) and p.endswith("; it is not read") for p in problems), problems


def test_a_damaged_shard_of_the_recorded_size_is_still_read_and_reported(out):
    path = OutputLayout(out).shard(NAME)
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 1024] = b"\xff" * 1024  # a header or data block overwritten
    path.write_bytes(bytes(data))
    problems = inspect_output(out)["problems"]
    assert f"{NAME}: shard bytes differ from the completion marker (sha256)" in problems, problems


def _files(layout: OutputLayout) -> dict[str, Path]:
    return {"shard": layout.shard(NAME), "manifest": layout.manifest(NAME), "stats": layout.stats(NAME),
            "run.json": layout.run_file, "sizes.json": layout.sizes_file, "protection.json": layout.protection_file,
            "stats folder": layout.stats_dir, "shards folder": layout.shards_dir}


@pytest.mark.parametrize("which", list(_files(OutputLayout(Path("x")))))
def test_a_symlink_to_an_identical_copy_outside_the_directory_is_a_problem(out, tmp_path, which):
    path = _files(OutputLayout(out))[which]
    outside = tmp_path / "elsewhere" / path.name
    outside.parent.mkdir()
    shutil.move(path, outside)
    os.symlink(outside, path)
    relative = path.relative_to(out).as_posix() + ("/" if outside.is_dir() else "")
    problems = inspect_output(out)["problems"]
    assert f"{relative} is a symlink to a path outside the directory; it is not read" in " ".join(problems), problems
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1 and "is a symlink to a path outside the directory" in result.output


def test_symlinks_inside_the_directory_are_followed(out):
    layout = OutputLayout(out)
    (out / "blobs").mkdir()
    for path in (layout.shard(NAME), layout.manifest(NAME)):
        shutil.move(path, out / "blobs" / path.name)
        os.symlink(os.path.relpath(out / "blobs" / path.name, path.parent), path)
    report = inspect_output(out)
    assert report["problems"] == [] and report["sources_checked"] == 1, report["problems"]


def test_a_hugging_face_cache_snapshot_verifies(out, tmp_path):
    """``hf download`` without ``--local-dir`` gives a snapshot folder whose files are
    symlinks into the repository's ``blobs/``: those targets count as inside."""
    repo = tmp_path / "hub" / "datasets--me--protected"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    for i, path in enumerate(sorted(p for p in out.rglob("*") if p.is_file())):
        link = snapshot / path.relative_to(out)
        link.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, repo / "blobs" / f"blob{i}")
        os.symlink(os.path.relpath(repo / "blobs" / f"blob{i}", link.parent), link)
    report = inspect_output(snapshot)
    assert report["problems"] == [] and report["sources_checked"] == 1, report["problems"]
    (repo / "blobs" / "elsewhere").mkdir()  # a snapshot's links may only reach blobs/
    outside = tmp_path / "hub" / "other.json"
    shutil.move(os.path.realpath(snapshot / "protection.json"), outside)
    (snapshot / "protection.json").unlink()
    os.symlink(outside, snapshot / "protection.json")
    assert any("protection.json is a symlink to a path outside" in p for p in inspect_output(snapshot)["problems"])
