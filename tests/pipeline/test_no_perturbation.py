"""A protecting method never writes a sample it did not perturb: zero noise is not protection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import png_bytes, simple_samples, write_shard
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.pipeline.records import SampleRecord
from uge_protect.pipeline.run import protect_records
from uge_protect.shards.manifest import read_manifest
from uge_protect.methods import registry
from uge_protect.methods.base import ProtectBatch, ProtectionMethod
from uge_protect.methods.em.fit import fit_em
from uge_protect.methods.em.method import ErrorMinimizing
from uge_protect.methods.em.config import EMConfig
from uge_protect.methods.random_noise import PassThrough, RandomNoise

runner = CliRunner()


class Stub(ProtectionMethod):
    """+1 level everywhere, except zeros for keys ending in 0 or 5 and NaN for keys ending in 7."""

    name = "stub"

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        delta = torch.full(batch.pixels.shape, 1 / 255)
        for i, key in enumerate(batch.keys):
            if key[-1] in "05":
                delta[i] = 0.0
            elif key[-1] == "7":
                delta[i, 0, 0, 0] = float("nan")
        return delta


class Zeros(ProtectionMethod):
    """A broken method: zero noise for everything (a diverged artifact would do this)."""

    name = "zeros"

    def perturb(self, batch: ProtectBatch) -> torch.Tensor:
        return torch.zeros(batch.pixels.shape)


def _run(shard, out, method, **kw):
    cfg = ShardJobConfig(inputs=[str(shard)], output=str(out), num_workers=0, encode_threads=0, quiet=True, **kw)
    return run_shard_job(cfg, method)


def test_unperturbed_and_nan_samples_are_failed_never_written(tmp_path):
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 12, size=(8, 8)))
    out = tmp_path / "out"
    summary = _run(shard, out, Stub(), batch_size=4)
    rows = {r["key"]: r for r in read_manifest(out / "manifests" / "in.parquet").to_pylist()}
    for key, row in rows.items():
        expected = {"0": "no_perturbation", "5": "no_perturbation", "7": "non_finite_perturbation"}.get(key[-1])
        assert row["reason"] == expected, key
        assert (row["status"] == "ok") == (expected is None)
        if expected is None:
            assert row["linf"] == 1
    assert summary["counts"]["written"] == 12 - 4
    assert summary["failures"] == {"no_perturbation": 3, "non_finite_perturbation": 1}
    assert inspect_output(out)["problems"] == []


def test_a_batch_left_wholly_unperturbed_stops_the_run(tmp_path):
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 4, size=(8, 8)))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="method 'zeros' left all 4 images of a batch unprotected"):
        _run(shard, out, Zeros())
    assert not list(out.glob("shards/*.tar")) and not list(out.glob("shards/.*"))


def test_the_cli_stops_with_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._METHODS, "zeros", registry.MethodEntry("zeros", Zeros))
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 4, size=(8, 8)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "zeros", "--workers", "0", "--quiet"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "diverged artifact" in errors[0]
    assert not list(out.glob("shards/*.tar"))


def _records(images: list[np.ndarray]) -> list[SampleRecord]:
    return [SampleRecord(key=f"k{i}", index=i, pixels=torch.from_numpy(img), label=i % 2)
            for i, img in enumerate(images)]


def test_the_benchmark_pass_through_control_still_writes_its_unchanged_samples():
    images = [np.full((4, 4, 3), 9, np.uint8)] * 2
    out = protect_records(_records(images), PassThrough(epsilon=0.0), 0, torch.device("cpu"))
    assert all(o is not None and np.array_equal(o, images[0]) for o in out)


def test_all_white_and_all_black_images_are_perturbed_by_real_methods():
    """No practical false positive: noise of both signs survives the [0, 255] clip somewhere."""
    white, black = np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16, 3), np.uint8)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    config, weights = fit_em(images, torch.arange(16) % 2, EMConfig(surrogate_width=4, train_batches=1, max_rounds=1,
                                                                   pgd_steps=1, batch_size=8, device="cpu"))
    for method in (RandomNoise(epsilon=1 / 255), ErrorMinimizing(config, weights)):
        records = _records([white, black, white, black])
        out = protect_records(records, method, 0, torch.device("cpu"))
        assert all(r.ok for r in records), [r.reason for r in records]
        assert all(not np.array_equal(o, src) for o, src in zip(out, [white, black, white, black]))


def test_a_single_png_sample_is_protected_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    shard = write_shard(tmp_path / "in.tar", [("only", {"png": png_bytes(rng.integers(0, 256, (8, 8, 3), np.uint8))})])
    summary = _run(shard, tmp_path / "out", RandomNoise(epsilon=2 / 255))
    assert summary["counts"]["written"] == 1
