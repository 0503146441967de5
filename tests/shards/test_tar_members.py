"""Tar members that are no regular files (links, directories, devices, FIFOs) are counted, not
lost: the reader counts them by kind, each shard's stats and ``protection.json`` record them,
and the accounting input = written + failed + skipped members adds up (``inspect`` checks it)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from tests.helpers import png_bytes, random_image
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.tario import MemberCounts, iter_tar_samples
from uge_protect.methods.registry import create_method

def special_tar(path: Path) -> Path:
    """A shard mixing files with every kind of non-file member; sample ``ghost`` consists only
    of a symlink, sample ``bad`` fails (undecodable image)."""
    rng = np.random.default_rng(0)
    # tar type flags are bytes too (b"5"): wrap them so they are not taken for content
    d, sym, lnk, fifo, chr_, blk = ((t,) for t in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                                   tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE))
    members: list[tuple[str, bytes | tuple[bytes]]] = [
        ("a.png", png_bytes(random_image(rng))), ("a.txt", b"first"),
        ("dir", d),
        ("ghost.png", sym),  # the whole sample is a link: it used to vanish
        ("b.png", png_bytes(random_image(rng))), ("b.txt", b"second"), ("b.json", lnk),
        ("bad.png", b"not an image"), ("bad.txt", b"third"),
        ("pipe", fifo), ("tty", chr_), ("disk", blk),
        ("c.png", png_bytes(random_image(rng))),
    ]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type = content[0]
                if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                    info.linkname = "a.png"
                tar.addfile(info)
    return path


EXPECTED_SKIPPED = {"block_device": 1, "character_device": 1, "directory": 1, "fifo": 1, "hardlink": 1, "symlink": 1}


def test_reader_counts_non_file_members_by_kind(tmp_path):
    path = special_tar(tmp_path / "special.tar")
    counts = MemberCounts()
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f, counts))
    assert [s.key for s in samples] == ["a", "b", "bad", "c"]
    assert dict(counts.skipped) == EXPECTED_SKIPPED
    assert counts.files == sum(len(s.fields) for s in samples) == 7
    with tarfile.open(path) as tar:
        assert counts.total == len(tar.getmembers()) == 13


def test_reader_without_counts_still_works(tmp_path):
    path = special_tar(tmp_path / "special.tar")
    with open(path, "rb") as f:
        assert [s.key for s in iter_tar_samples(f)] == ["a", "b", "bad", "c"]


def _run(tmp_path: Path) -> tuple[Path, Path]:
    shard = special_tar(tmp_path / "special.tar")
    out = tmp_path / "out"
    cfg = ShardJobConfig(inputs=[str(shard)], output=str(out), quiet=True, num_workers=0)
    run_shard_job(cfg, create_method("random"))
    return shard, out


def test_stats_and_protection_json_count_skipped_members_and_the_accounting_adds_up(tmp_path):
    _, out = _run(tmp_path)
    layout = OutputLayout(out)
    stats = json.loads(layout.stats("special.tar").read_text())
    assert stats["skipped_members"] == EXPECTED_SKIPPED
    members = stats["members"]
    # a (2) + b (2) + c (1) written, bad (2) failed, 6 skipped: all 13 members of the tar
    assert members == {"input": 13, "written": 5, "failed": 2, "skipped": 6}
    assert members["input"] == members["written"] + members["failed"] + members["skipped"]
    summary = json.loads(layout.protection_file.read_text())
    assert summary["counts"]["skipped_members"] == 6
    assert summary["skipped_members"] == EXPECTED_SKIPPED
    assert summary["members"] == members
    report = inspect_output(out)
    assert report["problems"] == [] and report["sources_checked"] == 1
    assert report["counts"]["skipped_members"] == 6 and report["skipped_members"] == EXPECTED_SKIPPED


def test_worker_processes_carry_the_counts_too(tmp_path):
    shard = special_tar(tmp_path / "special.tar")
    out = tmp_path / "out"
    cfg = ShardJobConfig(inputs=[str(shard)], output=str(out), quiet=True, num_workers=1, batch_size=2)
    run_shard_job(cfg, create_method("random"))
    stats = json.loads(OutputLayout(out).stats("special.tar").read_text())
    assert stats["skipped_members"] == EXPECTED_SKIPPED and stats["members"]["input"] == 13


def _edit_stats(out: Path, **changes) -> None:
    path = OutputLayout(out).stats("special.tar")
    stats = json.loads(path.read_text())
    stats.update(changes)
    path.write_text(json.dumps(stats))


def test_inspect_checks_skipped_members_against_the_source(tmp_path):
    _, out = _run(tmp_path)
    # hide the links: stats and protection.json agree with each other, the source does not
    _edit_stats(out, skipped_members={}, members={"input": 7, "written": 5, "failed": 2, "skipped": 0})
    protection = OutputLayout(out).protection_file
    summary = json.loads(protection.read_text())
    summary["counts"]["skipped_members"] = 0
    protection.write_text(json.dumps(summary))
    problems = inspect_output(out)["problems"]
    assert any("non-file members" in p for p in problems), problems
    assert any("the source has 13 members" in p for p in problems), problems
    assert inspect_output(out, check_sources=False)["problems"] == []  # self-consistent without the source


def test_inspect_checks_the_member_identity_in_the_stats(tmp_path):
    _, out = _run(tmp_path)
    _edit_stats(out, members={"input": 14, "written": 5, "failed": 2, "skipped": 6})
    problems = inspect_output(out, check_sources=False)["problems"]
    assert any("member counts do not add up" in p for p in problems), problems


def test_inspect_flags_non_file_members_in_an_output_shard(tmp_path):
    _, out = _run(tmp_path)
    layout = OutputLayout(out)
    path = layout.shard("special.tar")
    with tarfile.open(path, "a") as tar:  # a symlink appended to a published shard
        info = tarfile.TarInfo("c.evil")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    problems = inspect_output(out)["problems"]
    assert any("members that are no files" in p and "symlink" in p for p in problems), problems
