"""Where a run's time goes (``timings.stages``), and how a batch travels from a reader
process to the main process: its pixels in one shared buffer, its image bytes left behind."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import threading
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

from tests.helpers import simple_samples, write_shard
from tests.pipeline.test_shard_run import output_bytes, run
from uge_protect.pipeline.lifecycle import HELPER_NICENESS, lower_priority
from uge_protect.pipeline.records import SampleRecord, ShardBatch
from uge_protect.pipeline.run import stacked_pixels
from uge_protect.pipeline.source import DecodeSettings, shard_batches
from uge_protect.pipeline.stages import STAGES, StageClock, stage_report

READING = {"read", "decode", "hash"}
MAIN = {"wait_readers", "method", "encode", "measure", "wait_encoders", "write", "manifest"}


def _settings() -> DecodeSettings:
    return DecodeSettings(max_pixels=1 << 24, image_size=None, resize_mode="none", caption_field=None,
                          label_field=None, requires_caption=False, requires_label=False)


def _through_a_pipe(batch: ShardBatch) -> ShardBatch:
    """What the main process receives from a DataLoader worker."""
    buf = io.BytesIO()
    ForkingPickler(buf, 4).dump(batch)
    return pickle.loads(buf.getvalue())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_records_the_seconds_of_every_stage(make_shards, tmp_path, workers):
    shards = make_shards(2, 6)
    run(shards, tmp_path / "out", batch_size=4, num_workers=workers, encode_threads=workers)
    stages = json.loads((tmp_path / "out" / "protection.json").read_text())["timings"]["stages"]
    assert READING | MAIN <= set(stages) <= set(STAGES)
    assert ("send" in stages) == (workers > 0)  # only a reader process sends its pixels
    assert all(set(v) == {"wall_s", "cpu_s"} and v["wall_s"] >= 0 and v["cpu_s"] >= 0 for v in stages.values())
    assert all(stages[s]["cpu_s"] > 0 for s in ("decode", "encode", "method"))


def test_a_batch_from_a_reader_carries_its_pixels_in_one_shared_buffer(tmp_path):
    samples = list(simple_samples("s", 5, seed=3, size=(12, 10)))
    samples[2][1]["png"] = b"not an image"  # fails to decode: no pixels
    shard = write_shard(tmp_path / "s.tar", samples)
    (batch,) = list(shard_batches(str(shard), _settings(), batch_size=8))
    originals = [None if r.pixels is None else r.pixels.clone() for r in batch.records]
    got = _through_a_pipe(batch)
    assert [r.key for r in got.records] == [r.key for r in batch.records]
    assert [r.reason for r in got.records] == [r.reason for r in batch.records]
    assert got.records[2].pixels is None and got.records[2].reason.startswith("undecodable_image")
    with_pixels = [r for r in got.records if r.pixels is not None]
    assert len(with_pixels) == 4
    assert len({r.pixels.untyped_storage().data_ptr() for r in with_pixels}) == 1
    assert all(r.pixels.is_shared() for r in with_pixels)
    for rec, original in zip(got.records, originals):
        if original is not None:
            assert torch.equal(rec.pixels, original)
    assert min(got.stage_seconds["send"]) >= 0 and set(batch.stage_seconds) <= set(got.stage_seconds)
    assert batch.records[0].pixels is not None  # pickling left the reader's batch as it was


def test_decoded_records_travel_without_their_image_bytes(tmp_path):
    samples = list(simple_samples("s", 3, seed=1))
    samples[1][1]["png"] = b"broken"
    shard = write_shard(tmp_path / "s.tar", samples)
    (batch,) = list(shard_batches(str(shard), _settings(), batch_size=8))
    ok, failed = batch.records[0], batch.records[1]
    assert ok.ok and ok.fields[ok.image_field] == b"" and ok.fields["txt"] == samples[0][1]["txt"]
    assert ok.sha256_original is not None and ok.pixels is not None
    assert not failed.ok and set(failed.fields) == set(samples[1][1])
    assert all(v == b"" for v in failed.fields.values())
    assert set(batch.stage_seconds) >= READING


def test_output_is_the_same_with_and_without_reader_processes(make_shards, tmp_path):
    shards = make_shards(3, 7, size=(20, 16))
    run(shards, tmp_path / "a", batch_size=3, num_workers=0, encode_threads=0)
    run(shards, tmp_path / "b", batch_size=3, num_workers=2, encode_threads=2)
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")


def test_stacked_pixels_is_a_view_of_back_to_back_images_and_a_copy_otherwise():
    images = [torch.from_numpy(np.full((3, 2, 3), i, np.uint8)) for i in range(4)]
    got = _through_a_pipe(ShardBatch("s", "s", [SampleRecord(key=str(i), index=i, pixels=p)
                                                for i, p in enumerate(images)], last=True))
    pixels = [r.pixels for r in got.records]
    view = stacked_pixels(pixels)
    assert view.shape == (4, 3, 2, 3) and view.untyped_storage().data_ptr() == pixels[0].untyped_storage().data_ptr()
    assert all(torch.equal(view[i], images[i]) for i in range(4))
    gap = stacked_pixels([pixels[0], pixels[2]])  # not back to back: a copy
    assert gap.untyped_storage().data_ptr() != pixels[0].untyped_storage().data_ptr()
    assert torch.equal(gap[1], images[2])
    copy = stacked_pixels(images)  # separate arrays
    assert all(torch.equal(copy[i], images[i]) for i in range(4))


def test_stage_clock_counts_blocks_and_iterations_and_starts_again_after_take():
    clock = StageClock()
    with clock.timed("decode"):
        time.sleep(0.01)

    def slow():
        for i in range(3):
            time.sleep(0.005)
            yield i

    assert list(clock.timed_iter(slow(), "read")) == [0, 1, 2]
    with clock.timed("encode"):
        sum(i * i for i in range(200_000))  # CPU work
    clock.merge({"decode": [1.0, 0.5], "extra": [2.0, 0.0]})
    seconds = clock.take()
    assert seconds["decode"][0] >= 1.01 and seconds["decode"][1] >= 0.5 and seconds["extra"] == [2.0, 0.0]
    assert seconds["read"][0] >= 0.015 and seconds["read"][1] < seconds["read"][0]  # sleeping takes no CPU
    assert seconds["encode"][1] > 0
    assert clock.take() == {}
    report = stage_report({"write": [1.0, 0.5], "zzz": [0.5, 0.25], "read": [0.25, 0.0004]})
    assert list(report) == ["read", "write", "zzz"] and report["read"] == {"wall_s": 0.25, "cpu_s": 0.0}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_helpers_run_at_a_lower_priority_than_the_main_thread():
    """Reader processes and encoder threads must not hold the one serial stage back."""
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def helper() -> None:
        lower_priority()
        seen["helper"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert seen["helper"] == min(19, main + HELPER_NICENESS) > main or main == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # the caller's thread only


def test_no_warning_when_more_readers_than_cpus_are_asked_for(make_shards, tmp_path, monkeypatch, recwarn):
    """``--workers 2`` on a one-CPU container is the user's choice, not a warning per run."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    run(make_shards(2, 3), tmp_path / "out", num_workers=2)
    assert not [w for w in recwarn if "DataLoader will create" in str(w.message)]
