"""Artifacts are untrusted input: schema-checked configs, finite weights, owner-only files;
a fit never saves a diverged network; ε under one uint8 level is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.helpers import simple_samples, write_shard
from tests.methods.test_t2ue import TINY_CLIP
from tests.methods.test_uge import _tiny as tiny_uge
from tests.methods.test_uge import stripes
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.methods.artifact import check_config, json_type_matches, load_artifact, save_artifact
from uge_protect.methods.base import ProtectBatch, sample_seed
from uge_protect.methods.em.fit import fit_em
from uge_protect.methods.em.config import EMArtifact, EMConfig
from uge_protect.methods.em.clip import fit_em_clip
from uge_protect.methods.em.config import EMClipArtifact, EMClipConfig
from uge_protect.methods.registry import create_method
from uge_protect.methods.t2ue.fit import fit_t2ue
from uge_protect.methods.t2ue.config import T2UEArtifact, T2UEConfig
from uge_protect.methods.uge.fit import fit_uge
from uge_protect.methods.uge.config import UGEArtifact, UGEConfig

runner = CliRunner()
#: What a damaged or hostile config.json may hold in place of any field.
BAD_VALUES = ([1], None, "false", -1)
SCHEMAS = {"em_sample": EMArtifact, "em_class": EMArtifact, "em_clip": EMClipArtifact, "t2ue": T2UEArtifact,
           "uge": UGEArtifact}


def _errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One tiny fitted artifact per method (and EM mode)."""
    root = tmp_path_factory.mktemp("artifacts")
    images, labels = stripes(16)
    captions = [f"a {'red' if int(y) else 'blue'} thing number {i}" for i, y in enumerate(labels.tolist())]
    em = dict(surrogate_width=4, train_batches=1, max_rounds=1, pgd_steps=1, batch_size=8, device="cpu")
    fits = {
        "em_sample": lambda: fit_em(images, labels, EMConfig(**em)),
        "em_class": lambda: fit_em(images, labels, EMConfig(mode="class", **em)),
        "em_clip": lambda: fit_em_clip(images, captions, EMClipConfig(
            clip_model=TINY_CLIP, train_batches=1, max_rounds=1, pgd_steps=1, batch_size=8, bank_size=4, device="cpu")),
        "t2ue": lambda: fit_t2ue(images, captions, T2UEConfig(
            objective="infonce", surrogate=TINY_CLIP, noise_size=16, width=8, z_dim=8, steps=2, warmup_steps=1, batch_size=8, device="cpu")),
        "uge": lambda: fit_uge(images, labels, tiny_uge(steps=1)),
    }
    out = {}
    for name, fit in fits.items():
        config, weights = fit()
        out[name] = save_artifact(root / name, config, weights)
    return out


def _batch() -> ProtectBatch:
    images, labels = stripes(2)
    keys = ["k0", "k1"]
    return ProtectBatch(images, keys, [sample_seed(0, k) for k in keys], ["a red thing", "a blue thing"],
                        labels.tolist())


def _outcome(path, method: str) -> str:
    """'ok' when the artifact loads as ``method`` (what `shard -m` names) and perturbs a batch,
    'error' for a UserError; any other exception fails the test."""
    try:
        create_method(method, str(path)).perturb(_batch())
    except UserError:
        return "error"
    return "ok"


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_field_of_a_wrong_type_is_a_user_error_never_a_traceback(artifacts, name, tmp_path):
    work = tmp_path / "a"
    shutil.copytree(artifacts[name], work)
    original = json.loads((work / "config.json").read_text())
    hints = typing.get_type_hints(SCHEMAS[name])
    method = original["method"]
    assert _outcome(work, method) == "ok"
    for field in sorted(original):
        # a field the schema does not name is never read: one wrong value shows it
        for bad in BAD_VALUES if field in hints else BAD_VALUES[:1]:
            (work / "config.json").write_text(json.dumps({**original, field: bad}))
            outcome = _outcome(work, method)
            if field in hints and not json_type_matches(bad, hints[field]):
                assert outcome == "error", (field, bad)  # the schema names every field the method reads
    (work / "config.json").write_text(json.dumps(original))
    assert _outcome(work, method) == "ok"


