"""T2UE's default (em) objective: `fit t2ue TRAIN` with no options, then `shard -m t2ue`.

The caption encoder is the real MiniLM from its installed package; the fits are cut short
(few EM rounds and regression steps) so each takes seconds.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, write_shard
from uge_protect.cli.app import app
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.shards.tario import iter_tar_samples
from uge_protect.methods.base import ProtectBatch
from uge_protect.methods.t2ue.method import TextToUnlearnable
from uge_protect.models.text_encoders import MINILM_SHA256

runner = CliRunner()
COLOURS = ["red", "green", "blue", "yellow"]
FAST = ["--steps", "60", "--em-rounds", "2", "--quiet"]


def _errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2ue-em")
    rng = np.random.default_rng(0)
    samples = [(f"s-{i:03d}", {"png": png_bytes(random_image(rng, 16, 16)), "cls": str(i % 4).encode(),
                               "txt": f"a {COLOURS[i % 4]} thing number {i}".encode()}) for i in range(40)]
    samples.append(("nocap", {"png": png_bytes(random_image(rng, 16, 16)), "cls": b"1"}))
    return root, write_shard(root / "data-000000.tar", samples)


@pytest.fixture(scope="module")
def artifact(data):
    root, shard = data
    art = root / "art"
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(art), "--class-names", ",".join(COLOURS), *FAST])
    assert result.exit_code == 0, result.output
    return art


def _pixels(out):
    with open(out / "shards" / "data-000000.tar", "rb") as f:
        return {s.key: np.asarray(Image.open(io.BytesIO(s.fields["png"])).convert("RGB")) for s in iter_tar_samples(f)}


def test_the_default_fit_records_its_encoder_concepts_and_surrogate(artifact):
    config = json.loads((artifact / "config.json").read_text())
    assert (config["objective"], config["backbone"], config["text_encoder"]) == ("em", "mlp", "minilm")
    ident = config["text_encoder_identity"]
    assert config["text_encoding"] == "static"
    assert {k: ident[k] for k in ("name", "sha256", "dim", "pooling")} == {
        "name": "minilm", "sha256": MINILM_SHA256, "dim": 384, "pooling": "static-mean"}
    assert (config["concept_source"], config["num_concepts"], config["n_train"]) == ("labels", 4, 40)
    assert config["fit_architectures"] == ["small_cnn"] and config["em"]["rounds"] == 2
    assert 0 <= config["regression"]["mse"] < 1 and config["steps"] == 60
    assert not (artifact / "checkpoint.pt").exists()
    # the artifact carries the token table and the tokenizer, never the encoder's weights
    tensors = load_file(artifact / "text_encoder.safetensors")
    assert set(tensors) == {"static_table", "tokenizer.json"} and tensors["static_table"].shape == (30522, 384)


def test_a_static_artifact_applies_without_the_encoder_package(data, artifact, tmp_path, monkeypatch):
    import importlib.util

    _, shard = data
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "all_minilm_l6_v2" else real(name, *a))
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(_pixels(out)) == 40


def test_a_contextual_fit_names_the_package_encoder_by_its_hash_and_copies_nothing(data, tmp_path):
    _, shard = data
    art = tmp_path / "ctx"
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(art), "--text-encoding", "contextual", *FAST])
    assert result.exit_code == 0, result.output
    config = json.loads((art / "config.json").read_text())
    assert config["text_encoder_identity"] == {"name": "minilm", "sha256": MINILM_SHA256, "dim": 384, "pooling": "mean"}
    assert not list(art.glob("text_encoder*"))
    errors = _errors(runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(tmp_path / "bad"),
                                         "--text-encoding", "static", "--text-encoder", "open_clip", *FAST]))
    assert errors == ["error: the open_clip caption encoder is contextual only: drop --text-encoding static"]


def test_shard_from_captions_records_missing_captions_and_stays_in_budget(data, artifact, tmp_path):
    _, shard = data
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = inspect_output(out)
    assert report["problems"] == [] and report["counts"]["written"] == 40
    rows = {r["key"]: r for r in pq.read_table(out / "manifests" / "data-000000.parquet").to_pylist()}
    assert (rows["nocap"]["status"], rows["nocap"]["reason"]) == ("failed", "missing_caption")
    assert all(0 < r["linf"] <= 8 for r in rows.values() if r["status"] == "ok")
    method = json.loads((out / "protection.json").read_text())["method"]
    assert method["objective"] == "em" and method["fit_architectures"] == ["small_cnn"]
    # the same run with another batch size writes the same pixels
    other = tmp_path / "other"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(other), "-m", "t2ue", "--artifact", str(artifact),
                                 "--batch-size", "7", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    a, b = _pixels(out), _pixels(other)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_noise_needs_the_caption_only_and_noise_apply_noise_reproduce_shard(data, artifact, tmp_path):
    _, shard = data
    method = TextToUnlearnable.from_artifact(str(artifact))
    captions = ["a red thing number 3", "a blue thing number 9"]
    deltas = []
    for fill in (0, 255):  # two batches that differ in every pixel, same captions and keys
        pixels = torch.full((2, 3, 16, 16), fill, dtype=torch.uint8)
        deltas.append(method.perturb(ProtectBatch(pixels, ["k0", "k1"], [1, 2], captions, [None, None])))
    assert torch.equal(deltas[0], deltas[1]) and float(deltas[0].abs().max()) <= 8 / 255 + 1e-6
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--seed", "3", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    protected = _pixels(out)
    with open(shard, "rb") as f:
        source = {s.key: s.fields for s in iter_tar_samples(f)}
    for key in ("s-001", "s-006"):
        (tmp_path / f"{key}.png").write_bytes(source[key]["png"])
        noise = tmp_path / f"{key}-noise.png"
        result = runner.invoke(app, ["noise", "--artifact", str(artifact), "--text", source[key]["txt"].decode(),
                                     "--size", "16", "16", "--key", key, "--seed", "3", "-o", str(noise)])
        assert result.exit_code == 0, result.output
        mine = tmp_path / f"{key}-mine.png"
        result = runner.invoke(app, ["apply-noise", str(tmp_path / f"{key}.png"), str(noise), "-o", str(mine)])
        assert result.exit_code == 0, result.output
        assert np.array_equal(np.asarray(Image.open(mine).convert("RGB")), protected[key])


def test_class_mode_from_the_class_prompts_the_fit_learned(data, artifact, tmp_path):
    _, shard = data
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "t2ue", "--artifact", str(artifact),
                                 "--mode", "class", "--class-names", ",".join(COLOURS), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert inspect_output(out)["counts"]["written"] == 41  # labels, not captions
    pixels, source = _pixels(out), {}
    with open(shard, "rb") as f:
        source = {s.key: np.asarray(Image.open(io.BytesIO(s.fields["png"])).convert("RGB")).astype(int)
                  for s in iter_tar_samples(f)}
    # class mode: one noise per class (where no pixel is clipped at 0 or 255)
    d0, d4 = pixels["s-000"].astype(int) - source["s-000"], pixels["s-004"].astype(int) - source["s-004"]
    free = (source["s-000"] >= 8) & (source["s-000"] <= 247) & (source["s-004"] >= 8) & (source["s-004"] <= 247)
    assert free.sum() > 100 and np.array_equal(d0[free], d4[free])


def test_concepts_from_clusters_or_from_a_concepts_file(data, tmp_path):
    _, shard = data
    art = tmp_path / "clusters"
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(art), "--clusters", "3", *FAST])
    assert result.exit_code == 0, result.output
    config = json.loads((art / "config.json").read_text())
    assert (config["concept_source"], config["num_concepts"]) == ("clusters", 3)
    names = tmp_path / "concepts.txt"
    names.write_text("red\ngreen\nblue\nyellow\n")
    art = tmp_path / "concepts"
    result = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(art), "--concepts", str(names), *FAST])
    assert result.exit_code == 0, result.output
    config = json.loads((art / "config.json").read_text())
    assert config["concept_source"] == "concepts" and config["concepts"] == ["red", "green", "blue", "yellow"]
    # every caption names its colour: each sample's concept is its colour's
    assert config["concept_counts"] == [10, 10, 10, 10]
    bad = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(tmp_path / "bad"), "--concepts", "red", *FAST])
    assert bad.exit_code == 2 and _errors(bad) == ["error: concepts must be at least two distinct, non-empty names"]
    bad = runner.invoke(app, ["fit", "t2ue", str(shard), "-o", str(tmp_path / "bad2"), "--clusters", "3",
                              "--class-names", ",".join(COLOURS), *FAST])
    assert bad.exit_code == 2 and _errors(bad) == [
        "error: class names need the labels as T2UE's concepts: drop --clusters, or give the names as --concepts"]


def test_an_edited_artifact_is_one_error_line(data, artifact, tmp_path):
    _, shard = data

    def edited(change):
        copy = tmp_path / f"art-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(artifact, copy)
        config = json.loads((copy / "config.json").read_text())
        change(config)
        (copy / "config.json").write_text(json.dumps(config))
        result = runner.invoke(app, ["shard", str(shard), "-o", str(tmp_path / f"o-{copy.name}"), "-m", "t2ue",
                                     "--artifact", str(copy), "--workers", "0", "--quiet"])
        assert result.exit_code == 2, result.output
        return _errors(result)

    errors = edited(lambda c: c["text_encoder_identity"].update(table_sha256="0" * 64))
    assert len(errors) == 1 and "does not match its recorded sha256" in errors[0]
    # the table is the artifact's own: a path recorded as the encoder's name is never read
    errors = edited(lambda c: (c["text_encoder_identity"].update(name="/nonexistent/encoder"),
                               c.update(weights=["concepts", "generator"])))
    assert len(errors) == 1 and "does not carry it" in errors[0]
    errors = edited(lambda c: c["text_encoder_identity"].update(pooling="mean", sha256="0" * 64))
    assert len(errors) == 1 and "not the one recorded" in errors[0]
    errors = edited(lambda c: c.update(text_dim=128))
    assert len(errors) == 1 and "dimension" in errors[0]
    errors = edited(lambda c: c.pop("text_encoder_identity"))
    assert len(errors) == 1 and "text_encoder_identity" in errors[0]
