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

A stage's seconds are wall-clock seconds inside it in the thread that ran it, so stages that
ran side by side add up to more than the run's wall clock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")

#: Every stage, in pipeline order (the order reports list them).
STAGES = ("read", "decode", "hash", "send", "wait_readers", "method", "encode", "measure", "wait_encoders",
          "write", "manifest")


class StageClock:
    """Seconds per stage, accumulated by :meth:`timed` blocks and taken out with :meth:`take`.

    One clock per thread: the encoder threads keep their own and hand them back with their
    results.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count the time spent in the block to ``stage``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: Mapping[str, float]) -> None:
        """Add another clock's seconds (a batch's, a thread's, a rank's)."""
        for stage, seconds in other.items():
            self.add(stage, seconds)

    def take(self) -> dict[str, float]:
        """The seconds counted so far, and start again from zero."""
        out, self.seconds = self.seconds, {}
        return out

    def timed_iter(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """``items``, with the time spent producing each one counted to ``stage``."""
        it = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.add(stage, time.perf_counter() - start)
                return
            self.add(stage, time.perf_counter() - start)
            yield item


def stage_report(seconds: Mapping[str, float]) -> dict[str, float]:
    """``seconds`` rounded to milliseconds, in pipeline order (unknown stages last)."""
    order = [s for s in STAGES if s in seconds] + sorted(set(seconds) - set(STAGES))
    return {s: round(seconds[s], 3) for s in order}
