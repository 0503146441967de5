"""``inspect`` on output directories that were tampered with or made by someone else.

An output directory is untrusted: nothing named inside it is executed or fetched, each kind
of tampering is a problem line (exit 1), and malformed files never cause a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import png_bytes, simple_samples, write_shard
from uge_protect.cli.app import app
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.inspect import NOT_LOCAL, NO_MATCH, inspect_output
from uge_protect.shards.layout import OutputLayout, file_sha256
from uge_protect.shards.manifest import read_manifest, write_manifest
from uge_protect.shards.tario import iter_tar_samples, write_tar_atomic
from uge_protect.methods.registry import create_method

runner = CliRunner()
NAME = "data-000000.tar"


def run(inputs, out, method="random", **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("encode_threads", 0)
    cfg = ShardJobConfig(inputs=[str(p) for p in inputs], output=str(out), quiet=True, **kw)
    return run_shard_job(cfg, create_method(method, allow_hidden=True))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One finished output of 4 samples (one failed: undecodable) and its source shard."""
    root = tmp_path_factory.mktemp("pristine")
    samples = list(simple_samples("s", 3, size=(16, 16)))
    samples.insert(1, ("broken", {"png": b"not an image", "txt": b"broken"}))
    (root / "in").mkdir()
    source = write_shard(root / "in" / NAME, samples)
    run([source], root / "out")
    return root


@pytest.fixture
def copy(pristine, tmp_path):
    """A fresh copy of the pristine output (and its source) to tamper with."""
    shutil.copytree(pristine / "in", tmp_path / "in")
    shutil.copytree(pristine / "out", tmp_path / "out")
    return tmp_path


def layout_of(root: Path) -> OutputLayout:
    return OutputLayout(root / "out")


def read_samples(path: Path):
    with open(path, "rb") as f:
        return list(iter_tar_samples(f))


def rewrite_shard(root: Path, samples) -> None:
    """Replace the output shard and fix its completion marker (sha256, bytes), as a careful
    tamperer would."""
    layout = layout_of(root)
    path = layout.shard(NAME)
    write_tar_atomic(path, [(f"{s.key}.{ext}", data) for s in samples for ext, data in s.fields.items()])
    edit_json(layout.stats(NAME), lambda st: st.update(sha256=file_sha256(path), bytes=path.stat().st_size))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_rows(root: Path, change) -> None:
    path = layout_of(root).manifest(NAME)
    rows = read_manifest(path).to_pylist()
    rows = change(rows) or rows
    write_manifest(path, rows)


def problems_of(root: Path, **kw) -> list[str]:
    return inspect_output(root / "out", **kw)["problems"]


def test_the_pristine_output_passes(copy):
    report = inspect_output(copy / "out")
    assert report["problems"] == [] and report["warnings"] == [] and report["sources_checked"] == 1
    result = runner.invoke(app, ["inspect", str(copy / "out")])
    assert result.exit_code == 0 and result.output.rstrip().endswith("verification passed"), result.output


# --- item 4: nothing named inside the directory is executed or fetched ----------------------


def test_a_pipe_source_in_a_stats_file_is_never_run(copy, tmp_path):
    marker = tmp_path / "pwned"
    edit_json(layout_of(copy).stats(NAME), lambda st: st.update(source=f"pipe:touch {marker}"))
    report = inspect_output(copy / "out")
    assert not marker.exists()
    assert report["problems"] == [] and report["sources_checked"] == 0
    assert report["sources_not_compared"] == {NAME: NOT_LOCAL}
    result = runner.invoke(app, ["inspect", str(copy / "out")])
    assert not marker.exists()
    assert result.exit_code == 0, result.output
    assert f"source not compared for {NAME}: recorded source is not a local path; pass --sources" in result.output
    assert "compared for 0 of 1 shards" in result.output
    # the user names the sources: compared, still nothing run
    result = runner.invoke(app, ["inspect", str(copy / "out"), "--sources", str(copy / "in" / "*.tar")])
    assert result.exit_code == 0 and "compared for 1 of 1 shards" in result.output, result.output
    assert not marker.exists()


@pytest.mark.parametrize("source", [
    "https://example.invalid/data-000000.tar", "s3://bucket/data-000000.tar", "pipe:cat /etc/passwd",
    "hf://datasets/x/data-000000.tar", "file:///tmp/data-000000.tar", "data-000000.tar",
])
def test_remote_or_relative_recorded_sources_are_not_opened(copy, monkeypatch, source):
    import importlib

    def refuse(*args, **kwargs):
        raise AssertionError(f"inspect opened {args!r} through an URL opener")

    monkeypatch.setattr(importlib.import_module("webdataset.gopen"), "gopen", refuse)
    for module in ("uge_protect.shards.discover", "uge_protect.pipeline.source", "uge_protect.pipeline.inspect"):
        monkeypatch.setattr(f"{module}.open_shard", refuse)
    edit_json(layout_of(copy).stats(NAME), lambda st: st.update(source=source))
    monkeypatch.chdir(copy / "in")  # a relative path would resolve here: still not used
    report = inspect_output(copy / "out")
    assert report["problems"] == [] and report["sources_checked"] == 0, report["problems"]


