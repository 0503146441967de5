"""End-to-end behaviour of the streaming pipeline on tiny shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from uge_protect.errors import UserError
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.pipeline.resume import DirectoryLock
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.manifest import read_manifest
from uge_protect.shards.tario import iter_tar_samples
from uge_protect.methods.registry import create_method


def run(inputs, out, method="random", **kw):
    kw.setdefault("num_workers", 0)
    cfg = ShardJobConfig(inputs=[str(p) for p in inputs], output=str(out), quiet=True, **kw)
    return run_shard_job(cfg, create_method(method, allow_hidden=True))


def read_tar(path):
    with open(path, "rb") as f:
        return list(iter_tar_samples(f))


def output_bytes(out):
    layout = OutputLayout(out)
    files = sorted(layout.shards_dir.glob("*.tar")) + sorted(layout.manifests_dir.glob("*.parquet"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_one_output_shard_per_input_with_same_keys_fields_and_budget(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=9)
    out = tmp_path / "out"
    summary = run(shards, out, batch_size=4)
    layout = OutputLayout(out)
    assert sorted(p.name for p in layout.shards_dir.glob("*.tar")) == [p.name for p in shards]
    for src in shards:
        original, protected = read_tar(src), read_tar(layout.shard(src.name))
        assert [s.key for s in protected] == [s.key for s in original]
        for a, b in zip(original, protected):
            assert list(b.fields) == list(a.fields)  # same fields, same order (png stays png)
            for ext in ("txt", "cls", "json"):
                assert b.fields[ext] == a.fields[ext]
            x = np.asarray(Image.open(io.BytesIO(a.fields["png"])).convert("RGB"), dtype=np.int16)
            y = np.asarray(Image.open(io.BytesIO(b.fields["png"])), dtype=np.int16)
            assert Image.open(io.BytesIO(b.fields["png"])).format == "PNG"
            diff = np.abs(x - y)
            assert diff.max() <= 8 and diff.max() > 0
        rows = read_manifest(layout.manifest(src.name)).to_pylist()
        assert [r["key"] for r in rows] == [s.key for s in original]
        assert all(r["status"] == "ok" and 0 < r["linf"] <= 8 and r["psnr"] > 30 for r in rows)
        assert rows[0]["caption"].endswith("café") and rows[3]["label"] == 3
    sizes = json.loads(layout.sizes_file.read_text())
    assert sizes == {p.name: 9 for p in shards}
    assert summary["counts"] == {"shards": 2, "shards_missing": 0, "samples": 18, "written": 18, "failed": 0, "skipped_members": 0}
    assert summary["budget"]["levels"] == 8 and summary["budget"]["linf_max"] == 8
    report = inspect_output(out)
    assert report["problems"] == []
    assert report["counts"]["written"] == 18


def test_output_is_independent_of_batch_size_and_workers(make_shards, tmp_path):
    shards = make_shards(n_shards=3, per_shard=7)
    run(shards, tmp_path / "a", batch_size=2, num_workers=0)
    run(shards, tmp_path / "b", batch_size=5, num_workers=2, encode_threads=3)
    a, b = output_bytes(tmp_path / "a"), output_bytes(tmp_path / "b")
    assert a and a == b


def test_seed_changes_noise(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=3)
    run(shards, tmp_path / "a", seed=1)
    run(shards, tmp_path / "b", seed=2)
    assert output_bytes(tmp_path / "a") != output_bytes(tmp_path / "b")


def test_rerun_skips_complete_shards_and_redoes_partial_ones(make_shards, tmp_path):
    shards = make_shards(n_shards=3, per_shard=6)
    ref = tmp_path / "ref"
    run(shards, ref)
    out = tmp_path / "out"
    run(shards, out)
    layout = OutputLayout(out)
    # Simulate a crash in shard 1: marker gone, tar cut short, a temp file left behind.
    layout.stats(shards[1].name).unlink()
    data = layout.shard(shards[1].name).read_bytes()
    layout.shard(shards[1].name).write_bytes(data[: len(data) // 2])
    (layout.shards_dir / f".{shards[2].name}.tmp-99999").write_bytes(b"partial")
    summary = run(shards, out)
    assert summary["timings"]["shards_processed"] == 1
    assert summary["timings"]["shards_skipped"] == 2
    assert output_bytes(out) == output_bytes(ref)
    assert not layout.temp_files()
    assert inspect_output(out)["problems"] == []


def test_different_configuration_is_refused_unless_overwrite(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=3)
    out = tmp_path / "out"
    run(shards, out, seed=1)
    with pytest.raises(UserError, match="different configuration.*seed"):
        run(shards, out, seed=2)
    run(shards, out, seed=2, overwrite=True)
    run(shards, tmp_path / "fresh", seed=2)
    assert output_bytes(out) == output_bytes(tmp_path / "fresh")


def test_concurrent_run_is_refused_by_the_lock(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=2)
    out = tmp_path / "out"
    out.mkdir()
    lock = DirectoryLock(OutputLayout(out).lock_file)
    lock.acquire()
    try:
        with pytest.raises(UserError, match="another uge-protect run is writing"):
            run(shards, out)
    finally:
        lock.release()
    run(shards, out)  # free again once the other run ends


def test_webp_lossless_keeps_budget_and_jpeg_needs_explicit_flag(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=4)
    run(shards, tmp_path / "webp", image_format="webp")
    layout = OutputLayout(tmp_path / "webp")
    samples = read_tar(layout.shard(shards[0].name))
    assert all("webp" in s.fields and "png" not in s.fields for s in samples)
    assert inspect_output(tmp_path / "webp")["problems"] == []
    with pytest.raises(UserError, match="allow-lossy"):
        run(shards, tmp_path / "jpeg", image_format="jpeg")
    run(shards, tmp_path / "jpeg", image_format="jpeg", allow_lossy=True)
    rows = read_manifest(OutputLayout(tmp_path / "jpeg").manifest(shards[0].name)).to_pylist()
    assert all(r["lossy"] and r["image_format"] == "jpeg" for r in rows)
    assert all("jpg" in s.fields for s in read_tar(OutputLayout(tmp_path / "jpeg").shard(shards[0].name)))


@pytest.mark.parametrize("mode,expected", [("center_crop", (16, 16)), ("keep_ratio", (16, 20))])
def test_resize_modes(make_shards, tmp_path, mode, expected):
    shards = make_shards(n_shards=1, per_shard=2, size=(24, 30))
    out = tmp_path / mode
    run(shards, out, image_size=16, resize_mode=mode)
    for s in read_tar(OutputLayout(out).shard(shards[0].name)):
        assert Image.open(io.BytesIO(s.fields["png"])).size[::-1] == expected
    assert inspect_output(out)["problems"] == []


def test_passthrough_writes_identical_pixels(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=3)
    run(shards, tmp_path / "p", method="passthrough")
    rows = read_manifest(OutputLayout(tmp_path / "p").manifest(shards[0].name)).to_pylist()
    assert all(r["linf"] == 0 for r in rows)


def test_inspect_detects_tampering(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=3)
    out = tmp_path / "out"
    run(shards, out)
    layout = OutputLayout(out)
    # Replace a written image with the unprotected original: hashes and sizes no longer agree.
    samples = read_tar(layout.shard(shards[0].name))
    original = read_tar(shards[0])
    from uge_protect.shards.tario import write_tar_atomic

    members = []
    for i, s in enumerate(samples):
        for ext, data in s.fields.items():
            members.append((f"{s.key}.{ext}", original[i].fields["png"] if (i == 1 and ext == "png") else data))
    write_tar_atomic(layout.shard(shards[0].name), members)
    problems = inspect_output(out)["problems"]
    assert any("sha256" in p for p in problems)
    assert any("differ from the manifest hash" in p for p in problems)


def test_log_json_records_shards(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=3)
    log = tmp_path / "log.jsonl"
    run(shards, tmp_path / "out", log_json=str(log))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    done = [e for e in events if e["event"] == "shard_done"]
    assert sorted(e["shard"] for e in done) == [p.name for p in shards]
    names = [e["event"] for e in events]
    assert names[0] == "run_start" and events[0]["inputs"] == 2
    assert names[-2:] == ["rank_done", "run_end"] and events[-2]["written"] == 6
    assert events[-1]["written"] == 6 and events[-1]["samples"] == 6 and events[-1]["failed"] == 0


def test_inspect_reports_a_damaged_output_shard(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=4)
    out = tmp_path / "out"
    run(shards, out)
    path = OutputLayout(out).shard(shards[0].name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    problems = inspect_output(out)["problems"]
    assert any("output shard is damaged" in p for p in problems)


def test_second_image_in_compound_field_is_never_copied_unprotected(tmp_path):
    from tests.helpers import png_bytes, random_image, write_shard

    rng = np.random.default_rng(0)
    shard = write_shard(tmp_path / "m.tar", [
        ("a", {"png": png_bytes(random_image(rng)), "seg.png": png_bytes(random_image(rng)), "txt": b"x"}),
        ("b", {"jpg.txt": b"not an image", "png": png_bytes(random_image(rng))}),
    ])
    out = tmp_path / "out"
    run([shard], out)
    rows = read_manifest(OutputLayout(out).manifest("m.tar")).to_pylist()
    assert [(r["key"], r["status"], r["reason"]) for r in rows] == [
        ("a", "failed", "multiple_images"), ("b", "ok", None)]
    assert [s.key for s in read_tar(OutputLayout(out).shard("m.tar"))] == ["b"]


def test_inspect_says_how_many_sources_it_compared(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=2)
    out = tmp_path / "out"
    run(shards, out)
    assert inspect_output(out)["sources_checked"] == 2
    assert inspect_output(out, check_sources=False)["sources_checked"] == 0
    shards[1].unlink()  # a source that is gone can no longer be compared
    report = inspect_output(out)
    assert report["sources_checked"] == 1 and report["problems"] == []


def test_mixed_precision_runs_every_batch(make_shards, tmp_path):
    """bf16 autocast wraps each pass afresh (a context is single-use), also after a
    full-precision job in the same process; the budget holds."""
    import torch

    shards = make_shards(n_shards=1, per_shard=9)
    run(shards, tmp_path / "fp32", batch_size=4)
    method = create_method("random", allow_hidden=True)
    perturb, seen = method.perturb, []

    def recording(batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return perturb(batch)

    method.perturb = recording
    cfg = ShardJobConfig(inputs=[str(p) for p in shards], output=str(tmp_path / "bf16"), quiet=True,
                         num_workers=0, batch_size=2, mixed_precision="bf16")
    summary = run_shard_job(cfg, method)
    assert summary["counts"]["written"] == 9 and summary["counts"]["failed"] == 0
    assert summary["budget"]["linf_max"] <= 8
    assert len(seen) == 5 and all(seen)