def test_the_issue_s_examples_are_refused(artifacts, tmp_path):
    cases = [("uge", "epsilon", [8 / 255]), ("uge", "width", -1), ("uge", "key_seed", None),
             ("uge", "key_projection", "false"), ("t2ue", "width", -1), ("t2ue", "epsilon", 0.001),
             ("em_sample", "surrogate_width", -1), ("em_class", "num_classes", True)]
    for name, field, bad in cases:
        work = tmp_path / f"{name}-{field}"
        shutil.copytree(artifacts[name], work)
        config = json.loads((work / "config.json").read_text())
        (work / "config.json").write_text(json.dumps({**config, field: bad}))
        with pytest.raises(UserError, match=field.replace("_", ".") if bad != 0.001 else "under one"):
            create_method(config["method"], str(work))


def test_shard_with_a_damaged_config_is_one_error_line(artifacts, tmp_path):
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 2, size=(16, 16)))
    work = tmp_path / "a"
    shutil.copytree(artifacts["uge"], work)
    config = json.loads((work / "config.json").read_text())
    (work / "config.json").write_text(json.dumps({**config, "key_projection": "false"}))
    result = runner.invoke(app, ["shard", str(shard), "-o", str(tmp_path / "o"), "-m", "uge", "--artifact",
                                 str(work), "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(_errors(result)) == 1 and "'key_projection' must be true or false" in _errors(result)[0]


def test_a_nan_weight_is_refused_at_load_with_one_error_line(artifacts, tmp_path):
    work = tmp_path / "a"
    shutil.copytree(artifacts["uge"], work)
    state = load_file(str(work / "generator.safetensors"))
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name] = state[name].clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view_as(state[name])
    save_file(state, str(work / "generator.safetensors"))  # by hand: save_artifact would refuse
    with pytest.raises(UserError, match="not finite"):
        load_artifact(work)
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 2, size=(16, 16)))
    out = tmp_path / "o"
    result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "uge", "--artifact", str(work),
                                 "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and len(_errors(result)) == 1
    assert f"{name!r}" in _errors(result)[0] and "not finite" in _errors(result)[0]
    assert not list(out.glob("shards/*.tar"))


def test_a_diverged_fit_saves_nothing(tmp_path):
    weights = {"generator": {"w": torch.tensor([1.0, float("inf")]), "b": torch.zeros(2)}}
    with pytest.raises(UserError, match="the fit diverged: weight 'w' of group 'generator' is not finite"):
        save_artifact(tmp_path / "a", {"method": "x"}, weights)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_fit_command_turns_a_diverged_fit_into_one_error_line(tmp_path, monkeypatch):
    from uge_protect.methods import registry

    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 8, size=(16, 16)))
    entry = registry._METHODS["em"]
    fitter = entry.fit

    def diverged(*args, **kwargs):
        config, weights = fitter(*args, **kwargs)
        first = next(iter(weights["surrogate"]))
        weights["surrogate"][first] = torch.full_like(weights["surrogate"][first], float("nan"))
        return config, weights

    monkeypatch.setitem(registry._METHODS, "em", dataclasses.replace(entry, fit=diverged))
    result = runner.invoke(app, ["fit", "em", str(shard), "-o", str(tmp_path / "art"), "--surrogate-width", "4",
                                 "--train-batches", "1", "--max-rounds", "1", "--pgd-steps", "1", "--quiet"])
    assert result.exit_code == 2 and len(_errors(result)) == 1
    assert _errors(result)[0].startswith("error: the fit diverged: weight ") and "group 'surrogate'" in result.output
    assert not (tmp_path / "art" / "config.json").exists()