def test_sources_option_matches_shards_by_name(copy, tmp_path):
    report = inspect_output(copy / "out", sources=[str(copy / "in")])
    assert report["sources_checked"] == 1 and report["problems"] == []
    other = tmp_path / "elsewhere"
    other.mkdir()
    write_shard(other / "unrelated.tar", simple_samples("u", 1))
    report = inspect_output(copy / "out", sources=[str(other / "*.tar")])
    assert report["sources_not_compared"] == {NAME: NO_MATCH}
    assert any("match no output shard" in w for w in report["warnings"])
    # a user source with other content is compared, and differs
    write_shard(other / NAME, simple_samples("s", 3, seed=9, size=(16, 16)))
    problems = inspect_output(copy / "out", sources=[str(other / NAME)])["problems"]
    assert any("source sample with no row" in p or "differs" in p for p in problems), problems


def test_sources_option_errors_are_one_line(copy):
    result = runner.invoke(app, ["inspect", str(copy / "out"), "--sources", str(copy / "nope-*.tar")])
    assert result.exit_code == 2 and "error: input pattern matches no file" in result.output
    result = runner.invoke(app, ["inspect", str(copy / "out"), "--sources", str(copy / "in"), "--no-sources"])
    assert result.exit_code == 2 and "cannot be combined" in result.output
    assert "Traceback" not in result.output


# --- item 5: tampering that must be caught -----------------------------------------------------


def test_an_extra_unprotected_image_member_is_caught(copy):
    samples = read_samples(layout_of(copy).shard(NAME))
    original = read_samples(copy / "in" / NAME)[0].fields["png"]
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(original)).save(jpeg, format="JPEG")
    samples[0].fields["orig.jpg"] = jpeg.getvalue()  # KEY.orig.jpg
    samples[1].fields["bin"] = original  # an image whatever its extension
    rewrite_shard(copy, samples)

    def two_more_members(st):
        if "members" in st:
            st["members"]["written"] += 2

    edit_json(layout_of(copy).stats(NAME), two_more_members)
    problems = problems_of(copy, check_sources=False)
    assert any("'orig.jpg' is an image but not the protected one" in p for p in problems), problems
    assert any("'bin' is an image but not the protected one" in p for p in problems), problems


def test_a_protected_image_replaced_by_its_original_is_caught(copy):
    samples = read_samples(layout_of(copy).shard(NAME))
    original = read_samples(copy / "in" / NAME)[0].fields["png"]
    samples[0].fields["png"] = original
    rewrite_shard(copy, samples)

    def fix(rows):
        rows[0].update(sha256_protected=hashlib.sha256(original).hexdigest(), linf=0, psnr=float("inf"))

    edit_rows(copy, fix)
    problems = problems_of(copy, check_sources=False)
    assert any("L∞ 0" in p and "promises noise" in p for p in problems), problems
    assert any("original's bytes" in p for p in problems), problems
    assert any("measured L∞ 0 against the source" in p for p in problems_of(copy)), problems_of(copy)


def test_an_unchanged_image_reencoded_is_caught_against_the_source(copy):
    """Hashes fixed and the manifest's L∞ left as it was: only the source shows it."""
    samples = read_samples(layout_of(copy).shard(NAME))
    pixels = np.asarray(Image.open(io.BytesIO(read_samples(copy / "in" / NAME)[0].fields["png"])).convert("RGB"))
    data = png_bytes(pixels)
    samples[0].fields["png"] = data
    rewrite_shard(copy, samples)
    edit_rows(copy, lambda rows: rows[0].update(sha256_protected=hashlib.sha256(data).hexdigest()))
    problems = problems_of(copy)
    assert any("measured L∞ 0 against the source" in p and "promises noise" in p for p in problems), problems


def test_passthrough_output_is_not_flagged_for_l_infinity_0(tmp_path):
    shard = write_shard(tmp_path / NAME, simple_samples("s", 2, size=(8, 8)))
    run([shard], tmp_path / "out", method="passthrough")
    assert inspect_output(tmp_path / "out")["problems"] == []


