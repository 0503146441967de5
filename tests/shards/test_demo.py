"""The embedded demo dataset: layout, content, determinism and argument validation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uge_protect.shards.demo import CLASS_NAMES, render_sample, write_demo_dataset

N_TRAIN, N_TEST, PER_SHARD = 300, 70, 120


def read_shard(path: str | Path) -> list[tuple[str, bytes]]:
    """All (member name, bytes) of a tar, in archive order, with the standard library."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = write_demo_dataset(out, n_train=N_TRAIN, n_test=N_TEST,
                                 samples_per_shard=PER_SHARD, seed=0)
    return out, summary


def samples_of(shards: list[str]) -> list[tuple[str, dict[str, bytes]]]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    for shard in shards:
        for name, data in read_shard(shard):
            key, ext = name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = data
    return samples


def test_shard_layout_and_counts(demo):
    out, summary = demo
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "demo-train-000000.tar", "demo-train-000001.tar", "demo-train-000002.tar"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["demo-test-000000.tar"]
    assert summary["splits"]["train"]["n"] == N_TRAIN
    assert summary["splits"]["test"]["n"] == N_TEST
    assert [Path(p).name for p in summary["splits"]["train"]["shards"]] == [
        f"demo-train-{i:06d}.tar" for i in range(3)]
    assert summary["classes"] == CLASS_NAMES
    assert json.loads((out / "classes.json").read_text(encoding="utf-8")) == CLASS_NAMES
    assert Path(summary["classes_path"]) == out / "classes.json"

    train = samples_of(summary["splits"]["train"]["shards"])
    test = samples_of(summary["splits"]["test"]["shards"])
    assert [k for k, _ in train] == [f"train-{i:06d}" for i in range(N_TRAIN)]
    assert [k for k, _ in test] == [f"test-{i:06d}" for i in range(N_TEST)]
    sizes = [len(read_shard(p)) // 4 for p in summary["splits"]["train"]["shards"]]
    assert sizes == [120, 120, 60]


def test_every_member_present_and_decodable(demo):
    _, summary = demo
    for split in ("train", "test"):
        for key, fields in samples_of(summary["splits"][split]["shards"]):
            assert list(fields) == ["png", "txt", "cls", "json"], key
            img = Image.open(io.BytesIO(fields["png"]))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            img.load()
            caption = fields["txt"].decode("utf-8")
            label = int(fields["cls"].decode("ascii"))
            meta = json.loads(fields["json"].decode("utf-8"))
            assert 0 <= label < len(CLASS_NAMES)
            assert meta["label"] == label
            assert meta["class_name"] == CLASS_NAMES[label] == meta["attrs"]["shape"]
            assert CLASS_NAMES[label] in caption
            assert meta["attrs"]["color"] in caption


def test_classes_present_and_captions_varied(demo):
    _, summary = demo
    assert len(CLASS_NAMES) >= 10 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    train = samples_of(summary["splits"]["train"]["shards"])
    labels = [int(f["cls"]) for _, f in train]
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert (counts > 0).all() and counts.max() < 3 * counts.min()
    test_labels = {int(f["cls"]) for _, f in samples_of(summary["splits"]["test"]["shards"])}
    assert len(test_labels) == len(CLASS_NAMES)
    captions = {f["txt"] for _, f in train}
    assert len(captions) > 0.9 * N_TRAIN > 10 * len(CLASS_NAMES)
    # Images within a class differ too.
    first_class = [f["png"] for _, f in train if int(f["cls"]) == labels[0]]
    assert len(set(first_class)) == len(first_class)


def test_train_and_test_streams_are_independent(demo):
    _, summary = demo
    train = samples_of(summary["splits"]["train"]["shards"])
    test = samples_of(summary["splits"]["test"]["shards"])
    assert not {f["png"] for _, f in train} & {f["png"] for _, f in test}


def test_write_is_byte_identical(tmp_path):
    kwargs = dict(n_train=40, n_test=15, samples_per_shard=16, seed=3)
    write_demo_dataset(tmp_path / "a", **kwargs)
    write_demo_dataset(tmp_path / "b", **kwargs)
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 3 + 1 + 1
    assert a == b
    write_demo_dataset(tmp_path / "c", **{**kwargs, "seed": 4})
    c = all_files(tmp_path / "c")
    assert c["train/demo-train-000000.tar"] != a["train/demo-train-000000.tar"]


def test_samples_do_not_depend_on_split_size_or_sharding(demo, tmp_path):
    _, summary = demo
    small = write_demo_dataset(tmp_path, n_train=25, n_test=5, samples_per_shard=7, seed=0)
    assert samples_of(small["splits"]["train"]["shards"]) == \
        samples_of(summary["splits"]["train"]["shards"])[:25]
    assert samples_of(small["splits"]["test"]["shards"]) == \
        samples_of(summary["splits"]["test"]["shards"])[:5]


def test_image_size_is_configurable(tmp_path):
    summary = write_demo_dataset(tmp_path, n_train=12, n_test=4, image_size=48)
    assert summary["image_size"] == 48
    for _, fields in samples_of(summary["splits"]["train"]["shards"]):
        img = Image.open(io.BytesIO(fields["png"]))
        assert img.size == (48, 48) and img.mode == "RGB"


def test_render_sample_is_a_pure_function_of_the_rng():
    out1 = render_sample(np.random.default_rng(7), 32)
    out2 = render_sample(np.random.default_rng(7), 32)
    img, label, caption, attrs = out1
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 32)
    assert isinstance(label, int) and isinstance(caption, str) and caption
    json.dumps(attrs)  # serializable
    assert np.array_equal(np.asarray(img), np.asarray(out2[0]))
    assert out1[1:] == out2[1:]
    # The object is visible: the image is not flat.
    assert np.asarray(img).std() > 5


@pytest.mark.parametrize("kwargs", [
    {"n_train": 0}, {"n_train": -3}, {"n_test": 0}, {"n_train": 2.5}, {"n_train": "10"},
    {"n_train": True}, {"image_size": 15}, {"image_size": 0}, {"samples_per_shard": 0},
    {"seed": -1}, {"seed": 1.0},
])
def test_argument_validation(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path / "x", **{"n_train": 4, "n_test": 2, **kwargs})
    assert not (tmp_path / "x").exists()


def test_render_sample_rejects_tiny_images():
    with pytest.raises(ValueError, match="image_size"):
        render_sample(np.random.default_rng(0), 8)
