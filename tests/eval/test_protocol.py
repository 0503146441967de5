"""The efficacy protocol: rows marked seen in fit / held out / owner, "did not learn" rows left
out, the headline as the worst case over held-out architectures (JSON field, first line, figure)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import simple_samples, write_shard
from uge_protect.eval.protocol import (HELD_OUT, OWNER, SEEN, UNRECORDED, classifier_headline, clip_headline,
    fit_architectures, mark_classifier_rows, role)
from uge_protect.eval.runner import EvalConfig, run_evaluation
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.methods.base import clip_arch_id
from uge_protect.methods.registry import create_method


def _row(arch: str, clean: float, protected: float, defense: str = "none") -> dict:
    stat = lambda v: {"mean": v, "std": 0.0, "n": 1}  # noqa: E731
    return {"defense": defense, "arch": arch, "clean": {"final_test_acc": stat(clean)},
            "protected": {"final_test_acc": stat(protected)}}


def test_fit_architectures_reads_only_a_list_of_short_names():
    assert fit_architectures({"fit_architectures": ["small_cnn", "vgg11", "small_cnn"]}) == ["small_cnn", "vgg11"]
    assert fit_architectures({"fit_architectures": []}) == []
    for bad in ({}, {"fit_architectures": "small_cnn"}, {"fit_architectures": [1]}, {"fit_architectures": [""]},
                {"fit_architectures": ["x" * 201]}, {"fit_architectures": ["a"] * 65}, None, []):
        assert fit_architectures(bad) is None, bad


def test_roles():
    assert role("vgg11", ["small_cnn"]) == HELD_OUT
    assert role("small_cnn", ["small_cnn"]) == SEEN
    assert role("small_cnn", None) == UNRECORDED
    assert role("small_cnn", ["small_cnn"], owner=True) == OWNER


def test_headline_is_the_worst_held_out_row_that_learned():
    summary = [
        _row("small_cnn", 0.90, 0.95),            # seen in fit: higher, but not counted
        _row("vgg11", 0.92, 0.40),                # held out
        _row("mlp", 0.80, 0.60),                  # held out: the worst case
        _row("vit_tiny", 0.30, 0.90),             # did not learn (0.30 < 0.92 / 2): left out
        _row("resnet18", 0.91, 0.89),             # the owner
        _row("mlp", 0.85, 0.70, defense="grayscale"),  # the same network under a defense: worse still
    ]
    roles = {"small_cnn": SEEN, "vgg11": HELD_OUT, "mlp": HELD_OUT, "vit_tiny": HELD_OUT, "resnet18": OWNER}
    mark_classifier_rows(summary, roles, num_classes=10)
    assert [r["learned"] for r in summary] == [True, True, True, False, True, True]
    head = classifier_headline(summary)
    assert head["basis"] == "held-out architectures"
    assert head["worst"] == {"arch": "mlp", "defense": "grayscale", "protected_acc": 0.70, "clean_acc": 0.85,
                             "ratio": pytest.approx(0.70 / 0.85)}
    assert head["seen_in_fit"] == ["small_cnn"] and head["owner"] == ["resnet18"]
    assert head["did_not_learn"] == ["vit_tiny (none)"]
    assert head["owner_worst"]["protected_acc"] == 0.89


def test_headline_without_held_out_rows_says_so():
    summary = [_row("small_cnn", 0.9, 0.1), _row("vgg11", 0.9, 0.2)]
    mark_classifier_rows(summary, {"small_cnn": SEEN, "vgg11": SEEN}, num_classes=10)
    head = classifier_headline(summary)
    assert head["worst"] is None and "seen in the fit" in head["basis"]
    mark_classifier_rows(summary, {}, num_classes=10)  # nothing recorded: every row counts, and the basis says so
    head = classifier_headline(summary)
    assert head["worst"]["arch"] == "vgg11" and "not recorded" in head["basis"]


def test_rows_at_chance_did_not_learn_and_an_owner_alone_is_no_headline():
    summary = [_row("mlp", 0.12, 0.11), _row("small_cnn", 0.13, 0.10)]  # 10 classes: both near chance
    mark_classifier_rows(summary, {"mlp": HELD_OUT, "small_cnn": HELD_OUT}, num_classes=10)
    assert not any(r["learned"] for r in summary)
    head = classifier_headline(summary)
    assert head["worst"] is None and head["basis"] == "no held-out architecture learned clean data"
    owner = [_row("resnet18+key", 0.9, 0.9)]
    mark_classifier_rows(owner, {"resnet18+key": OWNER}, num_classes=10)
    head = classifier_headline(owner)
    assert head["worst"] is None and "no hacker architecture was evaluated" in head["basis"]


def test_a_control_and_a_malformed_record_read_safely():
    assert fit_architectures({"protects": False, "fit_architectures": ["small_cnn", "vgg11"]}) == []
    assert fit_architectures({"fit_architectures": ["<b>x</b>"]}) is None


def test_headline_text_refuses_a_stranger_s_malformed_headline():
    from uge_protect.eval.protocol import headline_text

    good = {"headline": {"classify": {"basis": "held-out architectures", "worst": {
        "arch": "vgg11", "defense": "none", "protected_acc": 0.2, "clean_acc": 0.9}}}}
    assert headline_text(good).startswith("worst case over held-out architectures: vgg11 reached 20.0%")
    aware = json.loads(json.dumps(good))  # a method-aware attacker's row can be the worst case
    aware["headline"]["classify"]["worst"]["arch"] = "small_cnn@fold:image"
    assert "small_cnn@fold:image reached 20.0%" in headline_text(aware)
    for bad in ({"arch": "<img src=x>"}, {"protected_acc": [1] * 10}, {"clean_acc": 3.0}):
        report = json.loads(json.dumps(good))
        report["headline"]["classify"]["worst"].update(bad)
        with pytest.raises(ValueError):
            headline_text(report)
    report = json.loads(json.dumps(good))
    report["headline"]["classify"]["basis"] = "**click** <a href=x>"
    with pytest.raises(ValueError):
        headline_text(report)


def test_clip_headline_marks_seen_and_held_out():
    def run(clean, prot, defense="none"):
        return {"defense": defense, "seed": 0, "settings": {"chance_R@10": 0.1},
                "clean": {"i2t": {"R@10": clean}, "t2i": {"R@10": clean - 0.05}},
                "protected": {"i2t": {"R@10": prot - 0.05}, "t2i": {"R@10": prot}}}
    runs = [run(0.6, 0.3), run(0.5, 0.45, "grayscale"), run(0.15, 0.5, "jpeg:10")]
    head = clip_headline(runs, "clip:x", ["clip:y"])
    assert [r["learned"] for r in runs] == [True, True, False] and runs[0]["role"] == HELD_OUT
    assert head["worst"]["defense"] == "grayscale" and head["worst"]["protected_R@10"] == 0.45
    head = clip_headline(runs, "clip:x", ["clip:x"])
    assert runs[0]["role"] == SEEN and head["worst"] is None


def test_clip_arch_id_names_the_image_tower():
    a = {"embed_dim": 64, "vision_cfg": {"layers": 2, "width": 64}, "text_cfg": {"layers": 2}}
    b = {**a, "text_cfg": {"layers": 4}}
    c = {**a, "vision_cfg": {"layers": 3, "width": 64}}
    wide = {**a, "vision_cfg": {"layers": 2, "width": 128}}
    assert clip_arch_id(a) == clip_arch_id(b) == clip_arch_id(wide) == "clip:vit-p16-l2" != clip_arch_id(c)
    assert clip_arch_id("ViT-B-32") == "clip:ViT-B-32"
    from uge_protect.eval.clip import DEFAULT_MODEL_CONFIG
    from uge_protect.models.clip import TINY_CLIP_CONFIG

    # the evaluation's CLIP is the fits' default surrogate at another width: the same family, seen
    assert clip_arch_id(DEFAULT_MODEL_CONFIG) == clip_arch_id(TINY_CLIP_CONFIG)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    for name in ("train", "test"):
        (root / name).mkdir()
    write_shard(root / "train" / "train-000000.tar", simple_samples("a", 48, seed=1, size=(16, 16)))
    write_shard(root / "test" / "test-000000.tar", simple_samples("t", 24, seed=3, size=(16, 16)))
    run_shard_job(ShardJobConfig(inputs=[str(root / "train" / "*.tar")], output=str(root / "prot"), num_workers=0,
                                 encode_threads=0, quiet=True), create_method("random"))
    return root


def _evaluate(data, out, archs=("small_cnn", "mlp")) -> dict:
    return run_evaluation(EvalConfig(protected=str(data / "prot"), clean_train=[str(data / "train" / "*.tar")],
                                     test=[str(data / "test" / "*.tar")], output=str(out), archs=list(archs),
                                     epochs=1, batch_size=16, quiet=True))


def test_protection_json_records_the_fit_and_eval_marks_the_rows(data, tmp_path):
    protection = json.loads((data / "prot" / "protection.json").read_text())
    assert protection["method"]["fit_architectures"] == []  # random noise is fitted against nothing
    report = _evaluate(data, tmp_path / "r1")
    assert report["protection"]["fit_architectures"] == []
    rows = report["tasks"]["classify"]["summary"]
    assert {r["role"] for r in rows} == {HELD_OUT}
    head = report["headline"]["classify"]
    learned = [r for r in rows if r["learned"]]
    assert head["worst"]["protected_acc"] == max(r["protected"]["final_test_acc"]["mean"] for r in learned)
    on_disk = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert on_disk["headline"] == json.loads(json.dumps(head and report["headline"]))
    md = (tmp_path / "r1" / "report.md").read_text().splitlines()
    assert md[0].startswith("**worst case over held-out architectures: ")
    assert (tmp_path / "r1" / "headline.png").read_bytes()[:4] == b"\x89PNG"
    assert on_disk["files"]["figures"][0] == "headline.png"


def test_a_row_seen_in_the_fit_is_left_out_of_the_headline(data, tmp_path):
    edited = tmp_path / "prot"
    import shutil

    shutil.copytree(data / "prot", edited)
    protection = json.loads((edited / "protection.json").read_text())
    protection["method"]["fit_architectures"] = ["small_cnn"]
    del protection["method"]["protects"]  # as a protecting method's record would read
    (edited / "protection.json").write_text(json.dumps(protection))
    report = run_evaluation(EvalConfig(protected=str(edited), clean_train=[str(data / "train" / "*.tar")],
                                       test=[str(data / "test" / "*.tar")], output=str(tmp_path / "r"),
                                       archs=["small_cnn", "mlp"], epochs=1, batch_size=16, quiet=True))
    roles = {r["arch"]: r["role"] for r in report["tasks"]["classify"]["summary"]}
    assert roles == {"small_cnn": SEEN, "mlp": HELD_OUT}
    head = report["headline"]["classify"]
    assert head["seen_in_fit"] == ["small_cnn"]
    if head["worst"] is not None:
        assert head["worst"]["arch"] == "mlp"
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| none | small_cnn | seen in fit" in md and "`small_cnn`" in md.splitlines()[4]
    # a record naming every evaluated architecture leaves no row to judge: eval says so
    protection["method"]["fit_architectures"] = ["small_cnn", "mlp"]
    (edited / "protection.json").write_text(json.dumps(protection))
    report = run_evaluation(EvalConfig(protected=str(edited), clean_train=[str(data / "train" / "*.tar")],
                                       test=[str(data / "test" / "*.tar")], output=str(tmp_path / "r2"),
                                       archs=["small_cnn", "mlp"], epochs=1, batch_size=16, quiet=True))
    assert report["headline"]["classify"]["worst"] is None
    assert any("names every evaluated architecture" in n for n in report["notes"])
    # a malformed record is no record: every row counts, and the report says so
    (edited / "protection.json").write_text(json.dumps({**protection, "method": "uge"}))
    report = run_evaluation(EvalConfig(protected=str(edited), clean_train=[str(data / "train" / "*.tar")],
                                       test=[str(data / "test" / "*.tar")], output=str(tmp_path / "r3"),
                                       archs=["small_cnn"], epochs=1, batch_size=16, quiet=True))
    assert report["protection"]["fit_architectures"] is None
    assert {r["role"] for r in report["tasks"]["classify"]["summary"]} == {UNRECORDED}


def test_every_architecture_builds_and_trains_on_small_images():
    from uge_protect.eval.classify import TrainSettings, fit_classifier
    from uge_protect.models.classifiers import ARCHITECTURES, build_classifier

    for name in ("mlp", "vit_tiny", "small_cnn", "resnet_cifar", "vgg11", "mobilenet_v2"):
        assert name in ARCHITECTURES
        for side in (16, 32, 48):
            net = build_classifier(name, 7, seed=0)
            assert net(torch.rand(2, 3, side, side)).shape == (2, 7), (name, side)
    x = (torch.rand(32, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.arange(32) % 4
    for name in ("mlp", "vit_tiny", "resnet_cifar"):
        _, r = fit_classifier(x, y, x, y, 4, TrainSettings(arch=name, epochs=1, batch_size=16))
        assert 0.0 <= r["final_test_acc"] <= 1.0 and r["per_epoch"][0]["train_loss"] > 0


def test_methods_record_what_they_were_fitted_against(tmp_path):
    from uge_protect.methods.artifact import save_artifact
    from uge_protect.methods.em.fit import fit_em
    from uge_protect.methods.em.config import EMConfig
    from uge_protect.methods.registry import create_method as make

    x = (torch.rand(16, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.arange(16) % 2
    config, weights = fit_em(x, y, EMConfig(mode="class", max_rounds=1, surrogate="vgg11", surrogate_width=None))
    assert config["fit_architectures"] == ["vgg11"]
    save_artifact(tmp_path / "em", config, weights)
    assert make("em", str(tmp_path / "em")).config()["fit_architectures"] == ["vgg11"]
    del config["fit_architectures"]  # an artifact older than the field: derived from the surrogate
    save_artifact(tmp_path / "old", config, weights)
    assert make("em", str(tmp_path / "old")).config()["fit_architectures"] == ["vgg11"]


def test_a_last_batch_of_one_sample_and_too_small_images():
    from uge_protect.eval.classify import TrainSettings, fit_classifier

    x = (torch.rand(65, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.arange(65) % 3
    _, r = fit_classifier(x, y, x[:8], y[:8], 3, TrainSettings(arch="mobilenet_v2", epochs=1, batch_size=64))
    assert r["per_epoch"][0]["train_acc"] >= 0  # trained on the 64 and skipped the lone 65th


def test_vgg_on_images_too_small_is_one_user_error(data, tmp_path):
    from uge_protect.errors import UserError

    with pytest.raises(UserError, match="vgg11 needs images of at least 16 pixels"):
        run_evaluation(EvalConfig(protected=str(data / "prot"), clean_train=[str(data / "train" / "*.tar")],
                                  test=[str(data / "test" / "*.tar")], output=str(tmp_path / "r"),
                                  archs=["vgg11"], epochs=1, image_size=8, quiet=True))


def test_uge_records_its_students_feature_space_and_the_network_l_gm_fits_through():
    from uge_protect.methods.uge.method import uge_fit_architectures

    assert uge_fit_architectures(["small_cnn", "vgg11"], None, 1.0) == ["small_cnn", "vgg11"]
    tiny = {"embed_dim": 8, "vision_cfg": {"layers": 1, "width": 8, "patch_size": 4}}
    assert uge_fit_architectures(["small_cnn"], tiny, 1.0) == ["small_cnn", "clip:vit-p4-l1"]
    assert uge_fit_architectures(["small_cnn"], tiny, 0.0) == ["small_cnn"]
    assert uge_fit_architectures(["vgg11"], None, 0.0, "resnet18") == ["vgg11", "resnet18"]
