"""EM's CLIP variant: min-min against a surrogate CLIP on captions, per-sample PGD at apply."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, write_shard
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.methods.base import ProtectBatch, sample_seed
from uge_protect.models.clip import build_clip_model
from uge_protect.methods.em.clip import (EMClipConfig, ErrorMinimizingClip, _same_caption, fit_em_clip, pgd_min_clip,
    sample_loss)
from uge_protect.methods.registry import create_method

EPS = 8 / 255
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY = dict(clip_model=TINY_CLIP, train_batches=3, max_rounds=2, pgd_steps=3, step_size=2 / 255,
            batch_size=8, bank_size=7)
COLOURS = ["red", "green", "blue", "yellow"]


def _data(n=16, size=16):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    captions = [f"a {COLOURS[i % 4]} square number {i}" for i in range(n)]
    return images, captions


@pytest.fixture(scope="module")
def fitted(tiny_fits):
    """``TINY`` on ``_data()``, fitted once and shared with the method contract."""
    fit = tiny_fits.em_clip()
    return fit.images, fit.captions, fit.path, fit.config, fit.weights


def _batch(images, captions, keys):
    return ProtectBatch(images, list(keys), [sample_seed(0, k) for k in keys], list(captions), [None] * len(keys))


def test_fit_records_config_and_is_deterministic(fitted):
    images, captions, _, config, weights = fitted
    assert config["method"] == "em" and config["mode"] == "clip" and config["surrogate_trained"]
    assert config["bank_size"] == 7 and weights["bank"]["tokens"].shape == (7, 16)
    assert 1 <= config["rounds"] <= 2 and len(config["train_error_history"]) == config["rounds"]
    again, weights2 = fit_em_clip(images, captions, EMClipConfig(**TINY))
    assert again == config
    for k, v in weights["surrogate"].items():
        assert torch.equal(v, weights2["surrogate"][k]), k


def test_artifact_loads_as_the_clip_method_within_epsilon(fitted):
    images, captions, path, _, _ = fitted
    method = create_method("em", str(path))
    assert isinstance(method, ErrorMinimizingClip) and method.requires_caption and not method.requires_label
    keys = [f"k{i}" for i in range(len(images))]
    delta = method.perturb(_batch(images, captions, keys))
    assert delta.abs().max() <= EPS + 1e-6
    assert method.config()["mode"] == "clip"


def test_another_caption_gives_other_noise(fitted):
    images, captions, path, _, _ = fitted
    method = create_method("em", str(path))
    keys = [f"k{i}" for i in range(len(images))]
    full = method.perturb(_batch(images, captions, keys))
    other = method.perturb(_batch(images[:1], ["a totally different caption"], keys[:1]))
    assert not torch.equal(other, full[:1])


def test_pgd_lowers_the_contrastive_loss(fitted):
    images, captions, path, config, weights = fitted
    method = create_method("em", str(path))
    bundle = method.bundle
    x = images.float() / 255
    tokens = bundle.tokenize(captions)
    with torch.no_grad():
        text = bundle.encode_tokens(tokens)
    same = _same_caption(tokens, method.bank)
    start = torch.zeros_like(x)
    delta = pgd_min_clip(bundle, x, text, method.bank_emb, same, start, EPS, 1 / 255, 10)
    with torch.no_grad():
        before = sample_loss(bundle, x, text, method.bank_emb, same)
        after = sample_loss(bundle, (x + delta).clamp(0, 1), text, method.bank_emb, same)
    assert delta.abs().max() <= EPS + 1e-6
    assert after.mean() < before.mean()
    assert (after <= before + 1e-6).float().mean() >= 0.9


def test_same_caption_mask_and_options():
    a = torch.tensor([[1, 2, 0], [3, 4, 0]])
    bank = torch.tensor([[1, 2, 0], [1, 2, 5], [3, 4, 0]])
    assert _same_caption(a, bank).tolist() == [[True, False, False], [False, False, True]]
    with pytest.raises(UserError, match="not used by EM's CLIP mode"):
        EMClipConfig.from_options({"surrogate": "vgg11"})
    with pytest.raises(UserError, match="batch size"):
        EMClipConfig.from_options({"batch_size": 1})


def test_local_checkpoint_is_loaded_and_kept_frozen(tmp_path):
    from safetensors.torch import save_file

    ref = build_clip_model(TINY_CLIP, seed=5)
    ckpt = tmp_path / "surrogate.safetensors"
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, str(ckpt))
    images, captions = _data(n=8)
    cfg = EMClipConfig(**{**TINY, "clip_pretrained": str(ckpt), "max_rounds": 1})
    config, weights = fit_em_clip(images, captions, cfg)
    assert config["surrogate_trained"] is False
    for k, v in ref.model.state_dict().items():  # frozen: the stored weights are the checkpoint's
        assert torch.equal(weights["surrogate"][k], v), k
    with pytest.raises(UserError, match="cannot read CLIP checkpoint"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a checkpoint")
        build_clip_model(TINY_CLIP, pretrained=str(bad))


def test_cli_fit_clip_then_shard_records_missing_captions(tmp_path):
    import numpy as np

    rng = np.random.default_rng(1)
    samples = [(f"s-{i}", {"png": png_bytes(random_image(rng, 16, 16)), "txt": f"a {COLOURS[i % 4]} thing".encode()})
               for i in range(12)]
    samples.append(("nocap", {"png": png_bytes(random_image(rng, 16, 16)), "cls": b"1"}))
    shard = write_shard(tmp_path / "data-000000.tar", samples)
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(TINY_CLIP))
    art = tmp_path / "art"
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "em", str(shard), "--mode", "clip", "--clip-model", str(cfg_file),
                                 "--train-batches", "2", "--max-rounds", "1", "--pgd-steps", "2",
                                 "--batch-size", "4", "--bank-size", "5", "-o", str(art)])
    assert result.exit_code == 0, result.output
    assert "12 training images" in result.output and "1 without a caption" in result.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "em", "--artifact", str(art),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = inspect_output(out)
    assert report["problems"] == [] and report["counts"]["written"] == 12
    rows = {r["key"]: r for r in pq.read_table(out / "manifests" / "data-000000.parquet").to_pylist()}
    assert rows["nocap"]["status"] == "failed" and "caption" in rows["nocap"]["reason"]
    assert all(r["linf"] <= 8 for r in rows.values() if r["status"] == "ok")
    result = runner.invoke(app, ["fit", "em", str(shard), "--mode", "clip", "--surrogate-width", "4",
                                 "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "surrogate_width" in result.output
