"""A small protected output directory with an evaluation report, shared by the hub tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from uge_protect.eval.runner import EvalConfig, run_evaluation
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.shards.demo import write_demo_dataset
from uge_protect.methods.registry import create_method


@pytest.fixture(scope="session")
def protected_output(tmp_path_factory) -> Path:
    """64 demo samples (32×32, two shards of 32) protected with `random`, plus a 1-epoch
    evaluation report in OUT/eval. Tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("hubdata")
    write_demo_dataset(root / "data", n_train=64, n_test=32, image_size=32, samples_per_shard=32, seed=0)
    out = root / "out"
    run_shard_job(
        ShardJobConfig(inputs=[str(root / "data" / "train" / "*.tar")], output=str(out), num_workers=0,
                       encode_threads=0, quiet=True),
        create_method("random"),
    )
    run_evaluation(EvalConfig(protected=str(out), clean_train=[str(root / "data" / "train" / "*.tar")],
                              test=[str(root / "data" / "test" / "*.tar")], output=str(out / "eval"),
                              archs=["small_cnn"], epochs=1, batch_size=32, quiet=True, device="cpu"))
    return out


@pytest.fixture
def output_copy(protected_output, tmp_path) -> Path:
    """A private copy of the shared output directory."""
    dest = tmp_path / "out"
    shutil.copytree(protected_output, dest)
    return dest
