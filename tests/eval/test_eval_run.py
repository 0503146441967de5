"""End-to-end: a tiny evaluation writes report.json, report.md and the figures; CLI errors."""

from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from tests.helpers import simple_samples, write_shard
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.eval.runner import EvalConfig, run_evaluation
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.methods.registry import create_method

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 train (two shards) and 32 test samples, 16×16, 10 classes; train protected with `random`."""
    root = tmp_path_factory.mktemp("evaldata")
    (root / "train").mkdir()
    (root / "test").mkdir()
    write_shard(root / "train" / "train-000000.tar", simple_samples("a", 32, seed=1, size=(16, 16)))
    write_shard(root / "train" / "train-000001.tar", simple_samples("b", 32, seed=2, size=(16, 16)))
    write_shard(root / "test" / "test-000000.tar", simple_samples("t", 32, seed=3, size=(16, 16)))
    run_shard_job(
        ShardJobConfig(inputs=[str(root / "train" / "*.tar")], output=str(root / "prot"), num_workers=0,
                       encode_threads=0, quiet=True),
        create_method("random"),
    )
    return root


def _cfg(data, out, **kw):
    base = dict(protected=str(data / "prot"), clean_train=[str(data / "train" / "*.tar")],
                test=[str(data / "test" / "*.tar")], output=str(out), archs=["small_cnn"], epochs=1,
                batch_size=32, quiet=True)
    base.update(kw)
    return EvalConfig(**base)


def test_cli_end_to_end(data, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, [
        "eval", "--protected", str(data / "prot"), "--clean-train", str(data / "train" / "*.tar"),
        "--test", str(data / "test" / "*.tar"), "--arch", "small_cnn", "--defense", "none",
        "--defense", "grayscale", "--epochs", "2", "--batch-size", "32", "--clean-fraction", "0.25",
        "--repeats", "2", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output  # progress lines
    for name in ("report.json", "report.md", "accuracy_per_epoch.png", "clean_vs_protected.png", "samples_grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["protection"]["method"]["method"] == "random"
    assert report["settings"]["seed"] == 0 and report["settings"]["repeats"] == 2
    pp = report["data"]["partial_protection"]
    assert pp["n_replaced_by_clean"] == 16 and pp["clean_fraction_actual"] == 0.25
    cls = report["tasks"]["classify"]
    assert len(cls["runs"]) == 2 * 1 * 2 * 2  # defenses × archs × repeats × {protected, clean}
    assert {r["train_data"] for r in cls["runs"]} == {"protected", "clean"}
    assert sorted({r["seed"] for r in cls["runs"]}) == [0, 1]
    for r in cls["runs"]:
        assert len(r["per_epoch"]) == 2 and r["settings"]["arch"] == "small_cnn"
        assert r["final_test_acc"] == r["per_epoch"][-1]["test_acc"]
        assert r["best_test_acc"] == max(e["test_acc"] for e in r["per_epoch"])
        assert sum(map(sum, r["confusion"])) == 32
    rows = {(row["defense"], row["arch"]): row for row in cls["summary"]}
    assert set(rows) == {("none", "small_cnn"), ("grayscale", "small_cnn")}
    row = rows[("none", "small_cnn")]
    assert row["clean"]["final_test_acc"]["n"] == 2 and len(row["protected"]["per_epoch_test_acc_mean"]) == 2
    md = (out / "report.md").read_text()
    assert "| grayscale | small_cnn |" in md and "clean final" in md and "samples_grid.png" in md


def test_training_time_defenses_run(data, tmp_path):
    report = run_evaluation(_cfg(data, tmp_path / "r", defenses=["cutout", "mixup", "strong-aug", "adv-train", "jpeg:10",
                                                                 "class-mean"], adv_steps=1, figures=False))
    specs = [row["defense"] for row in report["tasks"]["classify"]["summary"]]
    assert specs == ["cutout", "mixup", "strong-aug", "adv-train", "jpeg:10", "class-mean"]
    assert (tmp_path / "r" / "report.json").is_file()


def test_class_mean_defense_sees_the_training_labels_only(data, tmp_path, monkeypatch):
    import uge_protect.eval.runner as runner_mod

    seen = []
    real = runner_mod.apply_data_defense

    def spy(defense, images, labels=None):
        seen.append((defense.spec, images.shape[0], None if labels is None else labels.clone()))
        return real(defense, images, labels)

    monkeypatch.setattr(runner_mod, "apply_data_defense", spy)
    run_evaluation(_cfg(data, tmp_path / "r", defenses=["class-mean"], figures=False))
    # the protected and the clean training sets with their labels, the test set without
    assert sorted((n, lab is None) for _, n, lab in seen) == [(32, True), (64, False), (64, False)]
    assert all(spec == "class-mean" and (lab is None or int(lab.min()) >= 0) for spec, _, lab in seen)


def test_same_seed_same_result(data, tmp_path):
    a = run_evaluation(_cfg(data, tmp_path / "a", figures=False))
    b = run_evaluation(_cfg(data, tmp_path / "b", figures=False))
    fa = [r["final_test_acc"] for r in a["tasks"]["classify"]["runs"]]
    fb = [r["final_test_acc"] for r in b["tasks"]["classify"]["runs"]]
    assert fa == fb


def test_clip_task_uses_clip_module(data, tmp_path, monkeypatch):
    import uge_protect.eval.clip as real

    calls = []

    def fake(train, test, **kw):
        calls.append((len(train), len(test), kw))
        r = 0.1 if kw["label"] == "protected" else 0.6
        m = {"R@1": r, "R@5": r, "R@10": r, "median_rank": 12.0}
        return {"i2t": m, "t2i": m, "zero_shot_accuracy": 0.2, "per_epoch": [], "seconds": 0.0, "crop_pad": 1}

    module = types.SimpleNamespace(train_and_score_clip=fake, clip_settings=real.clip_settings)
    monkeypatch.setitem(sys.modules, "uge_protect.eval.clip", module)
    monkeypatch.setattr("uge_protect.eval.clip", module, raising=False)
    report = run_evaluation(_cfg(data, tmp_path / "c", task="clip", defenses=["none", "mixup"], clip_epochs=1))
    assert sorted((c[0], c[1], c[2]["label"], c[2]["epochs"]) for c in calls) == [
        (64, 32, "clean", 1), (64, 32, "protected", 1)]
    clip = report["tasks"]["clip"]
    assert "classify" not in report["tasks"]
    assert [r["defense"] for r in clip["runs"]] == ["none"] and clip["skipped_defenses"] == ["mixup"]
    assert clip["runs"][0]["protected"]["i2t"]["R@1"] == 0.1 and clip["runs"][0]["clean"]["t2i"]["R@10"] == 0.6
    assert clip["runs"][0]["settings"]["epochs"] == 1
    assert "CLIP trained from scratch" in (tmp_path / "c" / "report.md").read_text()


def test_clip_task_without_clip_module(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uge_protect.eval.clip", None)
    with pytest.raises(UserError, match="CLIP evaluation"):
        run_evaluation(_cfg(data, tmp_path / "x", task="clip"))


def test_cli_errors(data, tmp_path):
    base = ["eval", "--clean-train", str(data / "train" / "*.tar"), "--test", str(data / "test" / "*.tar"),
            "-o", str(tmp_path / "o")]
    cases = [
        (["--protected", str(tmp_path / "missing")], "protected directory not found"),
        (["--protected", str(data / "train")], "no shards"),
        (["--protected", str(data / "prot"), "--defense", "blur"], "unknown defense"),
        (["--protected", str(data / "prot"), "--arch", "vit"], "unknown architecture"),
        (["--protected", str(data / "prot"), "--clean-fraction", "2"], "--clean-fraction"),
        (["--protected", str(data / "prot"), "--task", "segment"], "unknown task"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (extra, result.output)
    # clean shards whose keys do not match the protected ones
    result = runner.invoke(app, ["eval", "--protected", str(data / "prot"), "--clean-train", str(data / "test" / "*.tar"),
                                 "--test", str(data / "test" / "*.tar"), "--clean-fraction", "0.5",
                                 "-o", str(tmp_path / "o2"), "--arch", "small_cnn", "--epochs", "1"])
    assert result.exit_code == 2 and "not in the clean training set" in result.output
