"""Defenses do what they say; partial protection mixes the stated fraction, paired by key."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from uge_protect.errors import UserError
from uge_protect.eval.classify import random_crop_flip
from uge_protect.eval.defenses import (
    apply_data_defense, class_mean_subtraction, cutout, grayscale, jpeg_roundtrip, mixup, parse_defense, partial_protection,
    pgd_attack, trivial_augment,
)


def _images(n=6, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def test_parse_defense():
    assert parse_defense("jpeg:10").params == {"quality": 10}
    assert parse_defense("JPEG:75").spec == "jpeg:75"
    assert parse_defense("gray").name == "grayscale"
    assert parse_defense("grayscale").data_level and parse_defense("mixup").train_time
    assert not parse_defense("none").data_level and not parse_defense("none").train_time
    for bad in ("jpeg:0", "jpeg:abc", "blur", ""):
        with pytest.raises(UserError):
            parse_defense(bad)


def test_grayscale_channels_equal_and_luma():
    x = _images()
    y = grayscale(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    pure = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    pure[:, 1] = 255  # pure green → 0.587 · 255
    assert int(grayscale(pure)[0, 0, 0, 0]) == round(0.587 * 255)
    assert torch.equal(apply_data_defense(parse_defense("grayscale"), x), y)


def test_class_mean_subtraction_removes_class_wise_noise_and_leaves_test_images():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(70, 186, (60, 3, 6, 6), dtype=torch.uint8, generator=g)  # room to move: no clipping
    labels = torch.arange(60) % 3
    labels[-4:] = -1  # unlabelled samples are left as they are
    noise = torch.randint(-8, 9, (3, 3, 6, 6), generator=g, dtype=torch.int16)
    protected = (clean.short() + torch.where(labels.view(-1, 1, 1, 1) >= 0, noise[labels.clamp(min=0)], 0)).to(torch.uint8)
    cm = parse_defense("class-mean")
    assert cm.data_level and parse_defense("class_mean").spec == "class-mean"
    # the same images, with and without a class-wise noise, end up the same up to one image shared by
    # all (the noise's mean over the classes, which tells no class) and rounding
    diff = class_mean_subtraction(protected, labels).short() - class_mean_subtraction(clean, labels).short()
    assert (diff[:-4] - diff[0]).abs().max() <= 1 and diff[0].abs().max() >= 2
    assert torch.equal(apply_data_defense(cm, protected, labels)[-4:], protected[-4:])
    # every labelled class now has the same mean image
    out = apply_data_defense(cm, protected, labels).float()
    means = torch.stack([out[labels == c].mean(0) for c in range(3)])
    assert (means - means.mean(0)).abs().max() <= 1.0  # rounding: each class mean within 0.5 of the same image
    assert not torch.equal(out.to(torch.uint8), protected)
    # without labels (the test images) nothing changes
    assert apply_data_defense(cm, protected) is protected


def test_jpeg_changes_bytes_keeps_shape():
    x = _images()
    for q in (75, 10):
        y = jpeg_roundtrip(x, q)
        assert y.shape == x.shape and y.dtype == torch.uint8
        assert not torch.equal(y, x)
    # lower quality loses more
    err75 = (jpeg_roundtrip(x, 75).float() - x.float()).abs().mean()
    err10 = (jpeg_roundtrip(x, 10).float() - x.float()).abs().mean()
    assert err10 > err75
    # the same as a Pillow round-trip of one image
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=75)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(jpeg_roundtrip(x[:1], 75)[0].permute(1, 2, 0).numpy(), ref)


def test_cutout_zeroes_one_square():
    x = torch.ones(5, 3, 16, 16)
    y = cutout(x, 6, torch.Generator().manual_seed(0))
    for i in range(5):
        zero = (y[i] == 0).all(dim=0)
        assert int(zero.sum()) == 36
        rows = zero.any(dim=1).nonzero().view(-1)
        cols = zero.any(dim=0).nonzero().view(-1)
        assert len(rows) == 6 and len(cols) == 6 and int(rows[-1] - rows[0]) == 5 and int(cols[-1] - cols[0]) == 5
        assert (y[i][:, ~zero] == 1).all()


def test_mixup_mixes_images_and_labels():
    n, k = 8, 8
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    y = torch.arange(n)
    mixed, targets, lam = mixup(x, y, k, 1.0, torch.Generator().manual_seed(3))
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(targets.sum(1), torch.ones(n))
    # each mixed image is λ·own + (1−λ)·partner, and the targets say which partner
    partner = torch.where(targets.argmax(1) == y, targets.clone().scatter_(1, y.view(-1, 1), -1).argmax(1),
                          targets.argmax(1))
    for i in range(n):
        j = int(partner[i]) if targets[i, y[i]] < 1 - 1e-6 else i
        assert torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)
        assert abs(float(targets[i, i]) - (lam if j != i else 1.0)) < 1e-5
    assert (targets > 0).sum() > n  # some labels really are mixed


def test_trivial_augment_seeded_and_changes_images():
    x = _images(n=40)
    a = trivial_augment(x, seed=1)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, trivial_augment(x, seed=1))
    changed = (a != x).flatten(1).any(1).float().mean()
    assert changed > 0.5


def test_pgd_stays_in_budget():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    adv = pgd_attack(model, x, y, epsilon=8 / 255, step=2 / 255, steps=3, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model(adv), y) > loss(model(x), y)


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, 0, False, g), x)
    y = random_crop_flip(x, 2, False, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(torch.equal(y[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))
    f = random_crop_flip(x, 0, True, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2))


def test_partial_protection_exact_fraction_paired_by_key():
    n = 20
    prot = torch.full((n, 3, 4, 4), 200, dtype=torch.uint8)
    keys = [f"k{i:03d}" for i in range(n)]
    # clean set in another order: clean image of key i holds value i
    order = list(reversed(range(n)))
    clean_keys = [keys[i] for i in order]
    clean = torch.stack([torch.full((3, 4, 4), i, dtype=torch.uint8) for i in order])
    for fraction in (0.0, 0.25, 0.5, 1.0):
        mixed, mask = partial_protection(prot, keys, clean, clean_keys, fraction, seed=7)
        assert int(mask.sum()) == round(fraction * n)
        for i in range(n):
            expected = i if mask[i] else 200
            assert (mixed[i] == expected).all()
    a = partial_protection(prot, keys, clean, clean_keys, 0.3, seed=1)[1]
    assert torch.equal(a, partial_protection(prot, keys, clean, clean_keys, 0.3, seed=1)[1])
    assert not torch.equal(a, partial_protection(prot, keys, clean, clean_keys, 0.3, seed=2)[1])
    with pytest.raises(UserError, match="not in the clean"):
        partial_protection(prot, keys, clean[:2], clean_keys[:2], 0.5, seed=0)
    with pytest.raises(UserError):
        partial_protection(prot, keys, clean, clean_keys, 1.5, seed=0)
