"""Tar reading (grouping into samples, damage detection) and reproducible writing."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from uge_protect.shards.tario import (
    TAR_MTIME,
    RawSample,
    ReproducibleTarWriter,
    TarReadError,
    iter_tar_samples,
    split_member_name,
    write_tar_atomic,
)


def tar_bytes(members: list[tuple[str, bytes]], *, dirs: tuple[str, ...] = ()) -> bytes:
    """A tar written by the standard library (not by the code under test)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members_of(n: int) -> list[tuple[str, bytes]]:
    """n samples s0..s{n-1}, each with a 600-byte 'png' (two data blocks), txt and cls."""
    out = []
    for i in range(n):
        out += [(f"s{i}.png", bytes([i]) * 600), (f"s{i}.txt", f"caption {i}".encode()), (f"s{i}.cls", b"%d" % i)]
    return out


def offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """member name → (header offset, data offset)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def read_all(data: bytes) -> tuple[list[RawSample], TarReadError | None]:
    samples: list[RawSample] = []
    try:
        for s in iter_tar_samples(io.BytesIO(data)):
            samples.append(s)
    except TarReadError as exc:
        return samples, exc
    return samples, None


# --- split_member_name -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000001.jpg", ("000001", "jpg")),
        ("a/b/000001.jpg", ("a/b/000001", "jpg")),
        ("x.seg.png", ("x", "seg.png")),
        ("dir.v1/x.png", ("dir.v1/x", "png")),  # dots in directories do not split
        ("README", ("README", "")),
        ("dir/noext", ("dir/noext", "")),
        ("x.", ("x", "")),
        (".png", ("", "png")),
        ("/abs/x.png", ("/abs/x", "png")),
        ("../evil.txt", ("../evil", "txt")),
        ("日本/写真.jpg", ("日本/写真", "jpg")),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


# --- grouping ----------------------------------------------------------------------------


def test_consecutive_members_group_into_samples_in_order():
    samples, err = read_all(tar_bytes(members_of(3)))
    assert err is None
    assert [s.key for s in samples] == ["s0", "s1", "s2"]
    assert all(s.error is None for s in samples)
    assert list(samples[1].fields) == ["png", "txt", "cls"]  # member order kept
    assert samples[1].fields == {"png": b"\x01" * 600, "txt": b"caption 1", "cls": b"1"}


def test_directories_are_skipped_and_paths_kept_in_keys():
    data = tar_bytes([("d/a.jpg", b"A"), ("d/a.json", b"{}"), ("d/b.jpg", b"B")], dirs=("d",))
    samples, err = read_all(data)
    assert err is None
    assert [(s.key, list(s.fields)) for s in samples] == [("d/a", ["jpg", "json"]), ("d/b", ["jpg"])]


def test_a_repeated_key_is_a_new_sample():
    # interleaved: a, b, a again → three samples, the caller decides about the duplicate
    samples, _ = read_all(tar_bytes([("a.png", b"1"), ("b.png", b"2"), ("a.png", b"3"), ("a.txt", b"t")]))
    assert [(s.key, s.fields) for s in samples] == [
        ("a", {"png": b"1"}), ("b", {"png": b"2"}), ("a", {"png": b"3", "txt": b"t"}),
    ]
    # consecutive: the same extension twice starts a new sample with the same key
    samples, _ = read_all(tar_bytes([("a.png", b"1"), ("a.txt", b"x"), ("a.png", b"2")]))
    assert [(s.key, s.fields) for s in samples] == [("a", {"png": b"1", "txt": b"x"}), ("a", {"png": b"2"})]


def test_empty_members_and_empty_archive():
    samples, err = read_all(tar_bytes([("a.png", b""), ("a.txt", b"")]))
    assert err is None and samples[0].fields == {"png": b"", "txt": b""}
    samples, err = read_all(tar_bytes([]))
    assert (samples, err) == ([], None)


def test_gzip_compressed_tar_is_read():
    samples, err = read_all(gzip.compress(tar_bytes(members_of(2)), mtime=0))
    assert err is None and [s.key for s in samples] == ["s0", "s1"]


# --- damage ------------------------------------------------------------------------------


def test_truncated_inside_member_data():
    data = tar_bytes(members_of(4))
    _, data_at = offsets(data)["s2.png"]
    samples, err = read_all(data[: data_at + 100])
    assert isinstance(err, TarReadError)
    assert [s.key for s in samples] == ["s0", "s1", "s2"]
    assert samples[0].error is None and samples[1].error is None  # complete: delivered intact
    assert samples[1].fields["cls"] == b"1"
    damaged = samples[2]
    assert damaged.error.startswith("corrupt_tar:") and "s2.png" in damaged.error
    assert damaged.fields == {}  # the cut member is not delivered


def test_truncated_inside_the_last_member_of_a_sample():
    data = tar_bytes(members_of(3))
    _, data_at = offsets(data)["s1.txt"]
    samples, err = read_all(data[: data_at + 3])
    assert err is not None
    assert [(s.key, s.error is None) for s in samples] == [("s0", True), ("s1", False)]
    assert list(samples[1].fields) == ["png"]


@pytest.mark.parametrize("where", ["inside-header", "at-header", "after-last-data"])
def test_truncated_between_members_is_not_a_silent_end(where):
    data = tar_bytes(members_of(4))
    header_at, _ = offsets(data)["s2.png"]
    cut = {
        "inside-header": header_at + 100,
        "at-header": header_at,  # whole members, but no end-of-archive marker
        "after-last-data": offsets(data)["s3.cls"][1] + 512,
    }[where]
    samples, err = read_all(data[:cut])
    assert isinstance(err, TarReadError)
    # the sample being assembled might be incomplete: it is flagged, earlier ones are intact
    assert all(s.error is None for s in samples[:-1])
    assert samples[-1].error.startswith("corrupt_tar:")
    expected = ["s0", "s1"] if where != "after-last-data" else ["s0", "s1", "s2", "s3"]
    assert [s.key for s in samples] == expected


def test_cut_in_the_final_zero_padding_is_fine():
    data = tar_bytes(members_of(2))
    end = offsets(data)["s1.cls"][1] + 512  # after the last member's (padded) data
    samples, err = read_all(data[: end + 512])  # only the first end-of-archive block is left
    assert err is None and [s.key for s in samples] == ["s0", "s1"]


@pytest.mark.parametrize("fill", [b"\xab", b"\x00"], ids=["garbage-header", "zeroed-header"])
def test_damaged_header_in_the_middle(fill):
    data = bytearray(tar_bytes(members_of(5)))
    header_at, _ = offsets(bytes(data))["s3.png"]
    data[header_at : header_at + 512] = fill * 512
    samples, err = read_all(bytes(data))
    assert isinstance(err, TarReadError)
    assert [s.key for s in samples] == ["s0", "s1", "s2"]
    assert [s.error is None for s in samples] == [True, True, False]
    assert samples[2].error.startswith("corrupt_tar:")


def test_garbage_after_the_end_of_archive_marker():
    data = tar_bytes(members_of(2)) + tar_bytes([("x.png", b"hidden")])  # concatenated tars
    samples, err = read_all(data)
    assert err is not None and "end-of-archive" in str(err)
    assert samples[-1].error.startswith("corrupt_tar:")


@pytest.mark.parametrize(
    "data, message",
    [(b"", "empty"), (b"\x00" * 3, "truncated"), (b"this is not a tar file" * 40, "invalid")],
    ids=["zero-bytes", "three-bytes", "not-a-tar"],
)
def test_not_a_tar_at_all(data, message):
    samples, err = read_all(data)
    assert samples == [] and isinstance(err, TarReadError) and message in str(err)


def test_truncated_gzip_tar():
    gz = gzip.compress(tar_bytes(members_of(6)), mtime=0)
    samples, err = read_all(gz[: len(gz) // 2])
    assert isinstance(err, TarReadError)
    assert all(s.error is None for s in samples[:-1]) and samples[-1].error.startswith("corrupt_tar:")


def test_corrupt_member_data_is_not_a_tar_error():
    data = bytearray(tar_bytes(members_of(3)))
    _, data_at = offsets(bytes(data))["s1.png"]
    data[data_at : data_at + 50] = b"\xab" * 50  # the image bytes are damaged, the tar is fine
    samples, err = read_all(bytes(data))
    assert err is None and [s.key for s in samples] == ["s0", "s1", "s2"]
    assert samples[1].fields["png"][:50] == b"\xab" * 50


# --- writing -----------------------------------------------------------------------------


def write(members) -> bytes:
    buf = io.BytesIO()
    writer = ReproducibleTarWriter(buf)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    return buf.getvalue()


MEMBERS = [
    ("k1.png", b"\x89PNG" + bytes(range(256)) * 3),
    ("k1.txt", "légende — 日本語".encode("utf-8")),
    ("deep/" + "n" * 120 + ".json", b"{}"),  # longer than the 100-byte ustar name field
    ("k2.cls", b""),
]


def test_writer_bytes_are_reproducible_and_round_trip(tmp_path):
    first = write(MEMBERS)
    assert write(MEMBERS) == first
    assert len(first) % 512 == 0
    path = tmp_path / "x.tar"
    write_tar_atomic(path, MEMBERS)
    assert path.read_bytes() == first
    samples, err = read_all(first)
    assert err is None
    assert [(s.key, s.fields) for s in samples] == [
        ("k1", {"png": MEMBERS[0][1], "txt": MEMBERS[1][1]}),
        ("deep/" + "n" * 120, {"json": b"{}"}),
        ("k2", {"cls": b""}),
    ]


def test_writer_headers_carry_no_local_metadata():
    with tarfile.open(fileobj=io.BytesIO(write(MEMBERS))) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [n for n, _ in MEMBERS]
    for info in infos:
        assert info.isfile()
        assert (info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname) == (TAR_MTIME, 0o644, 0, 0, "", "")


def test_writer_output_does_not_depend_on_the_clock_or_user(monkeypatch):
    first = write(MEMBERS)
    monkeypatch.setattr("time.time", lambda: 2_000_000_000.0)
    assert write(MEMBERS) == first


def test_empty_archive_is_valid():
    data = write([])
    assert read_all(data) == ([], None)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_write_tar_atomic_leaves_nothing_on_failure(tmp_path):
    def members():
        yield "a.txt", b"x"
        raise RuntimeError("source failed")

    path = tmp_path / "out.tar"
    with pytest.raises(RuntimeError):
        write_tar_atomic(path, members())
    assert list(tmp_path.iterdir()) == []
    # an existing complete file is not replaced by a failed write
    write_tar_atomic(path, [("a.txt", b"old")])
    with pytest.raises(RuntimeError):
        write_tar_atomic(path, members())
    assert [p.name for p in tmp_path.iterdir()] == ["out.tar"]
    assert read_all(path.read_bytes())[0][0].fields == {"txt": b"old"}