def test_a_deleted_stats_file_and_a_stray_tar_are_caught(copy):
    layout = layout_of(copy)
    layout.stats(NAME).unlink()
    (layout.shards_dir / "stray-000001.tar").write_bytes(layout.shard(NAME).read_bytes())
    problems = problems_of(copy)
    assert any(f"shards/{NAME} has no valid completion marker" in p for p in problems), problems
    assert any("shards/stray-000001.tar has no valid completion marker" in p for p in problems), problems


def test_a_ghost_entry_in_sizes_json_is_caught(copy):
    edit_json(layout_of(copy).sizes_file, lambda sizes: sizes.update({"ghost-000009.tar": 7}))
    problems = problems_of(copy)
    assert any("sizes.json lists ghost-000009.tar" in p for p in problems), problems


def test_a_stats_file_naming_a_missing_shard_is_caught(copy):
    layout = layout_of(copy)
    layout.shard(NAME).unlink()
    problems = problems_of(copy)
    assert any(f"{NAME}: shard missing" in p for p in problems), problems


def test_protection_json_counts_must_match(copy):
    edit_json(layout_of(copy).protection_file, lambda s: s["counts"].update(written=99))
    problems = problems_of(copy)
    assert any("protection.json counts written 99" in p for p in problems), problems


def test_an_edited_run_json_is_caught(copy):
    # raising the budget (or claiming lossy output) would silence the budget checks
    edit_json(layout_of(copy).run_file, lambda r: r.update(budget_levels=255))
    assert any("budget_levels 255 does not match" in p for p in problems_of(copy))
    edit_json(layout_of(copy).run_file, lambda r: r.update(budget_levels=8) or r["settings"].update(image_format="jpeg"))
    problems = problems_of(copy)
    assert any("run.json was edited" in p for p in problems), problems
    assert any("is not jpeg as the manifest says" in p or "differs from run.json" in p for p in problems), problems


# --- item 9 (inspect half): source samples missing from the manifest --------------------------


def test_a_source_sample_missing_from_the_manifest_is_caught(copy):
    layout = layout_of(copy)
    edit_rows(copy, lambda rows: [r for r in rows if r["key"] != "broken"])  # drop the failed row

    def fix_stats(st):
        st.update(samples=3, failed=0, failures={})
        if "members" in st:
            st["members"].update(failed=0, input=st["members"]["input"] - 2)

    edit_json(layout.stats(NAME), fix_stats)
    edit_json(layout.protection_file, lambda s: s.update(failures={}) or s["counts"].update(samples=3, failed=0))
    assert problems_of(copy, check_sources=False) == []  # consistent in itself
    problems = problems_of(copy)
    assert any("broken: a source sample with no row in the manifest" in p for p in problems), problems


# --- lossy output ------------------------------------------------------------------------------


def test_lossy_output_reports_the_l_infinity_against_the_budget(tmp_path):
    shard = write_shard(tmp_path / NAME, simple_samples("s", 3, size=(16, 16)))
    out = tmp_path / "out"
    run([shard], out, image_format="jpeg", allow_lossy=True)
    rows = read_manifest(OutputLayout(out).manifest(NAME)).to_pylist()
    worst = max(r["linf"] for r in rows)
    assert worst > 8  # JPEG on noise-like images breaks the budget
    report = inspect_output(out)
    assert report["problems"] == []
    assert report["lossy"]["linf_max"] == worst and report["lossy"]["within_budget"] is False
    sentence = f"the budget does not hold for lossy output (measured L∞ up to {worst} levels against a budget of 8)"
    assert sentence in report["warnings"]
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert sentence in result.output
    last = result.output.rstrip().splitlines()[-1]
    assert last == "verification passed with 1 warning (see above)"  # never an unqualified pass


# --- malformed files: a problem line each, never a traceback -----------------------------------


def _garbage_parquet(path: Path) -> None:
    path.write_bytes(b"PAR1" + b"\x00garbage" * 20 + b"PAR1")


def _other_schema_parquet(path: Path) -> None:
    pq.write_table(pa.table({"something": [1, 2, 3]}), path)


def _null_rows(path: Path) -> None:
    rows = read_manifest(path).to_pylist()
    rows[0].update(key=None, status=None)
    write_manifest(path, rows)


def _bad_linf_rows(path: Path) -> None:
    rows = read_manifest(path).to_pylist()
    rows[0].update(linf=None, image_format="gif")
    write_manifest(path, rows)


def _set(key, value):
    return lambda data: data.__setitem__(key, value) if isinstance(data, dict) else None


def _delete(key):
    return lambda data: data.pop(key, None)


JSON_CORRUPTIONS = {
    "not json": b"{not json",
    "not utf-8": b"\xff\xfe\x00{",
    "a list": b"[1, 2, 3]",
    "a number": b"42",
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
}

