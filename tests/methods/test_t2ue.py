"""T2UE: a text-conditioned generator fitted for a few steps; apply from captions alone."""

from __future__ import annotations

import pytest
import torch

from uge_protect.errors import UserError
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.base import FitContext, ProtectBatch, sample_seed
from uge_protect.methods.t2ue.fit import fit_t2ue
from uge_protect.methods.t2ue.method import TextToUnlearnable
from uge_protect.methods.t2ue.config import T2UEConfig

EPS = 8 / 255
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = ["red", "green", "blue", "yellow"]


def _tiny(**kw):
    base = dict(objective="infonce", surrogate=TINY_CLIP, noise_size=16, width=8, z_dim=8, steps=40, warmup_steps=10, batch_size=16)
    base.update(kw)
    return T2UEConfig(**base)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    captions = [f"a {COLOURS[i % 4]} thing number {i}" for i in range(n)]
    return images, captions


@pytest.fixture(scope="module", params=["ssa", "unet"])
def fitted(request, tiny_fits):
    """``_tiny(backbone=...)`` on ``_data()``, fitted once and shared with the method contract."""
    fit = tiny_fits.t2ue_infonce(request.param)
    return fit.images, fit.captions, fit.path, fit.config


def _batch(images, captions, keys, labels=None):
    return ProtectBatch(images, list(keys), [sample_seed(0, k) for k in keys], list(captions),
                        list(labels) if labels is not None else [None] * len(keys))


def test_training_loss_falls(fitted):
    *_, config = fitted
    losses = [h["loss"] for h in config["loss_history"]]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert config["surrogate_trained"] and config["method"] == "t2ue"


def test_sample_noise_stays_within_epsilon_at_any_image_size(fitted):
    images, captions, path, _ = fitted
    method = TextToUnlearnable.from_artifact(str(path))
    assert method.requires_caption and not method.requires_label
    keys = [f"k{i}" for i in range(20)]
    full = method.perturb(_batch(images[:20], captions[:20], keys))
    assert full.abs().max() <= EPS + 1e-6
    # noise is resized to each image's size and stays in budget
    big = torch.zeros((2, 3, 40, 24), dtype=torch.uint8)
    d = method.perturb(_batch(big, captions[:2], keys[:2]))
    assert d.shape == (2, 3, 40, 24) and d.abs().max() <= EPS + 1e-6


def test_class_mode_one_noise_per_class(fitted):
    images, captions, path, _ = fitted
    method = TextToUnlearnable.from_artifact(str(path), mode="class", class_names=COLOURS, template="a photo of a {}")
    assert method.requires_label and not method.requires_caption
    keys = [f"k{i}" for i in range(8)]
    labels = [0, 1, 0, 2, 3, 1, 0, 2]
    d = method.perturb(_batch(images[:8], [None] * 8, keys, labels))
    assert torch.equal(d[0], d[2]) and torch.equal(d[0], d[6]) and torch.equal(d[1], d[5])
    assert not torch.equal(d[0], d[1])
    assert method.config()["template"] == "a photo of a {}"
    with pytest.raises(UserError, match="class name"):
        method.perturb(_batch(images[:1], [None], keys[:1], [9]))
    with pytest.raises(UserError, match="class names"):
        TextToUnlearnable.from_artifact(str(path), mode="class")


def test_sample_mode_needs_captions(fitted):
    images, _, path, _ = fitted
    method = TextToUnlearnable.from_artifact(str(path))
    with pytest.raises(UserError, match="caption"):
        method.perturb(_batch(images[:2], ["ok", None], ["a", "b"]))


def test_checkpoint_and_resume_give_the_same_generator():
    images, captions = _data(n=32)
    cfg = _tiny(steps=20, warmup_steps=6)
    states = []
    full_cfg, full = fit_t2ue(images, captions, cfg, FitContext(checkpoint=states.append, checkpoint_every=10))
    assert [s["step"] for s in states] == [10, 20]
    resumed_cfg, resumed = fit_t2ue(images, captions, cfg, FitContext(state=states[0]))
    for group in ("generator", "text_encoder"):
        for k, v in full[group].items():
            assert torch.equal(v, resumed[group][k]), (group, k)
    assert resumed_cfg["loss_history"] == full_cfg["loss_history"]
    # a checkpoint taken during the surrogate's warm-up resumes too
    early = []
    fit_t2ue(images, captions, cfg, FitContext(checkpoint=early.append, checkpoint_every=4))
    assert early[0]["step"] == 4 and early[0]["conditioner"] is None
    _, from_warmup = fit_t2ue(images, captions, cfg, FitContext(state=early[0]))
    for k, v in full["generator"].items():
        assert torch.equal(v, from_warmup["generator"][k]), k


def test_no_warmup_uses_the_initial_text_tower():
    images, captions = _data(n=16)
    config, weights = fit_t2ue(images, captions, _tiny(steps=3, warmup_steps=0))
    assert config["surrogate_trained"] and len(weights["generator"]) > 0


