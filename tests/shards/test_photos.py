"""The real-photographs benchmark: determinism, disjoint train/test regions, captions, pinned
photographs and the `photo-data` command. Needs the photographs (`make photos`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.shards import photos as photos_mod
from uge_protect.shards.dataset import load_shards
from uge_protect.shards.photos import CLASS_NAMES, PHOTOS, find_photos, write_photo_dataset

TINY = dict(train_per_class=3, test_per_class=2, image_size=16, samples_per_shard=20)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def samples(shards: list[str]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """A directory of links to the verified photographs (found where `make photos` puts them)."""
    d = tmp_path_factory.mktemp("backgrounds")
    for photo, path, _ in find_photos():
        (d / photo.file).parent.mkdir(parents=True, exist_ok=True)
        (d / photo.file).symlink_to(path.resolve())
    return d


@pytest.fixture(scope="module")
def built(photo_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("photos")
    return out, write_photo_dataset(out, photo_dirs=[photo_dir], **TINY)


def test_layout_fields_and_counts(built):
    out, summary = built
    assert len(CLASS_NAMES) >= 10 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert json.loads((out / "classes.json").read_text(encoding="utf-8")) == CLASS_NAMES
    assert sorted(p.name for p in (out / "train").iterdir()) == ["photos-train-000000.tar", "photos-train-000001.tar"]
    train = samples(summary["splits"]["train"]["shards"])
    test = samples(summary["splits"]["test"]["shards"])
    assert sorted(train) == [f"train-{i:06d}" for i in range(3 * len(CLASS_NAMES))]
    assert len(test) == 2 * len(CLASS_NAMES)
    for split in (train, test):
        for key, fields in split.items():
            assert list(fields) == ["png", "txt", "cls", "json"], key
            img = Image.open(io.BytesIO(fields["png"]))
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (16, 16)
            meta = json.loads(fields["json"])
            assert meta["label"] == int(fields["cls"]) and meta["class_name"] == CLASS_NAMES[meta["label"]]
    labels = [int(f["cls"]) for f in train.values()]
    assert all(labels.count(c) == 3 for c in range(len(CLASS_NAMES)))
    assert summary["counts"][CLASS_NAMES[0]] == {"train": 3, "test": 2}


def test_equal_arguments_give_identical_bytes(built, photo_dir, tmp_path):
    out, _ = built
    write_photo_dataset(tmp_path / "again", photo_dirs=[photo_dir], **TINY)
    assert all_files(tmp_path / "again") == all_files(out)
    write_photo_dataset(tmp_path / "seed1", photo_dirs=[photo_dir], **{**TINY, "seed": 1})
    assert all_files(tmp_path / "seed1")["train/photos-train-000000.tar"] != all_files(out)["train/photos-train-000000.tar"]


def test_test_crops_never_touch_training_regions(built):
    out, summary = built
    record = json.loads((out / "photos.json").read_text(encoding="utf-8"))
    regions = {}
    for p, photo in zip(record["photos"], PHOTOS):
        assert p["sha256"] == photo.sha256 and p["file"].endswith(photo.file)
        tr, te = p["train_region"], p["test_region"]
        assert tr[2] < te[0] and tr[0] == 0 and te[2] == p["size"][0]  # a gap between them
        regions[p["label"]] = (tr, te)

    def inside(box, region):
        return region[0] <= box[0] < box[2] <= region[2] and region[1] <= box[1] < box[3] <= region[3]

    def intersects(box, region):
        return box[0] < region[2] and region[0] < box[2] and box[1] < region[3] and region[1] < box[3]

    for split, own in (("train", 0), ("test", 1)):
        for fields in samples(summary["splits"][split]["shards"]).values():
            meta = json.loads(fields["json"])
            box, (tr, te) = meta["attrs"]["box"], regions[meta["label"]]
            assert inside(box, (tr, te)[own]), (split, box)
            assert not intersects(box, (te, tr)[own]), (split, box)


def test_captions_vary_within_a_class(built):
    _, summary = built
    by_class: dict[int, set[str]] = {}
    for fields in samples(summary["splits"]["train"]["shards"]).values():
        caption = fields["txt"].decode("utf-8")
        assert caption and caption == caption.strip()
        by_class.setdefault(int(fields["cls"]), set()).add(caption)
    assert all(len(c) >= 2 for c in by_class.values()), by_class  # not one caption per class
    assert len(set.union(*by_class.values())) >= 2.5 * len(CLASS_NAMES)


def test_missing_or_altered_photograph_is_one_user_error(photo_dir, tmp_path):
    broken = tmp_path / "broken"
    for photo in PHOTOS:
        (broken / photo.file).parent.mkdir(parents=True, exist_ok=True)
        (broken / photo.file).symlink_to(photo_dir / photo.file)
    victim = PHOTOS[3]
    (broken / victim.file).unlink()
    with pytest.raises(UserError, match=f"{victim.file} .*not found.*make photos"):
        write_photo_dataset(tmp_path / "o1", photo_dirs=[broken], **TINY)
    data = bytearray((photo_dir / victim.file).read_bytes())
    data[-3] ^= 0xFF
    (broken / victim.file).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{victim.file} has SHA-256 .*not the pinned.*make photos"):
        write_photo_dataset(tmp_path / "o2", photo_dirs=[broken], **TINY)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_pixel_limit(photo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(photos_mod, "MAX_PHOTO_PIXELS", 1000)
    with pytest.raises(UserError, match="over the limit"):
        write_photo_dataset(tmp_path / "o", photo_dirs=[photo_dir], **TINY)


def test_cli_writes_shards_that_load(photo_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "bench"
    result = runner.invoke(app, ["photo-data", str(out), "--train-per-class", "2", "--test-per-class", "1",
                                 "--image-size", "16", "--shard-size", "10", "--photos", str(photo_dir)])
    assert result.exit_code == 0, result.output
    assert f"{CLASS_NAMES[0]}: 2 train, 1 test" in result.output
    assert f"wrote {2 * len(CLASS_NAMES)} train and {len(CLASS_NAMES)} test samples" in result.output
    train = load_shards([str(out / "train" / "*.tar")])
    test = load_shards([str(out / "test" / "*.tar")])
    assert len(train.labels) == 2 * len(CLASS_NAMES) and len(test.labels) == len(CLASS_NAMES)
    assert sorted(set(train.labels.tolist())) == list(range(len(CLASS_NAMES)))
    assert tuple(train.images.shape[1:]) == (3, 16, 16) and all(train.captions)

    result = runner.invoke(app, ["photo-data", str(tmp_path / "none"), "--photos", str(tmp_path / "empty")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "make photos" in errors[0], result.output
    assert "Traceback" not in result.output


def test_the_protocol_runs_on_the_photographs_in_small(built, tmp_path):
    """The photo benchmark and every default hacker architecture, in small: one epoch each on
    the tiny build, protected with `random`; every row gets its role and the report its headline."""
    from uge_protect.eval.config import DEFAULT_ARCHS
    from uge_protect.eval.runner import EvalConfig, run_evaluation
    from uge_protect.pipeline import ShardJobConfig, run_shard_job
    from uge_protect.methods.registry import create_method

    out, _ = built
    run_shard_job(ShardJobConfig(inputs=[str(out / "train" / "*.tar")], output=str(tmp_path / "prot"),
                                 num_workers=0, encode_threads=0, quiet=True), create_method("random"))
    report = run_evaluation(EvalConfig(protected=str(tmp_path / "prot"), clean_train=[str(out / "train" / "*.tar")],
                                       test=[str(out / "test" / "*.tar")], output=str(tmp_path / "report"),
                                       archs=list(DEFAULT_ARCHS), epochs=1, batch_size=16, quiet=True,
                                       figures=False))
    rows = report["tasks"]["classify"]["summary"]
    assert [r["arch"] for r in rows] == list(DEFAULT_ARCHS) and len(DEFAULT_ARCHS) >= 6
    assert {"mlp", "vit_tiny", "resnet_cifar", "vgg11", "small_cnn"} <= set(DEFAULT_ARCHS)
    assert {r["role"] for r in rows} == {"held out"}  # random noise is fitted against nothing
    assert report["data"]["num_classes"] == len(CLASS_NAMES)
    assert "basis" in report["headline"]["classify"]
