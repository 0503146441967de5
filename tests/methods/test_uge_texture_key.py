"""UGE's texture key: a key space nobody enumerates, noise the owner removes exactly, a flat class mean."""

from __future__ import annotations

import json

import pytest
import torch

from tests.methods.test_uge import EPS, KEY, _batch, _tiny, stripes
from uge_protect.errors import UserError
from uge_protect.eval.classify import TrainSettings, fit_classifier, random_crop_flip
from uge_protect.eval.defenses import class_mean_subtraction
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.budget import apply_perturbation
from uge_protect.methods.uge.authorized import authorized_models
from uge_protect.methods.uge.config import UGEConfig
from uge_protect.methods.uge.fit import fit_uge
from uge_protect.methods.uge.gate import TextureGate, gate_from_artifact
from uge_protect.methods.uge.key import build_authorized, fingerprint_matches, new_key
from uge_protect.methods.uge.method import Ungeneralizable
from uge_protect.methods.uge.texture_key import (BLOCK, TextureProjection, along_texture, block_carriers,
    key_space_bits, texture_levels, texture_phases, texture_tiles)

OTHER = "9d1e7c04b2a85f36e0c7a9d1b2f48e63"


def _smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images with content at several scales, well inside [0, 255] except a few saturated pixels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode="bilinear",
                                          align_corners=False)
    img = 30 + 190 * low + 20 * torch.rand(n, 3, h, w, generator=g)
    img[:, :, 0, 0] = 255  # a saturated corner: its block gets a clamped coefficient
    return img.round().clamp(0, 255).to(torch.uint8)


def test_tiles_are_zero_sum_orthogonal_and_drawn_from_a_space_nobody_enumerates():
    tiles = texture_tiles(KEY, 10)
    assert tiles.shape == (10, 3, 4, 4) and set(tiles.unique().tolist()) == {-1, 1}
    assert torch.all(tiles.sum((2, 3)) == 0)  # zero-sum per channel: the 4×4 block sums stay
    gram = torch.einsum("acij,bcij->ab", tiles, tiles)
    assert torch.equal(gram, 48 * torch.eye(10, dtype=gram.dtype))  # orthogonal classes
    assert key_space_bits(10) > 200 and key_space_bits(2) > 64
    # a pure function of the whole key: no collisions, and one changed digit changes the tiles
    drawn = {texture_tiles(new_key(), 10).numpy().tobytes() for _ in range(300)}
    assert len(drawn) == 300
    assert not torch.equal(texture_tiles(KEY[:-1] + ("0" if KEY[-1] != "0" else "1"), 10), tiles)
    assert torch.equal(texture_tiles(KEY, 10), tiles)
    assert texture_tiles(KEY, 40).shape[0] == 15  # more classes than Walsh functions: classes share tiles


