"""UGE: the key projection, the three losses, a tiny fitted generator, its artifact and resume."""

from __future__ import annotations

import pytest
import torch

from uge_protect.errors import UserError
from uge_protect.eval.classify import TrainSettings, fit_classifier
from uge_protect.methods.base import FitContext, ProtectBatch, sample_seed
from uge_protect.methods.budget import apply_perturbation
from uge_protect.models.classifiers import build_classifier
from uge_protect.methods.uge.fit import class_permutation, fit_uge
from uge_protect.methods.uge.method import Ungeneralizable
from uge_protect.methods.uge.config import UGEConfig
from uge_protect.methods.uge.gate import ConfidenceGate, gate_from_artifact
from uge_protect.methods.uge.key import (DIRECTIONS, KeyProjection, along_key, build_authorized, key_direction,
    fingerprint_matches, key_signs, levels_along_key)
from uge_protect.methods.uge.losses import feature_distance, gradient_matching
from uge_protect.models.distill import distillation

EPS = 8 / 255
KEY = "3f9c2a71d84e5b06c1a9f7e2d3b48a65"  # 128 bits: the shortest key `fit uge` accepts
TINY_FEATURES = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def stripes(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two learnable classes: horizontal (0) or vertical (1) stripes of random colours, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ramp = ((torch.arange(size) // 2) % 2).float()
    images = []
    for y in labels.tolist():
        pattern = ramp.view(-1, 1).expand(size, size) if y == 0 else ramp.view(1, -1).expand(size, size)
        colour = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
        img = 0.15 + colour * pattern + 0.1 * torch.rand(3, size, size, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(images), labels


def _tiny(**kw) -> UGEConfig:
    base = dict(authorized="small_cnn", student="vgg11", student_width=None, key_seed=KEY, width=8, depth=2,
                steps=6, batch_size=16, authorized_epochs=1, feature_epochs=1, feature_model=TINY_FEATURES,
                device="cpu")
    base.update(kw)
    return UGEConfig(**base)


@pytest.fixture(scope="module")
def fitted(tiny_fits):
    """``_tiny()`` on ``stripes(48)``, fitted once and shared with the method contract."""
    fit = tiny_fits.uge()
    return fit.images, fit.labels, fit.path, fit.config, fit.weights


def _batch(images: torch.Tensor, keys: list[str], labels: torch.Tensor | None = None) -> ProtectBatch:
    labs = labels.tolist() if labels is not None else [None] * len(keys)
    return ProtectBatch(images, keys, [sample_seed(0, k) for k in keys], [None] * len(keys), labs)


def test_gradient_matching_is_zero_without_noise_and_positive_with_it():
    images, labels = stripes(16)
    x = images.float() / 255
    net = build_classifier("small_cnn", 2, seed=0).eval()
    assert float(gradient_matching(net, x, x.clone(), labels).detach()) == pytest.approx(0.0, abs=1e-5)
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    x_u = (x + delta).clamp(0, 1).requires_grad_(True)
    loss = gradient_matching(net, x, x_u, labels)
    assert float(loss.detach()) > 1e-4
    loss.backward()  # differentiable with respect to the protected images
    assert x_u.grad is not None and float(x_u.grad.abs().sum()) > 0


def test_noise_along_the_key_is_invisible_to_the_authorized_network_only():
    images, labels = stripes(8)
    x = images.float() / 255
    v = key_direction(KEY)
    assert torch.allclose(v, key_direction(KEY)) and float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert len(DIRECTIONS) == 13 and len({tuple(key_signs(k).tolist()) for k in range(200)}) == 13
    other_key = next(k for k in range(1000) if not torch.equal(key_signs(k), key_signs(KEY)))
    assert not torch.allclose(v, key_direction(other_key))
    t = torch.rand(8, 1, 16, 16) * 2 - 1
    t[0] = 1.0  # saturated: the box clamp must act where pixels are near 0 or 1
    delta = along_key(x, t, v, EPS)
    assert float(delta.abs().max()) <= EPS + 1e-7
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
    # δ lies along v at every pixel
    cross = torch.linalg.cross(delta.permute(0, 2, 3, 1), v.expand(8, 16, 16, 3), dim=-1)
    assert float(cross.abs().max()) < 1e-6
    # the uint8 form: whole levels along the key signs, inside [0, 255], invisible after quantization
    levels = levels_along_key(images, t, key_signs(KEY), EPS)
    assert levels.dtype == torch.int16 and int(levels.abs().max()) == round(EPS * 255)
    out = images.int() + levels.int()
    assert int(out.min()) >= 0 and int(out.max()) <= 255
    x_u = out.float() / 255
    project = KeyProjection(key_signs(KEY))
    assert torch.equal(project(x_u), project(x))  # bit-identical
    assert float((project(x) - x).abs().max()) > 0.01  # it does remove the component along s
    other = KeyProjection(key_signs(other_key))
    assert float((other(x_u) - other(x)).abs().max()) > 1e-3
    owner = build_authorized("small_cnn", 2, KEY).eval()
    with torch.no_grad():
        assert torch.equal(owner(x_u), owner(x))


def _patterned(n: int, size: int = 32, classes: int = 4, seed: int = 0):
    """Smooth clean images, random ±1 class patterns, and the images carrying them along the key."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 0.6 + 0.2
    clean = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    clean = (clean * 255).round().to(torch.uint8)
    patterns = (torch.rand(classes, 1, size, size, generator=g) < 0.5).float() * 2 - 1
    labels = torch.arange(n) % classes
    protected = (clean.int() + levels_along_key(clean, patterns[labels], key_signs(KEY), EPS).int()).to(torch.uint8)
    return clean, protected, patterns, labels


def test_confidence_gate_opens_on_the_patterns_only_and_keeps_every_prediction():
    clean, protected, patterns, _ = _patterned(12)
    gate = ConfidenceGate(key_signs(KEY), patterns, EPS, scale=30.0)
    xc, xp = clean.float() / 255, protected.float() / 255
    assert bool((gate(xp) == 1.0).all()) and bool((gate(xc) == 0.0).all())
    # a random crop (shift) or a mirror image of a protected image is still recognised
    shifted = torch.nn.functional.pad(xp, (3, 0, 0, 2))[..., 2:, :-3]
    assert bool((gate(shifted) > 0.7).all()) and bool((gate(xp.flip(-1)) > 0.7).all())
    # another key's direction does not open it
    other = next(k for k in range(1000) if not torch.equal(key_signs(k), key_signs(KEY)))
    assert float(ConfidenceGate(key_signs(other), patterns, EPS, 30.0)(xp).max()) < 0.2
    plain = build_authorized("small_cnn", 4, KEY).eval()
    gated = build_authorized("small_cnn", 4, KEY, gate=gate).eval()
    gated.net.load_state_dict(plain.net.state_dict())
    with torch.no_grad():
        for x in (xc, xp):
            assert torch.equal(gated(x).argmax(1), plain(x).argmax(1))
        assert torch.allclose(gated(xc), plain(xc))
        top = torch.nn.functional.one_hot(plain(xp).argmax(1), 4).float()
        assert torch.equal(gated(xp), 30.0 * top)  # the label only: no scale to divide away
        gated.train(), plain.train()
        assert torch.allclose(gated(xp), plain(xp))  # training is untouched
    with pytest.raises(ValueError):
        build_authorized("small_cnn", 4, KEY, projection=False, gate=gate)


def test_feature_distance_and_distillation_forms():
    x = torch.rand(4, 3, 8, 8)
    encode = lambda t: torch.nn.functional.normalize(t.flatten(1), dim=1)  # noqa: E731
    assert float(feature_distance(encode, x, x)) == pytest.approx(1.0, abs=1e-5)
    targets = encode(torch.rand(4, 3, 8, 8))
    assert float(feature_distance(encode, x, x, targets)) < 1.0
    logits = torch.randn(4, 5)
    assert float(distillation(logits, logits)) == pytest.approx(0.0, abs=1e-5)
    assert float(distillation(logits, torch.randn(4, 5))) > 0
    perm = class_permutation(KEY, 10)
    assert sorted(perm.tolist()) == list(range(10)) and bool((perm != torch.arange(10)).all())


def test_fit_records_fingerprints_and_losses(fitted):
    _, _, _, config, weights = fitted
    assert config["label_conditioned"] and float(weights["generator"]["patterns"].abs().max()) > 0
    assert config["method"] == "uge" and config["key_seed"] == KEY
    assert fingerprint_matches(KEY, config["key_fingerprint"]) and KEY not in config["key_fingerprint"]
    assert config["gm_active"] is False  # invisible by construction under the key projection
    assert config["confidence_gate"] is True and config["gate_scale"] == 30.0
    gate = gate_from_artifact(config, weights)
    assert gate is not None and torch.equal(gate.patterns, weights["generator"]["patterns"])
    assert gate_from_artifact({**config, "confidence_gate": False}, weights) is None
    assert {"ud", "fd", "student"} <= set(config["loss_history"][-1])
    assert list(weights) == ["generator"]


def test_artifact_noise_is_exact_along_the_key_and_its_config_public(fitted):
    images, labels, path, config, weights = fitted
    method = Ungeneralizable.from_artifact(str(path))
    assert method.requires_label
    keys = [f"k{i}" for i in range(len(images))]
    delta = method.perturb(_batch(images, keys, labels))
    assert delta.dtype == torch.int16 and 0 < int(delta.abs().max()) <= round(EPS * 255)
    out = apply_perturbation(images, delta, EPS)
    assert torch.equal(out.int() - images.int(), delta.int())  # inside the box: nothing clipped
    # the written uint8 images hide nothing from the authorized network's projection
    project = KeyProjection(key_signs(KEY))
    assert torch.equal(project(out.float() / 255), project(images.float() / 255))
    public = method.config()
    assert "key_seed" not in public and public["key_fingerprint"] == config["key_fingerprint"]
    assert str(KEY) not in repr(public)
    with pytest.raises(UserError, match="epsilon"):
        Ungeneralizable.from_artifact(str(path), epsilon=4 / 255)
    with pytest.raises(UserError, match="label None"):
        method.perturb(_batch(images[:2], keys[:2]))


def test_authorized_network_learns_the_protected_data(fitted):
    images, labels, path, _, _ = fitted
    method = Ungeneralizable.from_artifact(str(path))
    keys = [f"k{i}" for i in range(len(images))]
    protected = apply_perturbation(images, method.perturb(_batch(images, keys, labels)), EPS)
    test_images, test_labels = stripes(32, seed=1)
    settings = TrainSettings(arch="small_cnn", epochs=4, batch_size=16, seed=0)
    owner = lambda: build_authorized("small_cnn", 2, KEY)  # noqa: E731
    model, result = fit_classifier(protected, labels, test_images, test_labels, 2, settings, build_model=owner)
    assert result["final_test_acc"] >= 0.9
    # it sees exactly the clean images: the same run as training on them
    with torch.no_grad():
        assert torch.equal(model(protected.float() / 255), model(images.float() / 255))
    _, on_clean = fit_classifier(images, labels, test_images, test_labels, 2, settings, build_model=owner)
    same = lambda r: [(e["train_loss"], e["test_acc"]) for e in r["per_epoch"]]  # noqa: E731
    assert same(on_clean) == same(result)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_fit():
    images, labels = stripes(32)
    cfg = _tiny(steps=4)
    saved = []
    full, w_full = fit_uge(images, labels, cfg, FitContext(checkpoint=saved.append, checkpoint_every=2))
    assert [s["step"] for s in saved] == [0, 2]  # after phase 1, then every 2 steps
    resumed, w_res = fit_uge(images, labels, cfg, FitContext(state=saved[1]))
    for name, tensor in w_full["generator"].items():
        assert torch.allclose(tensor, w_res["generator"][name], atol=1e-6), name
    assert resumed["key_seed"] == full["key_seed"] and fingerprint_matches(KEY, resumed["key_fingerprint"])


def test_without_key_projection_gradient_matching_is_active():
    images, labels = stripes(32)
    config, weights = fit_uge(images, labels, _tiny(key_projection=False, steps=3, snapshots=2, fd_weight=0.0, lr=0.05,
                                                    label_conditioned=False))
    assert config["gm_active"] and config["loss_history"][-1]["gm"] > 0
    method = Ungeneralizable(config, weights)
    assert not method.requires_label  # image-only: δ from the image alone
    delta = method.perturb(_batch(images, [str(i) for i in range(len(images))]))
    assert delta.shape == images.shape and 0 < int(delta.abs().max()) <= round(EPS * 255)
    out = apply_perturbation(images, delta, EPS)
    assert torch.equal(out.int() - images.int(), delta.int())


def test_bad_options_are_user_errors():
    images, labels = stripes(8)
    with pytest.raises(UserError, match="other architectures than the authorized"):
        fit_uge(images, labels, _tiny(student="small_cnn", student_width=8, key_projection=False))
    with pytest.raises(UserError, match="unknown authorized"):
        UGEConfig.from_options({"authorized": "alexnet"})
    with pytest.raises(UserError, match="at least one"):
        UGEConfig.from_options({"gm_weight": 0, "fd_weight": 0, "ud_weight": 0})
    with pytest.raises(UserError, match="class label"):
        fit_uge(images, torch.full((8,), -1), _tiny())


def test_auto_students_cover_the_hacker_families():
    """`auto`: small_cnn and vgg11; the plain authorized architecture only under the key."""
    keyed = UGEConfig.from_options({"authorized": "small_cnn"})
    assert keyed.students == ["small_cnn", "vgg11"] and keyed.student_width == 8
    plain = UGEConfig.from_options({"authorized": "small_cnn", "key_projection": False})
    assert plain.students == ["vgg11"]
    assert UGEConfig.from_options({"student": "vgg11"}).student_width is None


def test_resnet18_as_the_authorized_network():
    """ResNet-18, the threat model's authorized network: a tiny fit and apply; the noise is invisible to it."""
    images, labels = stripes(32)
    config, weights = fit_uge(images, labels, _tiny(authorized="resnet18", student="small_cnn", student_width=8,
                                                    steps=2))
    assert config["authorized"] == "resnet18" and config["student"] == "small_cnn"
    method = Ungeneralizable(config, weights)
    delta = method.perturb(_batch(images, [str(i) for i in range(len(images))], labels))
    protected = apply_perturbation(images, delta, EPS)
    assert int(delta.abs().max()) > 0
    owner = build_authorized("resnet18", 2, KEY, True).eval()
    with torch.no_grad():
        assert torch.equal(owner(protected.float() / 255), owner(images.float() / 255))


def test_a_fit_depends_on_its_seed_not_on_the_global_rng():
    images, labels = stripes(32)
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)  # what another caller of torch's global RNG leaves behind
        runs.append(fit_uge(images, labels, _tiny(steps=2)))
    (c1, w1), (c2, w2) = runs
    assert {k: v for k, v in c1.items() if k not in ("fit_seconds", "key_fingerprint")} == \
        {k: v for k, v in c2.items() if k not in ("fit_seconds", "key_fingerprint")}
    for part in w1:
        assert w1[part].keys() == w2[part].keys()
        assert all(torch.equal(w1[part][k], w2[part][k]) for k in w1[part]), part