def test_options():
    with pytest.raises(UserError, match="unknown T2UE option"):
        T2UEConfig.from_options({"bogus": 1})
    with pytest.raises(UserError, match="backbone"):
        T2UEConfig.from_options({"backbone": "gan"})
    with pytest.raises(UserError, match="batch size"):
        T2UEConfig.from_options({"batch_size": 1})


def test_centered_captions_round_trip(tmp_path):
    images, captions = _data(n=32)
    config, weights = fit_t2ue(images, captions, _tiny(steps=4, warmup_steps=4, center_text=True, noise_weight=0.5))
    assert weights["text_encoder"]["caption_mean"].shape == (config["text_dim"],)
    save_artifact(tmp_path, config, weights)
    method = TextToUnlearnable.from_artifact(str(tmp_path))
    assert method.text_mean is not None
    keys = [f"k{i}" for i in range(4)]
    d = method.perturb(_batch(images[:4], captions[:4], keys))
    assert d.abs().max() <= EPS + 1e-6
    # the stored mean is used: without it the noise differs
    method.text_mean = None
    assert not torch.equal(method.perturb(_batch(images[:4], captions[:4], keys)), d)


def test_locked_text_tower_stays_at_its_initialisation(tmp_path):
    from uge_protect.models.clip import build_clip_model, clip_state

    images, captions = _data(n=32)
    config, weights = fit_t2ue(images, captions, _tiny(steps=6, warmup_steps=4, lock_text=True, augment=True))
    initial = clip_state(build_clip_model(TINY_CLIP, seed=0))
    for k, v in weights["text_encoder"].items():
        assert torch.equal(v, initial[k]), k
    assert config["lock_text"] and config["augment"]
    save_artifact(tmp_path, config, weights)
    d = TextToUnlearnable.from_artifact(str(tmp_path)).perturb(_batch(images[:4], captions[:4], ["a", "b", "c", "d"]))
    assert d.abs().max() <= EPS + 1e-6


def test_shift_flip_keeps_content_and_gradient():
    from uge_protect.models.training import shift_flip

    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    out = shift_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    again = shift_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    out.sum().backward()
    assert x.grad is not None and x.grad.sum() > 0
    # each output is a shifted / flipped view of its own input: its values come from that input
    for i in range(6):
        assert set(out[i].detach().flatten().tolist()) <= set(x[i].detach().flatten().tolist())


def test_mean_pooled_caption_embedding_round_trips(tmp_path):
    from uge_protect.methods.t2ue.method import text_features

    images, captions = _data(n=32)
    config, weights = fit_t2ue(images, captions, _tiny(steps=4, warmup_steps=0, text_pool="mean"))
    assert config["text_pool"] == "mean"
    save_artifact(tmp_path, config, weights)
    method = TextToUnlearnable.from_artifact(str(tmp_path))
    tokens = method.encoder.tokenize(captions[:3])
    pooled, (states, mask) = text_features(method.encoder, tokens, "mean")
    manual = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(pooled, torch.nn.functional.normalize(manual, dim=-1), atol=1e-6)
    # the generator reads the token width (32), not the projected embedding (16)
    assert config["text_dim"] == TINY_CLIP["text_cfg"]["width"] != TINY_CLIP["embed_dim"]
    d = method.perturb(_batch(images[:3], captions[:3], ["a", "b", "c"]))
    assert d.shape == (3, 3, 16, 16) and d.abs().max() <= EPS + 1e-6


def test_class_prompt_term(tmp_path):
    images, captions = _data(n=32)
    labels = torch.arange(32) % 4
    with pytest.raises(UserError, match="labelled"):
        fit_t2ue(images, captions, _tiny(steps=2, class_names=COLOURS))
    with pytest.raises(UserError, match="no class name"):
        fit_t2ue(images, captions, _tiny(steps=2, class_names=COLOURS[:2]), labels=labels)
    with pytest.raises(UserError, match="template"):
        T2UEConfig.from_options({"template": "no slot"})
    losses = {}
    for weight in (0.0, 1.0):
        config, _ = fit_t2ue(images, captions, _tiny(steps=20, warmup_steps=0, class_names=COLOURS,
                                                     class_weight=weight), labels=labels)
        losses[weight] = config["loss_history"][0]["loss"]
    # the class term (a 4-way cross-entropy, ≈ log 4 at the start) is part of the objective
    assert losses[1.0] > losses[0.0] + 0.5
    # unlabelled samples (-1) are left out of the class term, not an error
    fit_t2ue(images, captions, _tiny(steps=2, warmup_steps=0, class_names=COLOURS),
             labels=torch.where(labels == 0, -1, labels))


def test_noise_is_resized_channels_last_to_the_same_values_as_from_nchw():
    from torch.nn import functional as F

    from uge_protect.methods.t2ue.method import _resize_noise

    delta = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = _resize_noise(delta, 48, 40)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == (4, 3, 48, 40)
    assert torch.equal(out, F.interpolate(delta, size=(48, 40), mode="bilinear", align_corners=False))
    assert _resize_noise(delta, 16, 16) is delta
