"""`fit t2ue` → `shard --method t2ue` (sample and class modes), resume, two processes, zero-contact."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, write_shard
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.pipeline.fit import fit_from_shards
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.shards.tario import iter_tar_samples

runner = CliRunner()
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = ["red", "green", "blue", "yellow"]


def _errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2ue")
    rng = np.random.default_rng(0)
    samples = [(f"s-{i:03d}", {"png": png_bytes(random_image(rng, 16, 16)), "cls": str(i % 4).encode(),
                               "txt": f"a {COLOURS[i % 4]} thing number {i}".encode()}) for i in range(32)]
    samples.append(("nocap", {"png": png_bytes(random_image(rng, 16, 16)), "cls": b"1"}))
    shard = write_shard(root / "data-000000.tar", samples)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    return root, shard, cfg


def _tiny_args(cfg):
    return ["--objective", "infonce", "--surrogate", str(cfg), "--noise-size", "16", "--width", "8", "--z-dim", "8", "--steps", "20",
            "--warmup-steps", "5", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def artifact(data):
    root, shard, cfg = data
    art = root / "art"
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(art), *_tiny_args(cfg)])
    assert result.exit_code == 0, result.output
    return art


def _protected_pixels(out, shard_name="data-000000.tar"):
    with open(out / "shards" / shard_name, "rb") as f:
        return {s.key: np.asarray(Image.open(io.BytesIO(s.fields["png"])).convert("RGB"))
                for s in iter_tar_samples(f)}


def test_fit_then_shard_sample_mode(data, artifact, tmp_path):
    root, shard, _ = data
    config = json.loads((artifact / "config.json").read_text())
    assert config["method"] == "t2ue" and config["backbone"] == "ssa" and config["n_train"] == 32
    assert not (artifact / "checkpoint.pt").exists()
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = inspect_output(out)
    assert report["problems"] == [] and report["counts"]["written"] == 32
    rows = {r["key"]: r for r in pq.read_table(out / "manifests" / "data-000000.parquet").to_pylist()}
    assert (rows["nocap"]["status"], rows["nocap"]["reason"]) == ("failed", "missing_caption")
    assert all(0 < r["linf"] <= 8 for r in rows.values() if r["status"] == "ok")


def test_class_mode_from_class_names(data, artifact, tmp_path):
    root, shard, _ = data
    names = root / "classes.json"
    names.write_text(json.dumps(COLOURS))
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--mode", "class", "--class-names", str(names), "--template", "a photo of a {}",
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert inspect_output(out)["counts"]["written"] == 33  # class mode needs labels, not captions
    protection = json.loads((out / "protection.json").read_text())
    assert protection["method"]["mode"] == "class" and protection["method"]["class_names"] == COLOURS
    result = runner.invoke(app, ["shard", str(shard), "-o", str(tmp_path / "x"), "-m", "t2ue",
                                 "--artifact", str(artifact), "--mode", "class"])
    assert result.exit_code == 2 and "class names" in _errors(result)[0]
    result = runner.invoke(app, ["shard", str(shard), "-o", str(tmp_path / "x"), "-m", "random", "--mode", "class"])
    assert result.exit_code == 2 and _errors(result) == ["error: method 'random' takes no --mode"]


def test_noise_and_apply_noise_reproduce_shard(data, artifact, tmp_path):
    root, shard, _ = data
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--seed", "3", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    protected = _protected_pixels(out)
    with open(shard, "rb") as f:
        source = {s.key: s.fields for s in iter_tar_samples(f)}
    for key in ("s-000", "s-007"):
        image = tmp_path / f"{key}.png"
        image.write_bytes(source[key]["png"])
        caption = source[key]["txt"].decode()
        noise = tmp_path / f"{key}-noise.png"
        result = runner.invoke(app, ["noise", "--artifact", str(artifact), "--text", caption, "--size", "16", "16",
                                     "--key", key, "--seed", "3", "-o", str(noise)])
        assert result.exit_code == 0, result.output
        mine = tmp_path / f"{key}-protected.png"
        result = runner.invoke(app, ["apply-noise", str(image), str(noise), "-o", str(mine)])
        assert result.exit_code == 0, result.output
        assert np.array_equal(np.asarray(Image.open(mine).convert("RGB")), protected[key])
    # errors: a size mismatch, an image that is not a noise file
    result = runner.invoke(app, ["noise", "--artifact", str(artifact), "--text", "x", "--size", "8", "8",
                                 "-o", str(tmp_path / "small.png")])
    assert result.exit_code == 0
    result = runner.invoke(app, ["apply-noise", str(tmp_path / "s-000.png"), str(tmp_path / "small.png"),
                                 "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "--size 16 16" in _errors(result)[0]
    result = runner.invoke(app, ["apply-noise", str(tmp_path / "s-000.png"), str(tmp_path / "s-000.png"),
                                 "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "not a noise file" in _errors(result)[0]


def test_interrupted_fit_resumes_to_the_same_artifact(data, artifact, tmp_path):
    root, shard, cfg = data
    options = {"objective": "infonce", "surrogate": str(cfg), "noise_size": 16, "width": 8, "z_dim": 8, "steps": 20, "warmup_steps": 5,
               "batch_size": 8, "epsilon": 8 / 255, "seed": 0, "device": "auto"}
    out = tmp_path / "art"

    def stop_at_20(event):
        if event.get("step") == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_from_shards("t2ue", [str(shard)], str(out), options, progress=stop_at_20, checkpoint_every=10)
    assert (out / "checkpoint.pt").is_file() and not (out / "config.json").exists()
    with pytest.raises(UserError, match="--resume"):
        fit_from_shards("t2ue", [str(shard)], str(out), options, quiet=True)
    with pytest.raises(UserError, match="other data or options"):
        fit_from_shards("t2ue", [str(shard)], str(out), {**options, "seed": 1}, quiet=True, resume=True)
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(out), *_tiny_args(cfg), "--resume"])
    assert result.exit_code == 0, result.output
    assert not (out / "checkpoint.pt").exists()
    for name in ("generator.safetensors", "text_encoder.safetensors"):
        assert (out / name).read_bytes() == (artifact / name).read_bytes(), name


def test_fit_on_two_processes(data, tmp_path):
    root, shard, cfg = data
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "uge_protect", "fit", "t2ue", str(shard), "-o", str(tmp_path / "art"), *_tiny_args(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert config["processes"] == 2 and config["loss_history"]


def test_fit_with_class_prompts_then_class_mode(data, tmp_path):
    root, shard, cfg = data
    art = tmp_path / "art-cls"
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(art), *_tiny_args(cfg), "--class-names",
                                 ",".join(COLOURS), "--template", "a {} thing", "--augment", "--lock-text",
                                 "--text-pool", "mean"])
    assert result.exit_code == 0, result.output
    config = json.loads((art / "config.json").read_text())
    assert config["class_names"] == COLOURS and config["template"] == "a {} thing"
    assert config["augment"] and config["lock_text"] and config["text_pool"] == "mean"
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(art),
                                 "--mode", "class", "--class-names", ",".join(COLOURS), "--template", "a {} thing",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(_protected_pixels(out)) == 33
    bad = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(tmp_path / "bad"), *_tiny_args(cfg),
                              "--class-names", "red,green"])
    assert bad.exit_code == 2 and _errors(bad) == ["error: label 3 has no class name (2 given)"]
