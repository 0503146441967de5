"""Where a run's time goes: seconds per pipeline stage, summed over the threads and processes
that ran it (``protection.json`` → ``timings.stages``).

Stages, in the order a sample meets them:

* ``read``: the tar members of an input shard (reader processes; with ``--workers 0`` the
  main process);
* ``decode``: image bytes to RGB pixels (reader processes);
* ``hash``: SHA-256 of the input image, of each encoded image and of each output shard;
* ``send``: copying a batch's pixels into shared memory for the main process (readers);
* ``wait_readers``: the main process waiting for the next batch (handing it over included);
* ``method``: the method's pass and the budget (main process, on its device);
* ``encode``: protected pixels to image bytes (encoder threads);
* ``measure``: L∞ and PSNR against the original (encoder threads);
* ``wait_encoders``: the main process waiting for an encoded batch;
* ``write``: the output tar (main process);
* ``manifest``: each shard's manifest and stats, synced to disk (main process).

Each stage has two figures: ``wall_s``, the wall-clock seconds inside it in the thread that ran
it (stages that ran side by side add up to more than the run's wall clock, and a thread that
waits for a core or for the GIL counts that wait), and ``cpu_s``, the CPU seconds that thread
spent in it (for the two waits, the CPU spent handing batches over).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

#: Every stage, in pipeline order (the order reports list them).
STAGES = ("read", "decode", "hash", "send", "wait_readers", "method", "encode", "measure", "wait_encoders",
          "write", "manifest")


class StageClock:
    """Wall-clock and CPU seconds per stage, accumulated by :meth:`timed` blocks and taken out
    with :meth:`take` as ``{stage: [wall, cpu]}``.

    One clock per thread (CPU seconds are the thread's own): the encoder threads keep their
    own and hand them back with their results.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count the time spent in the block to ``stage``."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - wall, time.thread_time() - cpu)

    def add(self, stage: str, wall: float, cpu: float = 0.0) -> None:
        total = self.seconds.setdefault(stage, [0.0, 0.0])
        total[0] += wall
        total[1] += cpu

    def merge(self, other: Mapping[str, Sequence[float]]) -> None:
        """Add another clock's seconds (a batch's, a thread's, a rank's)."""
        for stage, (wall, cpu) in other.items():
            self.add(stage, wall, cpu)

    def take(self) -> dict[str, list[float]]:
        """The seconds counted so far, and start again from zero."""
        out, self.seconds = self.seconds, {}
        return out

    def timed_iter(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """``items``, with the time spent producing each one counted to ``stage``."""
        it = iter(items)
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                item = next(it)
            except StopIteration:
                self.add(stage, time.perf_counter() - wall, time.thread_time() - cpu)
                return
            self.add(stage, time.perf_counter() - wall, time.thread_time() - cpu)
            yield item


def stage_report(seconds: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """``{stage: {"wall_s": ..., "cpu_s": ...}}`` rounded to milliseconds, in pipeline order
    (unknown stages last)."""
    order = [s for s in STAGES if s in seconds] + sorted(set(seconds) - set(STAGES))
    return {s: {"wall_s": round(seconds[s][0], 3), "cpu_s": round(seconds[s][1], 3)} for s in order}
