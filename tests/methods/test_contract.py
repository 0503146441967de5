"""The method contract: budget helpers, per-sample seeds, the random control, artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from uge_protect.errors import UserError
from uge_protect.methods.artifact import artifact_fingerprint, load_artifact, save_artifact
from uge_protect.methods.base import ProtectBatch, sample_seed
from uge_protect.methods.budget import apply_perturbation, budget_levels, linf_levels, psnr
from uge_protect.methods.random_noise import RandomNoise
from uge_protect.methods.registry import create_method, method_names


def test_budget_holds_after_quantization_for_any_delta():
    g = torch.Generator().manual_seed(0)
    original = torch.randint(0, 256, (4, 3, 9, 9), generator=g, dtype=torch.uint8)
    original[0] = 0
    original[1] = 255
    delta = (torch.rand(original.shape, generator=g) - 0.5) * 0.5  # far outside the budget
    out = apply_perturbation(original, delta, 8 / 255)
    diff = (out.int() - original.int()).abs()
    assert out.dtype == torch.uint8 and diff.max() == 8
    assert budget_levels(8 / 255) == 8 and budget_levels(4 / 255) == 4
    small = apply_perturbation(original, torch.full(original.shape, 2 / 255), 8 / 255)
    room = original[2:] <= 253
    assert ((small.int() - original.int())[2:][room] == 2).all()
    assert (small[1] == 255).all()  # clipped at white
    as_levels = apply_perturbation(original, torch.full(original.shape, 2, dtype=torch.int8), 8 / 255)
    assert torch.equal(as_levels, small)
    assert torch.equal(apply_perturbation(original, torch.full(original.shape, 100, dtype=torch.int16), 8 / 255),
                       apply_perturbation(original, torch.full(original.shape, 1.0), 8 / 255))


def test_linf_and_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert linf_levels(a, b) == 0 and psnr(a, b) == float("inf")
    b[0, 0, 0] = 10
    assert linf_levels(a, b) == 10
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (100 / 48)))


def test_sample_seed_is_stable_and_key_dependent():
    assert sample_seed(0, "a") == sample_seed(0, "a")
    assert len({sample_seed(0, "a"), sample_seed(0, "b"), sample_seed(1, "a")}) == 3
    assert 0 <= sample_seed(123, "x") < 2**63


def _batch(keys, size=8):
    pixels = torch.randint(0, 256, (len(keys), 3, size, size), dtype=torch.uint8)
    return ProtectBatch(pixels, keys, [sample_seed(0, k) for k in keys], [None] * len(keys), [None] * len(keys))


def test_random_noise_is_per_key_uniform_and_within_budget():
    m = RandomNoise(epsilon=8 / 255)
    d1 = m.perturb(_batch(["a", "b", "c"], 32))
    d2 = m.perturb(_batch(["c", "x"], 32))
    assert torch.equal(d1[2], d2[0])  # independent of the batch it is in
    assert not d1.is_floating_point()  # integer δ: uint8 levels
    levels = d1.int()
    assert levels.min() == -8 and levels.max() == 8
    counts = torch.bincount((levels + 8).flatten(), minlength=17).float()
    assert counts.min() > 0.8 * counts.mean()  # roughly uniform over the 17 levels
    assert m.config()["protects"] is False


def test_registry_hides_passthrough_and_rejects_unknown_methods():
    assert "random" in method_names() and "passthrough" not in method_names()
    with pytest.raises(UserError, match="unknown method"):
        create_method("passthrough")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        create_method("nope")
    with pytest.raises(UserError, match="takes no --artifact"):
        create_method("random", artifact="/tmp")
    assert create_method("passthrough", allow_hidden=True).name == "passthrough"


def test_artifact_round_trip_and_fingerprint(tmp_path):
    weights = {"generator": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}}
    save_artifact(tmp_path / "a", {"method": "x", "epsilon": 0.03}, weights)
    config, loaded = load_artifact(tmp_path / "a", expected_method="x")
    assert config["epsilon"] == 0.03 and config["weights"] == ["generator"] and "package_version" in config
    assert torch.equal(loaded["generator"]["w"], weights["generator"]["w"])
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"config.json", "generator.safetensors"}
    fp = artifact_fingerprint(tmp_path / "a")
    weights["generator"]["b"] = torch.zeros(2)
    save_artifact(tmp_path / "a", {"method": "x", "epsilon": 0.03}, weights)
    assert artifact_fingerprint(tmp_path / "a") != fp


def test_bad_artifacts_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_artifact(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_artifact(tmp_path / "empty")
    save_artifact(tmp_path / "a", {"method": "x"}, {"g": {"w": torch.ones(1)}})
    with pytest.raises(UserError, match="made by method 'x', not 'y'"):
        load_artifact(tmp_path / "a", expected_method="y")
    (tmp_path / "a" / "g.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="unreadable"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{bad json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"method": "x", "weights": ["gone"]}))
    with pytest.raises(UserError, match="missing its weights"):
        load_artifact(tmp_path / "a")