STATS_EDITS = {
    "no shard": _delete("shard"),
    "shard not a string": _set("shard", 7),
    "shard escapes": _set("shard", "../../run.json"),
    "samples a string": _set("samples", "4"),
    "written negative": _set("written", -1),
    "sha256 null": _set("sha256", None),
    "failures a list": _set("failures", ["undecodable_image"]),
    "skipped_members garbage": _set("skipped_members", {"symlink": "x"}),
    "members garbage": _set("members", [1]),
    "source a number": _set("source", 5),
}

RUN_EDITS = {
    "no fingerprint": _delete("fingerprint"),
    "budget a string": _set("budget_levels", "8"),
    "method a string": _set("method", "random"),
    "settings a list": _set("settings", []),
    "bad resize": lambda r: r["settings"].update(resize_mode="sideways", max_pixels="many"),
    "epsilon infinite": lambda r: r["method"].update(epsilon=float("inf")),
    "epsilon a string": lambda r: r["method"].update(epsilon="8/255"),
}

OTHER_EDITS = {
    "sizes values strings": ("sizes", lambda s: s.update({NAME: "3"})),
    "sizes values bools": ("sizes", lambda s: s.update({NAME: True})),
    "protection counts missing": ("protection", _delete("counts")),
    "protection counts a list": ("protection", _set("counts", [])),
}

MANIFEST_CORRUPTIONS = {
    "garbage": _garbage_parquet,
    "empty file": lambda p: p.write_bytes(b""),
    "other schema": _other_schema_parquet,
    "null key and status": _null_rows,
    "written row without L∞": _bad_linf_rows,
}


def _files(layout: OutputLayout) -> dict[str, Path]:
    return {"run": layout.run_file, "stats": layout.stats(NAME), "sizes": layout.sizes_file,
            "protection": layout.protection_file}


CASES = (
    [(f"{which} {what}", which, "bytes", data) for which in ("run", "stats", "sizes", "protection")
     for what, data in JSON_CORRUPTIONS.items()]
    + [(f"stats {what}", "stats", "edit", edit) for what, edit in STATS_EDITS.items()]
    + [(f"run {what}", "run", "edit", edit) for what, edit in RUN_EDITS.items()]
    + [(what, which, "edit", edit) for what, (which, edit) in OTHER_EDITS.items()]
    + [(f"manifest {what}", "manifest", "call", fn) for what, fn in MANIFEST_CORRUPTIONS.items()]
)


@pytest.mark.parametrize("case, which, how, change", CASES, ids=[c[0] for c in CASES])
def test_every_malformed_file_is_a_problem_line_not_a_traceback(copy, case, which, how, change):
    layout = layout_of(copy)
    path = layout.manifest(NAME) if which == "manifest" else _files(layout)[which]
    if how == "bytes":
        path.write_bytes(change)
    elif how == "edit":
        edit_json(path, change)
    else:
        change(path)
    report = inspect_output(copy / "out")
    assert report["problems"], case
    result = runner.invoke(app, ["inspect", str(copy / "out")])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "problem" in result.output.lower()
    result = runner.invoke(app, ["inspect", str(copy / "out"), "--json"])
    assert result.exit_code == 1 and json.loads(result.output)["problems"]


def test_fifos_and_directories_in_place_of_files_do_not_hang_or_crash(copy):
    import os

    layout = layout_of(copy)
    layout.sizes_file.unlink()
    os.mkfifo(layout.sizes_file)  # reading it would block forever
    layout.protection_file.unlink()
    layout.protection_file.mkdir()
    (layout.stats_dir / "dir.json").mkdir()
    problems = problems_of(copy)
    assert any("sizes.json" in p for p in problems) and any("protection.json" in p for p in problems), problems


def test_hidden_copies_in_arrays_pickles_and_compressed_members_are_caught(copy):
    """What webdataset's default decoders turn back into the original pixels."""
    import gzip
    import pickle

    samples = read_samples(layout_of(copy).shard(NAME))
    original = read_samples(copy / "in" / NAME)[0].fields["png"]
    pixels = np.asarray(Image.open(io.BytesIO(original)))
    npy = io.BytesIO()
    np.save(npy, pixels)
    samples[0].fields["orig.npy"] = npy.getvalue()
    samples[0].fields["orig.png.gz"] = gzip.compress(original)
    samples[1].fields["orig.pyd"] = pickle.dumps(pixels)
    rewrite_shard(copy, samples)
    edit_json(layout_of(copy).stats(NAME), lambda st: st["members"].update(written=st["members"]["written"] + 3))
    problems = problems_of(copy, check_sources=False)
    assert any("'orig.png.gz' is an image but not the protected one" in p for p in problems), problems
    for ext in ("orig.npy", "orig.pyd"):
        assert any(f"member {ext!r} is an array, tensor, pickle" in p for p in problems), problems