@pytest.mark.parametrize("size", [(32, 32), (20, 28)])
def test_the_owner_removes_the_noise_exactly_and_another_key_does_not(size):
    h, w = size
    images = _smooth_images(64, h, w)
    labels = torch.arange(64) % 10
    g = torch.Generator().manual_seed(1)
    coeff = torch.rand(64, h // BLOCK, w // BLOCK, generator=g) * 2 - 1
    tiles, phases = texture_tiles(KEY, 10), texture_phases(KEY, images)
    delta = texture_levels(images, coeff, labels, tiles, phases, EPS)
    assert delta.dtype == torch.int16 and 0 < int(delta.abs().max()) <= round(EPS * 255)
    protected = (images.to(torch.int16) + delta)
    assert int(protected.min()) >= 0 and int(protected.max()) <= 255
    protected = protected.to(torch.uint8)
    ch, cw = h - h % BLOCK, w - w % BLOCK
    assert not delta[:, :, ch:, :].any() and not delta[:, :, :, cw:].any()  # outside whole blocks: nothing
    # every 4×4 block sum, hence the phase, survives the noise
    assert torch.equal(texture_phases(KEY, protected), phases)
    owner = TextureProjection(KEY, 10)
    assert torch.equal(owner(protected), owner(images))
    other = TextureProjection(OTHER, 10)
    assert (other(protected).int() - other(images).int()).abs().sum() > 0
    # the owner's view keeps the image: what it removes is a few levels on these grainy images
    assert (owner(images).float() - images.float()).abs().mean() < 4.0


def test_the_phase_needs_the_key_and_changes_from_image_to_image():
    images = _smooth_images(400, 32, 32, seed=2)
    mine, theirs = texture_phases(KEY, images), texture_phases(OTHER, images)
    codes = mine[:, 0] * 4 + mine[:, 1]
    assert len(codes.unique()) == 16 and int(torch.bincount(codes).max()) < 60
    assert float((mine != theirs).any(1).float().mean()) > 0.8
    assert torch.equal(texture_phases(KEY, images), mine)


def test_the_noise_has_a_flat_class_mean_so_class_mean_subtraction_leaves_it():
    images = _smooth_images(600, 32, 32, seed=3)
    labels = torch.zeros(600, dtype=torch.long)
    labels[300:] = 1
    tiles, phases = texture_tiles(KEY, 2), texture_phases(KEY, images)
    delta = texture_levels(images, torch.ones(600, 4, 4), labels, tiles, phases, EPS).float()
    # each image carries ±8 levels nearly everywhere, its class's mean noise under 2 levels
    assert float(delta.abs().mean()) > 7.0
    for c in (0, 1):
        assert float(delta[labels == c].mean(0).abs().mean()) < 2.0
    protected = (images.to(torch.int16) + delta.to(torch.int16)).to(torch.uint8)
    after = class_mean_subtraction(protected, labels).float()
    cleaned = class_mean_subtraction(images, labels).float()
    assert float((after - cleaned).abs().mean()) > 6.0  # the noise is still there


def test_the_float_noise_is_the_levels_noise_and_differentiable():
    images = _smooth_images(8, 16, 24, seed=4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    tiles, phases = texture_tiles(KEY, 4), texture_phases(KEY, images)
    q = round(EPS * 255)
    coeff = (torch.randint(-q, q + 1, (8, 2, 3)) / q).requires_grad_(True)
    x = images.float() / 255
    d = along_texture(x, coeff, labels, tiles, phases, EPS)
    assert torch.allclose(d * 255, texture_levels(images, coeff.detach(), labels, tiles, phases, EPS).float(),
                          atol=1e-3)
    assert float((x + d).detach().min()) >= 0 and float((x + d).detach().max()) <= 1 + 1e-6
    (d * torch.rand(d.shape, generator=torch.Generator().manual_seed(0))).sum().backward()  # d itself sums to 0
    assert coeff.grad is not None and coeff.grad.abs().sum() > 0
    # each block's noise is one carrier of the image's class at its phase
    carriers = block_carriers(tiles, phases)
    assert carriers.shape == (8, 4, 3, BLOCK, BLOCK)


def test_texture_key_options_need_the_projection_and_labels():
    for bad in ({"key_projection": False}, {"label_conditioned": False}):
        with pytest.raises(UserError, match="texture key"):
            UGEConfig.from_options({"authorized": "small_cnn", "key_scheme": "texture", **bad})
    with pytest.raises(UserError):
        UGEConfig.from_options({"authorized": "small_cnn", "key_scheme": "rainbow"})


@pytest.fixture(scope="module")
def texture_fit(tmp_path_factory):
    images, labels = stripes(48)
    config, weights = fit_uge(images, labels, _tiny(key_scheme="texture"))
    path = tmp_path_factory.mktemp("uge-texture") / "artifact"
    save_artifact(path, config, weights)
    return images, labels, path, config, weights


def test_a_texture_artifact_writes_exact_noise_and_publishes_no_key(texture_fit):
    images, labels, path, config, weights = texture_fit
    assert config["key_scheme"] == "texture" and fingerprint_matches(KEY, config["key_fingerprint"])
    method = Ungeneralizable.from_artifact(str(path))
    keys = [f"k{i}" for i in range(len(images))]
    delta = method.perturb(_batch(images, keys, labels))
    assert 0 < int(delta.abs().max()) <= round(EPS * 255)
    out = apply_perturbation(images, delta, EPS)
    assert torch.equal(out.int() - images.int(), delta.int())
    owner = TextureProjection(KEY, 2)
    assert torch.equal(owner(out), owner(images))
    assert not torch.equal(TextureProjection(OTHER, 2)(out), TextureProjection(OTHER, 2)(images))
    public = method.config()
    assert public["key_scheme"] == "texture" and "key_seed" not in public
    assert KEY not in json.dumps(public)
    # the confidence gate looks for the class textures in the images as they come
    assert config["confidence_gate"] is True and isinstance(gate_from_artifact(config, weights), TextureGate)
    assert gate_from_artifact({**config, "confidence_gate": False}, weights) is None


def test_the_texture_gate_answers_protected_crops_with_the_label_only():
    images = _smooth_images(64, 32, 32, seed=3)
    labels = torch.arange(64) % 10
    tiles = texture_tiles(KEY, 10)
    delta = texture_levels(images, torch.ones(64, 4, 4), labels, tiles, texture_phases(KEY, images), EPS)
    protected = (images.to(torch.int16) + delta).to(torch.uint8)
    gate = TextureGate(tiles, EPS, 30.0)
    g = torch.Generator().manual_seed(0)
    for flip in (False, True):  # at any crop of a 4-pixel padding, either way round
        both = random_crop_flip(torch.cat([images, protected], 1).float() / 255, 4, flip, g)
        clean_x, prot_x = both[:, :3], both[:, 3:]
        assert torch.all(gate(prot_x, labels) == 1.0)
        assert torch.all(gate(clean_x, labels) == 0.0)
    # in the owner's network (here one that knows each label): protected images get 30 times a
    # one-hot, clean ones the plain logits, and the arg max never changes
    class Knows(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(labels[:len(x)], 10).float() + 0.1 * x.mean((1, 2, 3))[:, None]

    owner = build_authorized("small_cnn", 10, KEY, gate=gate, scheme="texture").eval()
    owner.net = Knows()
    view = TextureProjection(KEY, 10)
    with torch.no_grad():
        seen = view(protected).float() / 255
        bare = owner.net(seen)
        gated = owner(protected.float() / 255, view=seen)
        assert torch.equal(gated, 30.0 * torch.nn.functional.one_hot(bare.argmax(1), 10))
        assert torch.allclose(owner(images.float() / 255, view=view(images).float() / 255),
                              owner.net(view(images).float() / 255))
    owner.train()
    assert torch.allclose(owner(protected.float() / 255, view=seen), owner.net(seen))  # training is untouched
    assert torch.all(gate(torch.rand(2, 3, 3, 3), torch.zeros(2)) == 0)  # smaller than a tile: nothing to find


def test_a_teacher_with_its_own_view_sees_it_cropped_and_flipped_as_the_students_batch():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls: list[bool] = []

        def forward(self, x, view=None):
            self.calls.append(view is not None and torch.equal(view, x))
            return torch.zeros(x.shape[0], 2)

    images = _smooth_images(24, 16, 16, seed=4)
    images[:, :, 0, 0] = 128
    teacher = Recorder()
    settings = TrainSettings(arch="small_cnn", epochs=2, batch_size=8, seed=0)
    # the view is a copy of the images: after one crop and flip for both, still equal
    fit_classifier(images, torch.arange(24) % 2, images, torch.arange(24) % 2, 2, settings, teacher=teacher,
                   teacher_images=images.clone())
    assert len(teacher.calls) == 6 and all(teacher.calls)
    with pytest.raises(ValueError, match="teacher_images"):
        fit_classifier(images, torch.arange(24) % 2, images, torch.arange(24) % 2, 2, settings,
                       teacher_images=images)


def test_an_edited_texture_artifact_without_labels_or_projection_is_refused(texture_fit, tmp_path):
    _, _, path, config, weights = texture_fit
    for bad in ({"label_conditioned": False}, {"key_projection": False}):
        save_artifact(tmp_path / "edited", {**config, **bad}, weights)
        with pytest.raises(UserError, match="texture key"):
            Ungeneralizable.from_artifact(str(tmp_path / "edited"))


def test_the_owner_trains_on_the_protected_data_as_on_the_clean_data(texture_fit):
    images, labels, path, _, _ = texture_fit
    method = Ungeneralizable.from_artifact(str(path))
    keys = [f"k{i}" for i in range(len(images))]
    protected = apply_perturbation(images, method.perturb(_batch(images, keys, labels)), EPS)
    test_images, test_labels = stripes(32, seed=1)
    rows = authorized_models(str(path), [99], [])
    owner, other = rows
    assert owner.owner and owner.transform is not None and other.other_key
    assert "texture-projection" in owner.cache_tag() and KEY not in owner.cache_tag()
    settings = TrainSettings(arch="small_cnn", epochs=3, batch_size=16, seed=0)
    build = lambda: build_authorized("small_cnn", 2, KEY, scheme="texture")  # noqa: E731
    view_test = owner.transform(test_images)
    _, on_protected = fit_classifier(owner.transform(protected), labels, view_test, test_labels, 2, settings,
                                     build_model=build)
    _, on_clean = fit_classifier(owner.transform(images), labels, view_test, test_labels, 2, settings,
                                 build_model=build)
    same = lambda r: [(e["train_loss"], e["test_acc"]) for e in r["per_epoch"]]  # noqa: E731
    assert same(on_protected) == same(on_clean)
    assert on_protected["final_test_acc"] >= 0.9


def test_the_method_aware_rows_against_the_texture_key():
    from uge_protect.methods.uge.attacks import (RANDOM_KEYS, attacker_models, block_means, fold_image, fold_period,
        image_pca)

    images = _smooth_images(32, 32, 32, seed=6)
    images[:, :, 0, 0] = 128  # no saturated pixel: every block carries the full noise
    labels = torch.arange(32) % 4
    tiles = texture_tiles(KEY, 4)
    delta = texture_levels(images, torch.ones(32, 4, 4), labels, tiles, texture_phases(KEY, images), EPS)
    protected = (images.to(torch.int16) + delta).to(torch.uint8)
    # what the noise never changes, and what folding away period 4 removes, whatever the key
    assert torch.equal(block_means(protected), block_means(images))
    unclamped = (delta != 0).flatten(1).all(1)  # images whose blocks all carry full-strength noise
    assert int(unclamped.sum()) > 16
    assert torch.equal(fold_period(protected)[unclamped], fold_period(images)[unclamped])
    assert image_pca(protected).shape == protected.shape and image_pca(protected).dtype == torch.uint8
    assert torch.equal(fold_image(protected)[unclamped], fold_image(images)[unclamped])
    # a coefficient that changes sign from block to block survives the fold of the image, not a block's
    flips = torch.ones(32, 4, 4)
    flips[:, ::2] = -1
    flipped = (images.to(torch.int16) + texture_levels(images, flips, labels, tiles, texture_phases(KEY, images),
                                                        EPS)).to(torch.uint8)
    assert (fold_image(flipped).float() - fold_image(images).float()).abs().mean() > 3.0
    assert torch.equal(fold_period(flipped)[unclamped], fold_period(images)[unclamped])
    rows = attacker_models({"key_scheme": "texture", "key_projection": True}, ["small_cnn"], protected, labels,
                           images[:8], labels[:8])
    labels_ = [r.label for r in rows]
    assert labels_ == [f"small_cnn@key:r{i}" for i in range(RANDOM_KEYS)] + [
        "small_cnn@invariant", "small_cnn@fold:block", "small_cnn@fold:image", "small_cnn@estimated:image-pca"]
    assert all(r.attacker and r.transform is not None and not r.owner for r in rows)
    assert {r.group for r in rows[:RANDOM_KEYS]} == {"small_cnn@enumerated"}
    assert len({r.cache_tag() for r in rows}) == len(rows) and all(KEY not in r.cache_tag() for r in rows)


def test_images_smaller_than_a_block_get_no_noise_and_pass_the_projection_unchanged():
    images = _smooth_images(4, 6, 40)
    labels = torch.arange(4) % 2
    tiles = texture_tiles(KEY, 2)
    assert not texture_levels(images, torch.ones(4, 0, 5), labels, tiles, texture_phases(KEY, images), EPS).any()
    assert torch.equal(TextureProjection(KEY, 2)(images), images)
    with pytest.raises(ValueError, match="uint8"):
        TextureProjection(KEY, 2)(images.float())
