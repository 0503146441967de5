"""EM (error-minimizing noise): fit by min-min, sample-wise PGD apply, class-wise lookup."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from uge_protect.errors import UserError
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.base import ProtectBatch, sample_seed
from uge_protect.methods.budget import apply_perturbation
from uge_protect.methods.em.fit import fit_em
from uge_protect.methods.em.method import ErrorMinimizing
from uge_protect.methods.em.config import EMConfig
from uge_protect.methods.random_noise import RandomNoise
from uge_protect.methods.registry import create_method, get_fitter, method_names

EPS = 8 / 255
TINY = dict(surrogate_width=4, train_batches=3, max_rounds=2, pgd_steps=4, step_size=2 / 255, batch_size=16)


def _data(n=48, size=16, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return images, labels


@pytest.fixture(scope="module")
def fitted(tiny_fits):
    """Sample- and class-mode artifacts fitted once on the same tiny data (``TINY`` on ``_data()``,
    shared with the method contract)."""
    fits = {mode: tiny_fits.em(mode) for mode in ("sample", "class")}
    return fits["sample"].images, fits["sample"].labels, {m: (f.path, f.config, f.weights) for m, f in fits.items()}


def _batch(images, labels, keys):
    return ProtectBatch(images, list(keys), [sample_seed(0, k) for k in keys],
                        [None] * len(keys), [int(v) for v in labels])


def test_fit_records_config_and_is_deterministic(fitted):
    images, labels, arts = fitted
    _, config, weights = arts["sample"]
    assert config["method"] == "em" and config["mode"] == "sample"
    assert config["num_classes"] == 2 and config["fit_size"] == [16, 16]
    assert 1 <= config["rounds"] <= 2 and len(config["train_error_history"]) == config["rounds"]
    assert set(weights) == {"surrogate"}
    again, weights2 = fit_em(images, labels, EMConfig(mode="sample", **TINY))
    assert again == config
    for k, v in weights["surrogate"].items():
        assert torch.equal(v, weights2["surrogate"][k]), k
    _, cconfig, cweights = arts["class"]
    assert cweights["class_noise"]["delta"].shape == (2, 3, 16, 16)
    assert cweights["class_noise"]["delta"].abs().max() <= EPS + 1e-6


def test_fit_stops_early_below_stop_error():
    images, labels = _data()
    config, _ = fit_em(images, labels, EMConfig(mode="class", **{**TINY, "max_rounds": 5, "stop_error": 0.99}))
    assert config["rounds"] == 1 and config["converged"]


def test_sample_noise_minimizes_the_surrogate_loss(fitted):
    images, labels, arts = fitted
    method = ErrorMinimizing.from_artifact(str(arts["sample"][0]))
    keys = [f"k{i}" for i in range(len(images))]
    delta = method.perturb(_batch(images, labels, keys))
    assert delta.is_floating_point()
    protected = apply_perturbation(images, delta, EPS)
    noisy = apply_perturbation(images, RandomNoise(EPS).perturb(_batch(images, labels, keys)), EPS)

    def loss(x):
        with torch.no_grad():
            return F.cross_entropy(method.model(x.float() / 255), labels).item()

    assert loss(protected) < loss(images)
    assert loss(protected) < loss(noisy)


def test_sample_apply_beyond_one_apply_chunk_matches_a_small_batch(fitted):
    images, labels, arts = fitted
    method = create_method("em", str(arts["sample"][0]), epsilon=EPS)
    keys = [f"k{i}" for i in range(10)]
    full = method.perturb(_batch(images[:10], labels[:10], keys))
    # a batch larger than one apply chunk gives the same result per sample
    big = torch.cat([images] * 2)[:70]
    big_labels = torch.cat([labels] * 2)[:70]
    big_keys = [f"k{i}" for i in range(70)]
    out = method.perturb(_batch(big, big_labels, big_keys))
    assert torch.equal(out[:10], full)


def test_sample_apply_runs_on_another_image_size(fitted):
    images, labels, arts = fitted
    method = ErrorMinimizing.from_artifact(str(arts["sample"][0]))
    big = torch.nn.functional.interpolate(images[:3].float(), size=(24, 20)).round().to(torch.uint8)
    delta = method.perturb(_batch(big, labels[:3], ["a", "b", "c"]))
    assert delta.shape == (3, 3, 24, 20) and delta.abs().max() <= EPS + 1e-6


def test_class_apply_is_a_lookup_resized_to_the_image(fitted):
    images, labels, arts = fitted
    path, _, weights = arts["class"]
    method = create_method("em", str(path))
    table = weights["class_noise"]["delta"]
    delta = method.perturb(_batch(images[:6], labels[:6], [f"x{i}" for i in range(6)]))
    for i in range(6):
        assert torch.allclose(delta[i], table[int(labels[i])].clamp(-EPS, EPS))
    assert torch.equal(delta[0], delta[2]) and not torch.equal(delta[0], delta[1])
    big = torch.zeros((2, 3, 32, 24), dtype=torch.uint8)
    resized = method.perturb(_batch(big, torch.tensor([1, 1]), ["p", "q"]))
    expected = F.interpolate(table[1:2], size=(32, 24), mode="bilinear", align_corners=False)[0]
    assert resized.shape == (2, 3, 32, 24)
    assert torch.allclose(resized[0], expected) and torch.equal(resized[0], resized[1])


def test_label_outside_fitted_classes_is_a_user_error(fitted):
    images, labels, arts = fitted
    for mode in ("sample", "class"):
        method = ErrorMinimizing.from_artifact(str(arts[mode][0]))
        with pytest.raises(UserError, match="outside the 2 classes"):
            method.perturb(_batch(images[:2], torch.tensor([0, 5]), ["a", "b"]))


def test_artifact_round_trip_and_errors(fitted, tmp_path):
    _, _, arts = fitted
    path = arts["sample"][0]
    method = ErrorMinimizing.from_artifact(str(path), epsilon=EPS)
    cfg = method.config()
    assert cfg["method"] == "em" and cfg["mode"] == "sample" and cfg["epsilon"] == pytest.approx(EPS)
    assert "em" in method_names() and get_fitter("em") is not None
    with pytest.raises(UserError, match="needs --artifact DIR"):
        create_method("em")
    with pytest.raises(UserError, match="fitted with epsilon"):
        ErrorMinimizing.from_artifact(str(path), epsilon=4 / 255)
    with pytest.raises(UserError, match="artifact directory not found"):
        ErrorMinimizing.from_artifact(str(tmp_path / "nope"))
    other = save_artifact(tmp_path / "other", {"method": "t2ue"}, {})
    with pytest.raises(UserError, match="not 'em'"):
        create_method("em", str(other))
    # an artifact fitted with a smaller budget keeps it under the CLI's default epsilon
    small = tmp_path / "small"
    small.mkdir()
    for f in path.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    conf = json.loads((small / "config.json").read_text())
    conf["epsilon"] = 4 / 255
    (small / "config.json").write_text(json.dumps(conf))
    assert create_method("em", str(small), epsilon=8 / 255).epsilon == pytest.approx(4 / 255)


def test_bad_options_are_user_errors():
    images, labels = _data(n=8)
    captions = [f"c{i}" for i in range(8)]
    with pytest.raises(UserError, match="not used by the sample mode: bogus"):
        get_fitter("em")(images, labels, captions, {"bogus": 1})
    with pytest.raises(UserError, match="mode"):
        get_fitter("em")(images, labels, captions, {"mode": "pixel"})
    with pytest.raises(UserError, match="not used by EM's CLIP mode: surrogate_width"):
        get_fitter("em")(images, labels, captions, {"mode": "clip", "surrogate_width": 8})
    with pytest.raises(UserError, match="at least two classes"):
        fit_em(images, torch.zeros(8, dtype=torch.int64), EMConfig(**TINY))
    cfg = EMConfig.from_options({"surrogate": "vgg11"})
    assert cfg.surrogate_width is None


def test_class_mode_on_a_coarse_grid_with_augmentation_gives_block_patterns():
    from uge_protect.methods.em.fit import fit_em
    from uge_protect.methods.em.config import EMConfig

    x = (torch.rand(24, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.arange(24) % 3
    config, weights = fit_em(x, y, EMConfig(mode="class", max_rounds=2, pattern_size=4, augment=True))
    delta = weights["class_noise"]["delta"]
    assert delta.shape == (3, 3, 16, 16) and config["pattern_size"] == 4 and config["augment"] is True
    blocks = delta.view(3, 3, 4, 4, 4, 4)  # (class, channel, row block, row, column block, column)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))  # constant on each 4×4 block
    assert delta.abs().max() <= 8 / 255 + 1e-6 and delta.abs().max() > 0


def test_sample_mode_fits_with_augmentation_by_default_and_class_mode_without():
    """The default that transfers (docs/efficacy): shifts and flips on in sample mode, off in class mode."""
    assert EMConfig(mode="sample").augment is True
    assert EMConfig(mode="class").augment is False
    assert EMConfig.from_options({"mode": "sample", "augment": False}).augment is False
    assert EMConfig.from_options({"mode": "class", "augment": True}).augment is True
