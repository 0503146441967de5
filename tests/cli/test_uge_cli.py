"""`fit uge` → `shard --method uge` → `eval --authorized`: secrets stay out of every output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.helpers import png_bytes, write_shard
from tests.methods.test_uge import TINY_FEATURES, stripes
from uge_protect.cli.app import app
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.methods.uge.key import build_authorized

runner = CliRunner()
KEY = "b7e15163a9d2f4c08e6b1a3d5c7f9e20"


def _errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def _shard(path, images, labels, prefix, extra=()):
    samples = [(f"{prefix}-{i:03d}", {"png": png_bytes(img.permute(1, 2, 0).numpy()), "cls": str(int(y)).encode()})
               for i, (img, y) in enumerate(zip(images, labels))]
    return write_shard(path, [*samples, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("uge")
    images, labels = stripes(40, seed=0)
    nolabel = ("nolabel", {"png": png_bytes(images[0].permute(1, 2, 0).numpy())})
    train = _shard(root / "train-000000.tar", images, labels, "tr", [nolabel])
    test_images, test_labels = stripes(24, seed=1)
    test = _shard(root / "test-000000.tar", test_images, test_labels, "te")
    features = root / "features.json"
    features.write_text(json.dumps(TINY_FEATURES))
    return root, train, test, features


def _tiny_args(features):
    return ["--authorized", "small_cnn", "--student", "vgg11", "--feature-model", str(features), "--width", "8",
            "--depth", "2", "--steps", "4", "--batch-size", "16", "--authorized-epochs", "1", "--feature-epochs", "1",
            "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def artifact(data):
    root, train, _, features = data
    art = root / "art"
    result = runner.invoke(app, ["fit", "uge", str(train), "-o", str(art), "--key-seed", str(KEY),
                                 *_tiny_args(features)])
    assert result.exit_code == 0, result.output
    return art


def _all_bytes(directory):
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_fit_shard_and_no_secret_in_outputs(data, artifact, tmp_path):
    _, train, _, _ = data
    config = json.loads((artifact / "config.json").read_text())
    assert config["method"] == "uge" and config["key_seed"] == KEY and config["n_train"] == 40
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(train), "-o", str(out), "-m", "uge", "--artifact", str(artifact),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert inspect_output(out)["counts"]["written"] == 40
    rows = {r["key"]: r for r in pq.read_table(out / "manifests" / "train-000000.parquet").to_pylist()}
    assert (rows.pop("nolabel")["reason"]) == "missing_label"  # the class patterns need the label
    assert all(r["status"] == "ok" and r["linf"] <= 8 for r in rows.values())
    assert max(r["linf"] for r in rows.values()) > 0
    protection = json.loads((out / "protection.json").read_text())
    assert protection["method"]["key_fingerprint"] == config["key_fingerprint"]
    assert "key_seed" not in json.dumps(protection)
    # neither the key nor the authorized network's weights appear in any output file
    owner = build_authorized("small_cnn", 2, KEY)
    weight = owner.net.net[0].weight.detach().numpy().astype(np.float32).tobytes()[:64]
    for path, blob in _all_bytes(out).items():
        assert str(KEY).encode() not in blob, path
        assert weight not in blob, path


def test_eval_authorized_other_key_and_distilled_student(data, artifact, tmp_path):
    _, _, test, _ = data
    report_dir = tmp_path / "report"
    labelled = tmp_path / "labelled"
    images, labels = stripes(40, seed=0)
    clean = _shard(tmp_path / "clean-000000.tar", images, labels, "tr")
    assert runner.invoke(app, ["shard", str(clean), "-o", str(labelled), "-m", "uge", "--artifact", str(artifact),
                               "--workers", "0", "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["eval", "--protected", str(labelled), "--clean-train", str(clean), "--test",
                                 str(test), "-o", str(report_dir), "--arch", "small_cnn", "--authorized",
                                 str(artifact), "--other-key", "7", "--distill", "small_cnn", "--epochs", "2",
                                 "--batch-size", "16", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["arch"] for r in report["tasks"]["classify"]["summary"]}
    assert rows == {"small_cnn", "small_cnn+key", "small_cnn+key:7", "small_cnn<-small_cnn+key"}
    assert report["protection"]["authorized"]["arch"] == "small_cnn"
    assert report["protection"]["authorized"]["confidence_gate"] is True
    for path, blob in _all_bytes(report_dir).items():
        assert str(KEY).encode() not in blob, path
    # the authorized network's run on protected data is its run on clean data (same seed, invisible noise)
    summary = {r["arch"]: r for r in report["tasks"]["classify"]["summary"]}
    owner = summary["small_cnn+key"]
    assert owner["protected"]["final_test_acc"]["mean"] == owner["clean"]["final_test_acc"]["mean"]
    # the fit's student (vgg11) and feature space are recorded; the owner has its own role; the
    # authorized architecture without the key, another key and the distilled student are held out
    fitted = json.loads((artifact / "config.json").read_text())["fit_architectures"]
    assert report["protection"]["fit_architectures"] == fitted
    assert fitted[0] == "vgg11" and fitted[1].startswith("clip:vit-") and len(fitted) == 2
    assert summary["small_cnn+key"]["role"] == "owner"
    assert {summary[a]["role"] for a in ("small_cnn", "small_cnn+key:7", "small_cnn<-small_cnn+key")} == {"held out"}


def test_fit_uge_errors(data, tmp_path):
    root, train, _, _ = data
    result = runner.invoke(app, ["fit", "uge", str(train), "-o", str(tmp_path / "a"), "--authorized", "alexnet"])
    assert result.exit_code == 2 and "unknown authorized architecture" in _errors(result)[0]
    result = runner.invoke(app, ["fit", "uge", str(train), "-o", str(tmp_path / "a"), "--authorized", "small_cnn",
                                 "--no-key-projection", "--student", "small_cnn"])
    assert result.exit_code == 2 and "other architectures than the authorized" in _errors(result)[0]
    result = runner.invoke(app, ["fit", "uge", str(train), "-o", str(tmp_path / "a"), "--authorized", "small_cnn",
                                 "--gate-scale", "0.5"])
    assert result.exit_code == 2 and "gate scale must be >= 1" in _errors(result)[0]
    result = runner.invoke(app, ["eval", "--protected", str(tmp_path), "--clean-train", str(train), "--test",
                                 str(train), "-o", str(tmp_path / "r"), "--other-key", "3"])
    assert result.exit_code == 2 and "need --authorized" in _errors(result)[0]


def test_image_only_needs_no_label_and_a_fresh_key_is_drawn(data, tmp_path):
    _, train, _, features = data
    art = tmp_path / "art"
    result = runner.invoke(app, ["fit", "uge", str(train), "-o", str(art), "--image-only", "--lr", "0.05",
                                 *_tiny_args(features)])
    assert result.exit_code == 0, result.output
    config = json.loads((art / "config.json").read_text())
    assert not config["label_conditioned"] and len(config["key_seed"]) == 64  # 256 fresh bits, as hex
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(train), "-o", str(out), "-m", "uge", "--artifact", str(art),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert inspect_output(out)["counts"]["written"] == 41  # the unlabelled sample too


def test_fit_on_two_processes(data, tmp_path):
    _, train, _, features = data
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "uge_protect", "fit", "uge", str(train), "-o", str(tmp_path / "art"), *_tiny_args(features)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["processes"] == 2 and config["loss_history"]
