"""Downstream training reads the published layout: datasets, open_clip's trainer, a PyTorch loader."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from uge_protect.hub.recipes import pytorch_recipe
from uge_protect.hub.push import stage_output

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def staged(protected_output, tmp_path_factory) -> Path:
    stage = tmp_path_factory.mktemp("stage") / "repo"
    stage_output(protected_output, "me/demo", stage)
    return stage


def _manifest_rows(stage: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((stage / "manifests").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["key"]] = row
    return rows


def _check_rows(ds, stage: Path) -> None:
    manifest = _manifest_rows(stage)
    written = sum(json.loads((stage / "shards" / "sizes.json").read_text()).values())
    assert written == 64 and ds.num_rows == written
    for i in (0, 17, 63):
        row = ds[i]
        image = row["png"]
        assert isinstance(image, Image.Image) and image.size == (32, 32)
        assert np.asarray(image.convert("RGB")).shape == (32, 32, 3)
        m = manifest[row["__key__"]]
        assert row["txt"] == m["caption"] and row["cls"] == m["label"]


def test_datasets_loads_the_card_default_config_not_the_manifests(staged, tmp_path):
    # as the Hub loads the repository; a fresh cache: datasets caches a local folder under its name
    ds = datasets.load_dataset(str(staged), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert {"png", "txt", "cls", "__key__"} <= set(ds.column_names)
    _check_rows(ds, staged)


def test_datasets_webdataset_loader_and_manifests(staged, tmp_path):
    cache = str(tmp_path / "hf-cache")
    ds = datasets.load_dataset("webdataset", data_files={"train": str(staged / "shards" / "*.tar")}, split="train",
                               cache_dir=cache)
    _check_rows(ds, staged)
    # the card's way to load the manifests
    man = datasets.load_dataset(str(staged), data_files={"train": "manifests/*.parquet"}, split="train",
                                cache_dir=cache)
    assert man.num_rows == 64 and "sha256_protected" in man.column_names


def test_without_a_card_datasets_takes_the_manifests_for_the_data(output_copy):
    """Why the card declares its configs: the raw output directory loads as parquet."""
    shutil.rmtree(output_copy / "eval")
    ds = datasets.load_dataset(str(output_copy), split="train", cache_dir=str(output_copy.parent / "hf-cache"))
    assert "sha256_protected" in ds.column_names and "png" not in ds.column_names


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_pytorch_recipe_of_the_card_trains_a_classifier(staged, tmp_path, monkeypatch):
    """The card's recipe, run as written after `hf download ... --local-dir data`."""
    card = (staged / "README.md").read_text(encoding="utf-8")
    recipe = next(b for b in _python_blocks(card) if "DataLoader" in b)
    (tmp_path / "data").symlink_to(staged, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(recipe, "recipe", "exec"), ns)  # noqa: S102 - our own documented recipe
    images, labels = ns["images"], ns["labels"]  # the last batch of the training loop
    assert images.shape[1:] == (3, 32, 32) and not labels.dtype.is_floating_point
    assert np.isfinite(float(ns["loss"].detach()))
    seen = [int(label) for _, batch_labels in ns["loader"] for label in batch_labels]
    manifest_labels = sorted(r["label"] for r in _manifest_rows(staged).values())
    assert sorted(seen) == manifest_labels  # every written sample once per epoch, labels intact


def test_readme_recipe_is_the_tested_one():
    text = README.read_text(encoding="utf-8")
    marker = "<!-- recipe: pytorch-classifier -->"
    assert marker in text
    block = _python_blocks(text.split(marker, 1)[1])[0]
    assert block == pytorch_recipe("data/shards/demo-train-{000000..000004}.tar", "png", 10, 32)


def test_open_clip_trains_on_the_shards_through_its_own_entry_point(staged, tmp_path):
    """open_clip's training program, a tiny random-init CLIP, CPU, one epoch; no --train-num-samples."""
    model_dir = tmp_path / "tiny-clip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }}))
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
           "--train-data", str(staged / "shards" / "demo-train-{000000..000001}.tar"),
           "--model", f"local-dir:{model_dir}", "--batch-size", "8", "--workers", "1", "--epochs", "1",
           "--device", "cpu", "--warmup", "1", "--lr", "1e-3", "--save-frequency", "0",
           "--logs", str(tmp_path / "logs"), "--name", "tiny", "--report-to", ""]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    # it read sizes.json (64 samples) and ran through the epoch
    assert re.search(r"Train Epoch: 0 \[\s*64/64 \(100%\)\]", log), log[-3000:]
    loss = float(re.findall(r"Contrastive_loss: ([0-9.]+)", log)[-1])
    assert np.isfinite(loss)


def test_failed_samples_are_counted_and_not_rows(tmp_path):
    """A sample that could not be protected is in the manifest and the card, not in the data."""
    from tests.helpers import simple_samples, write_shard
    from uge_protect.pipeline import ShardJobConfig, run_shard_job
    from uge_protect.methods.registry import create_method

    samples = list(simple_samples("s", 8, size=(16, 16)))
    samples[3][1]["png"] = b"this is not an image"
    write_shard(tmp_path / "in-000000.tar", samples[:4])
    write_shard(tmp_path / "in-000001.tar", samples[4:])
    run_shard_job(ShardJobConfig(inputs=[str(tmp_path / "in-*.tar")], output=str(tmp_path / "out"),
                                 num_workers=0, encode_threads=0, quiet=True), create_method("random"))
    stage = tmp_path / "stage"
    stage_output(tmp_path / "out", "me/failures", stage)
    card = (stage / "README.md").read_text(encoding="utf-8")
    assert "| input samples | 8 |" in card and "| written (protected) samples | 7 |" in card
    assert "| failed samples (not written) | 1 |" in card and "`undecodable_image` 1" in card
    ds = datasets.load_dataset(str(stage), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 7 and "s-00003" not in ds["__key__"]
    assert sorted(ds["cls"]) == sorted(int(s[1]["cls"]) for i, s in enumerate(samples) if i != 3)


def test_empty_shards_are_left_out(tmp_path):
    """An empty output shard (empty input, or every sample failed) is not published; datasets'
    loader could not infer features if it came first. Its manifest still is."""
    from typer.testing import CliRunner

    from tests.helpers import simple_samples, write_shard
    from uge_protect.cli.app import app
    from uge_protect.pipeline import ShardJobConfig, run_shard_job
    from uge_protect.methods.registry import create_method

    write_shard(tmp_path / "in-000000.tar", [])
    write_shard(tmp_path / "in-000001.tar", simple_samples("s", 5, size=(16, 16)))
    run_shard_job(ShardJobConfig(inputs=[str(tmp_path / "in-*.tar")], output=str(tmp_path / "out"),
                                 num_workers=0, encode_threads=0, quiet=True), create_method("random"))
    stage = tmp_path / "empty-shard-stage"
    plan = stage_output(tmp_path / "out", "me/empty", stage)
    assert any("hold no protected sample" in w for w in plan.warnings)
    assert not (stage / "shards" / "in-000000.tar").exists() and (stage / "manifests" / "in-000000.parquet").is_file()
    assert json.loads((stage / "shards" / "sizes.json").read_text()) == {"in-000001.tar": 5}
    assert "shards/in-000001.tar" in (stage / "README.md").read_text(encoding="utf-8")
    ds = datasets.load_dataset(str(stage), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 5
    result = CliRunner().invoke(app, ["inspect", str(stage), "--no-sources"])
    assert result.exit_code == 0, result.output
