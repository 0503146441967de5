"""Members that carry the picture without being an image file, and members too large to hold.

A sample's image is protected only when nothing else in the sample can give the picture back:
a compressed copy (webdataset un-gzips ``KEY.png.gz`` by default), an array, tensor or pickle
(its default decoders load them; a pickle runs code), a video. Such a sample fails and none of
its members is written. A sample whose members would exceed ``max_sample_bytes`` fails unread.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.helpers import png_bytes, random_image, write_shard
from tests.pipeline.test_bad_input import rows_of, run
from uge_protect.pipeline.source import batch_records
from uge_protect.pipeline.records import SampleRecord
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.members import DATA, IMAGE, MAX_PEELED_BYTES, OPAQUE, member_kind
from uge_protect.shards.tario import iter_tar_samples

PIXELS = random_image(np.random.default_rng(3), 12, 12)
PNG = png_bytes(PIXELS)


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, PIXELS)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, image=PIXELS)
    return buf.getvalue()


HIDDEN = {
    "orig.png.gz": (gzip.compress(PNG), "multiple_images"),
    "orig.bz2": (bz2.compress(PNG), "multiple_images"),
    "orig.xz": (lzma.compress(PNG), "multiple_images"),
    "two.bin": (gzip.compress(b"") + gzip.compress(PNG), "multiple_images"),  # a second gzip stream
    "layers.gz": (gzip.compress(bz2.compress(PNG)), "multiple_images"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><image href="data:image/png;base64,..."/></svg>',
            "multiple_images"),
    "orig.npy": (_npy(), "unprotectable_member"),
    "orig.npz": (_npz(), "unprotectable_member"),
    "orig.pyd": (pickle.dumps(PIXELS), "unprotectable_member"),
    "orig.pickle": (pickle.dumps(PIXELS), "unprotectable_member"),
    "orig.pth": (b"PK\x03\x04 a torch.save zip", "unprotectable_member"),
    "ten": (b"tenbin", "unprotectable_member"),
    "msgpack": (b"\x92\x01\x02", "unprotectable_member"),
    "mp4": (b"\x00\x00\x00\x18ftypmp42", "unprotectable_member"),
    "raw.bin": (b"\x93NUMPY\x01\x00v\x00{'descr': '|u1'}", "unprotectable_member"),
    "huge.gz": (gzip.compress(b"\0" * (MAX_PEELED_BYTES + 1)), "unprotectable_member"),
}


@pytest.mark.parametrize("ext", sorted(HIDDEN))
def test_hidden_copies_fail_the_sample_and_are_never_written(ext, tmp_path):
    data, reason = HIDDEN[ext]
    shard = write_shard(tmp_path / "in.tar", [
        ("hidden", {"png": PNG, ext: data, "txt": b"a caption"}),
        ("plain", {"png": PNG, "txt": b"a caption", "txt.gz": gzip.compress(b"a compressed caption")}),
    ])
    run([shard], tmp_path / "out")
    rows = {r["key"]: r for r in rows_of(tmp_path / "out", "in.tar")}
    assert rows["hidden"]["status"] == "failed" and rows["hidden"]["reason"].startswith(reason), rows["hidden"]
    assert rows["plain"]["status"] == "ok"  # compressed text is plain data: copied as it is
    with open(OutputLayout(tmp_path / "out").shard("in.tar"), "rb") as f:
        written = {s.key: s for s in iter_tar_samples(f)}
    assert set(written) == {"plain"} and "txt.gz" in written["plain"].fields


def test_member_kinds():
    assert member_kind("png", PNG) == IMAGE
    assert member_kind("txt", b"BZh is how this caption starts") == DATA  # a magic, but no bzip2
    assert member_kind("json", b'{"caption": "x"}') == DATA
    assert member_kind("cls.gz", gzip.compress(b"3")) == DATA
    assert member_kind("thumb.npy", _npy()) == OPAQUE
    assert member_kind("x.gz", gzip.compress(gzip.compress(gzip.compress(gzip.compress(PNG))))) == OPAQUE


def test_a_sample_over_the_byte_limit_fails_unread(tmp_path):
    shard = write_shard(tmp_path / "in.tar", [
        ("big", {"png": PNG, "txt": b"x" * 5000}),
        ("small", {"png": PNG, "txt": b"x" * 10}),
    ])
    run([shard], tmp_path / "out", max_sample_bytes=4000)
    rows = {r["key"]: r for r in rows_of(tmp_path / "out", "in.tar")}
    assert rows["big"]["status"] == "failed" and rows["big"]["reason"].startswith("sample_too_large")
    assert "--max-sample-bytes" in rows["big"]["reason"] and rows["big"]["sha256_original"] is None
    assert rows["small"]["status"] == "ok"


def test_a_compressed_tar_of_zeros_is_not_read_into_memory(tmp_path):
    """A gzip tar named .tar (tarfile un-gzips it): the member's declared size is checked
    before its bytes are read, so the reader never holds it."""
    path = tmp_path / "bomb.tar"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("k.txt")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
        info = tarfile.TarInfo("k.png")
        info.size = len(PNG)
        tar.addfile(info, io.BytesIO(PNG))
    assert path.stat().st_size < 100_000
    with open(path, "rb") as f:
        (sample,) = iter_tar_samples(f, max_sample_bytes=1 << 20)
    assert sample.fields["txt"] == b"" and sample.oversized == ["'k.txt' (8388608 bytes)"]
    run([path], tmp_path / "out", max_sample_bytes=1 << 20)
    (row,) = rows_of(tmp_path / "out", "bomb.tar")
    assert row["reason"].startswith("sample_too_large")
    stats = OutputLayout(tmp_path / "out").stats("bomb.tar").read_text()
    assert '"input": 2' in stats  # both members counted


def test_batches_close_at_the_byte_budget():
    recs = [SampleRecord(key=f"k{i}", index=i, fields={"txt": b"x" * 100}) for i in range(10)]
    batches = list(batch_records(iter(recs), "s.tar", batch_size=64, max_bytes=250))
    assert [len(b.records) for b in batches] == [2, 2, 2, 2, 2]


def test_animated_images_record_their_frames(tmp_path):
    frames = [Image.fromarray(random_image(np.random.default_rng(i), 10, 10)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    shard = write_shard(tmp_path / "in.tar", [("anim", {"gif": buf.getvalue()}), ("still", {"png": PNG})])
    run([shard], tmp_path / "out")
    rows = {r["key"]: r for r in rows_of(tmp_path / "out", "in.tar")}
    assert rows["anim"]["status"] == "ok" and rows["anim"]["source_frames"] == 3
    assert rows["still"]["source_frames"] is None


def test_fit_and_eval_loading_stops_on_an_unreadable_shard(tmp_path, monkeypatch):
    """Training on fewer shards than asked would go unnoticed: an I/O error is one error line."""
    from uge_protect.errors import UserError
    from uge_protect.shards import dataset

    shard = write_shard(tmp_path / "in.tar", [("k", {"png": PNG, "cls": b"1"})])

    class Failing(io.BytesIO):
        def read(self, *a):
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(dataset, "open_shard", lambda spec: Failing())
    with pytest.raises(UserError, match="cannot read shard .*in.tar: .*reset"):
        dataset.load_shards([str(shard)])
