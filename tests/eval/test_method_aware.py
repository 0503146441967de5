"""`eval --method-aware`: an attacker who knows UGE but holds no artifact enumerates the key
directions, estimates one from the data and averages over all; its rows are held out, the one
it keeps is picked on its own small clean set, and the key is never read."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import png_bytes, write_shard
from tests.methods.test_uge import EPS, KEY, _patterned
from uge_protect.cli.app import app
from uge_protect.eval.attacker import mark_picks
from uge_protect.eval.config import EvalConfig
from uge_protect.eval.runner import run_evaluation
from uge_protect.methods.registry import attacker_models
from uge_protect.methods.uge.attacks import ESTIMATORS, AverageProjection, estimate_signs
from uge_protect.methods.uge.key import DIRECTIONS, key_signs

RECORD = {"method": "uge", "key_projection": True, "epsilon": EPS, "fit_architectures": ["small_cnn"]}


@pytest.mark.parametrize("how", list(ESTIMATORS))
def test_each_estimate_finds_the_key_direction_from_the_data_alone(how):
    clean, protected, _, labels = _patterned(288, size=16)
    # the attacker's clean set: other images than the protected ones it scores (1 in 9)
    index, signs = estimate_signs(protected[:256], clean[256:], how, labels[:256], labels[256:])
    assert torch.equal(signs, key_signs(KEY)) and DIRECTIONS[index] == tuple(key_signs(KEY).tolist())


def test_rows_per_architecture_and_what_their_fronts_see():
    clean, protected, _, y = _patterned(32, size=16)
    rows = attacker_models(RECORD, ["small_cnn", "mlp"], protected, y, clean[:8], y[:8])
    labels = [r.label for r in rows]
    assert len(rows) == 2 * (len(DIRECTIONS) + len(ESTIMATORS) + 1) and len(set(labels)) == len(labels)
    assert {r.group for r in rows if "@key:" in r.label} == {"small_cnn@enumerated", "mlp@enumerated"}
    assert all(r.attacker and not r.owner for r in rows) and "small_cnn@estimated:linear-probe" in labels
    true = DIRECTIONS.index(tuple(key_signs(KEY).tolist()))
    xc, xp = clean.float() / 255, protected.float() / 255
    front = next(r for r in rows if r.label == f"small_cnn@key:{true}").front()
    assert torch.equal(front(xc), front(xp))  # the enumerated true key removes the noise exactly
    wrong = next(r for r in rows if r.label == f"small_cnn@key:{(true + 1) % len(DIRECTIONS)}").front()
    assert not torch.equal(wrong(xc), wrong(xp))
    estimated = next(r for r in rows if r.label == "small_cnn@estimated:hf-energy").front()
    assert torch.equal(estimated(xc), estimated(xp))
    model = next(r for r in rows if r.label == "mlp@all-keys").factory(4, seed=3)()
    assert isinstance(model[0], AverageProjection) and model(xc).shape == (32, 4)
    assert all(str(KEY) not in r.cache_tag() for r in rows)
    assert attacker_models({**RECORD, "key_projection": False}, ["mlp"], protected, y, clean, y) == []


def test_the_attacker_keeps_the_row_best_on_its_clean_set():
    summary = [{"defense": d, "arch": f"a@key:{i}", "attacker_acc": acc}
               for d in ("none", "grayscale") for i, acc in enumerate((0.2, 0.9 if d == "none" else 0.1, 0.5))]
    summary.append({"defense": "none", "arch": "a", "attacker_acc": 1.0})  # not a group row
    mark_picks(summary, {f"a@key:{i}": "a@enumerated" for i in range(3)})
    picked = [(r["defense"], r["arch"]) for r in summary if r.get("picked")]
    assert picked == [("none", "a@key:1"), ("grayscale", "a@key:2")] and "group" not in summary[-1]


def _write(path, images, labels, prefix):
    write_shard(path, ((f"{prefix}-{i:04d}", {"png": png_bytes(img.permute(1, 2, 0).numpy()),
                                              "cls": str(int(c)).encode()})
                       for i, (img, c) in enumerate(zip(images, labels))))


@pytest.fixture(scope="module")
def uge_like(tmp_path_factory):
    """Shards protected along UGE's key (class patterns), with UGE's public record."""
    root = tmp_path_factory.mktemp("method-aware")
    clean, protected, _, labels = _patterned(96, size=16)
    for name in ("train", "test", "prot/shards"):
        (root / name).mkdir(parents=True)
    _write(root / "train" / "train-0.tar", clean[:64], labels[:64], "s")
    _write(root / "prot" / "shards" / "train-0.tar", protected[:64], labels[:64], "s")
    _write(root / "test" / "test-0.tar", clean[64:], labels[64:], "t")
    (root / "prot" / "protection.json").write_text(json.dumps({"method": RECORD}))
    return root


def test_eval_trains_the_attacker_rows_as_held_out_and_marks_its_pick(uge_like, tmp_path):
    report = run_evaluation(EvalConfig(
        protected=str(uge_like / "prot"), clean_train=[str(uge_like / "train" / "*.tar")],
        test=[str(uge_like / "test" / "*.tar")], output=str(tmp_path / "r"), archs=["small_cnn"], epochs=1,
        batch_size=32, method_aware=True, attacker_fraction=0.1, figures=False, quiet=True,
        cache_dir=str(tmp_path / "cache")))
    rows = {r["arch"]: r for r in report["tasks"]["classify"]["summary"]}
    assert len(rows) == 1 + len(DIRECTIONS) + len(ESTIMATORS) + 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2 * len(rows)  # each run its own cache entry
    attackers = [r for label, r in rows.items() if "@" in label]
    assert all(r["role"] == "held out" and 0.0 <= r["attacker_acc"] <= 1.0 for r in attackers)
    assert sum(bool(r.get("picked")) for r in attackers) == 1
    assert all(r["group"] == "small_cnn@enumerated" for label, r in rows.items() if "@key:" in label)
    assert str(KEY) not in (tmp_path / "r" / "report.json").read_text()


def test_a_method_without_an_attacker_is_one_error_line(uge_like, tmp_path):
    record = json.loads((uge_like / "prot" / "protection.json").read_text())
    other = tmp_path / "prot"
    (other / "shards").mkdir(parents=True)
    for shard in (uge_like / "prot" / "shards").iterdir():
        (other / "shards" / shard.name).write_bytes(shard.read_bytes())
    (other / "protection.json").write_text(json.dumps({**record, "method": {"method": "random", "protects": False}}))
    result = CliRunner().invoke(app, ["eval", "--protected", str(other), "--clean-train",
                                      str(uge_like / "train" / "*.tar"), "--test", str(uge_like / "test" / "*.tar"),
                                      "-o", str(tmp_path / "r"), "--arch", "mlp", "--epochs", "1", "--method-aware"])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: the protection's method 'random' has no method-aware attacker; leave --method-aware out"]


def test_eval_against_the_texture_key_owner_exact_attackers_held_out(tmp_path):
    from tests.methods.test_uge import _batch, _tiny
    from uge_protect.methods.artifact import save_artifact
    from uge_protect.methods.budget import apply_perturbation
    from uge_protect.methods.uge.fit import fit_uge
    from uge_protect.methods.uge.attacks import RANDOM_KEYS
    from uge_protect.methods.uge.method import Ungeneralizable

    clean, _, _, labels = _patterned(96, size=16)
    config, weights = fit_uge(clean[:64], labels[:64], _tiny(key_scheme="texture", steps=2))
    save_artifact(tmp_path / "art", config, weights)
    method = Ungeneralizable.from_artifact(str(tmp_path / "art"))
    protected = apply_perturbation(clean[:64], method.perturb(_batch(clean[:64], [f"s{i}" for i in range(64)],
                                                                     labels[:64])), EPS)
    for name in ("train", "test", "prot/shards"):
        (tmp_path / name).mkdir(parents=True)
    _write(tmp_path / "train" / "train-0.tar", clean[:64], labels[:64], "s")
    _write(tmp_path / "prot" / "shards" / "train-0.tar", protected, labels[:64], "s")
    _write(tmp_path / "test" / "test-0.tar", clean[64:], labels[64:], "t")
    (tmp_path / "prot" / "protection.json").write_text(json.dumps({"method": method.config()}))
    report = run_evaluation(EvalConfig(
        protected=str(tmp_path / "prot"), clean_train=[str(tmp_path / "train" / "*.tar")],
        test=[str(tmp_path / "test" / "*.tar")], output=str(tmp_path / "r"), archs=["small_cnn"], epochs=1,
        batch_size=32, authorized=str(tmp_path / "art"), other_keys=[99], method_aware=True, distill=["small_cnn"],
        attacker_fraction=0.1, figures=False, quiet=True, cache_dir=str(tmp_path / "cache")))
    rows = {r["arch"]: r for r in report["tasks"]["classify"]["summary"]}
    assert set(rows) == {"small_cnn", "small_cnn+key", "small_cnn+key:99", "small_cnn<-small_cnn+key",
                         "small_cnn@invariant",
                         "small_cnn@fold:block", "small_cnn@fold:image", "small_cnn@estimated:image-pca",
                         *(f"small_cnn@key:r{i}" for i in range(RANDOM_KEYS))}
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2 * len(rows)  # each row its own cache entry
    # the owner's projected views of the protected and the clean images are the same: the same run
    owner = rows["small_cnn+key"]
    assert owner["protected"]["final_test_acc"] == owner["clean"]["final_test_acc"]
    runs = [r for r in report["tasks"]["classify"]["runs"] if r["arch"] == "small_cnn+key"]
    assert [e["train_loss"] for e in runs[0]["per_epoch"]] == [e["train_loss"] for e in runs[1]["per_epoch"]]
    assert all(r["role"] == "held out" for label, r in rows.items() if "@" in label)
    assert KEY not in (tmp_path / "r" / "report.json").read_text()