def test_every_artifact_file_is_created_owner_only(tmp_path):
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        save_artifact(tmp_path / "a", {"method": "x"}, {"g": {"w": torch.ones(2)}, "h": {"w": torch.ones(1)}})
    finally:
        os.umask(old)
    files = sorted((tmp_path / "a").iterdir())
    assert [f.name for f in files] == ["config.json", "g.safetensors", "h.safetensors"]  # no temporary left
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) & 0o077 == 0


def test_weight_group_names_cannot_leave_the_artifact(tmp_path):
    save_artifact(tmp_path / "a", {"method": "x"}, {"g": {"w": torch.ones(1)}})
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "weights": ["../a/g"]}))
    with pytest.raises(UserError, match="weight group names"):
        load_artifact(tmp_path / "a")
    with pytest.raises(ValueError):
        save_artifact(tmp_path / "b", {"method": "x"}, {"../g": {"w": torch.ones(1)}})


def test_json_types_follow_the_annotations():
    assert json_type_matches(True, bool) and not json_type_matches("false", bool) and not json_type_matches(0, bool)
    assert json_type_matches(3, int) and not json_type_matches(True, int) and not json_type_matches(3.0, int)
    assert json_type_matches(3, float) and not json_type_matches(float("nan"), float)
    assert not json_type_matches(True, float) and not json_type_matches("1", float)
    assert json_type_matches(None, int | None) and json_type_matches({"a": 1}, str | dict | None)
    assert json_type_matches(["a"], list[str] | None) and not json_type_matches(["a", 1], list[str])
    assert not json_type_matches(2**70, int)


def test_missing_fields_are_named_unless_older_artifacts_omit_them(tmp_path):
    @dataclasses.dataclass
    class Schema:
        a: int
        b: bool = True

        def validate(self) -> None:
            if self.a < 0:
                raise UserError("a must be >= 0")

    assert check_config(tmp_path, {"a": 1}, Schema).b is True
    assert check_config(tmp_path, {"a": 1}, Schema, legacy={"b": False}).b is False
    with pytest.raises(UserError, match="lacks 'a'"):
        check_config(tmp_path, {}, Schema)
    with pytest.raises(UserError, match="lacks 'b'"):
        check_config(tmp_path, {"a": 1}, Schema, required=("b",))
    with pytest.raises(UserError, match="a must be >= 0"):
        check_config(tmp_path, {"a": -1}, Schema)


@pytest.mark.parametrize("config_cls", [EMConfig, EMClipConfig, T2UEConfig, UGEConfig])
def test_fits_refuse_an_epsilon_under_one_level(config_cls):
    with pytest.raises(UserError, match="under one uint8 level"):
        config_cls.from_options({"epsilon": 0.001, "authorized": "small_cnn"} if config_cls is UGEConfig
                                else {"epsilon": 0.001})
    with pytest.raises(UserError, match="under one uint8 level"):
        config_cls.from_options({"epsilon": 0.0})


def test_methods_refuse_an_epsilon_under_one_level_from_the_cli(tmp_path):
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 2, size=(16, 16)))
    for eps in ("0", "0.001"):
        out = tmp_path / f"o{eps}"
        result = runner.invoke(app, ["shard", str(shard), "-o", str(out), "-m", "random", "--epsilon", eps,
                                     "--workers", "0", "--quiet"])
        assert result.exit_code == 2 and len(_errors(result)) == 1 and "under one uint8 level" in _errors(result)[0]
        assert not out.exists() or not list(out.glob("shards/*.tar"))
    result = runner.invoke(app, ["fit", "em", str(shard), "-o", str(tmp_path / "a"), "--epsilon", "0.001"])
    assert result.exit_code == 2 and "under one uint8 level" in _errors(result)[0]
    assert create_method("random", epsilon=1 / 255).epsilon == 1 / 255
    assert create_method("passthrough", allow_hidden=True, epsilon=0.0).epsilon == 0.0  # the benchmark control
