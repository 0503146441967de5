"""Progress reporting: a bar for people (samples/s, shards, failures) and events for machines.

Events go through :func:`uge_protect.logs.event`, so ``--log-json`` records them with every
other log record of the run (see :mod:`uge_protect.logs`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from uge_protect.logs import event

log = logging.getLogger(__name__)


class Progress:
    """Tracks samples, shards and failures of one process; renders a bar and logs events."""

    def __init__(self, total_shards: int, *, show: bool, rank: int = 0):
        self.total_shards = total_shards
        self.shards_done = 0
        self.samples = 0
        self.failed = 0
        self.started = time.perf_counter()
        self._bar = tqdm(unit="img", desc="protect", dynamic_ncols=True, file=sys.stderr) if show else None
        self.rank = rank
        self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"shards {self.shards_done}/{self.total_shards}, failed {self.failed}", refresh=False
            )

    def samples_done(self, written: int, failed: int) -> None:
        self.samples += written + failed
        self.failed += failed
        if self._bar is not None:
            self._bar.update(written + failed)
        self._refresh()

    def shard_done(self, stats: dict[str, Any]) -> None:
        self.shards_done += 1
        self._refresh()
        self.event("shard_done", **{k: stats[k] for k in ("shard", "samples", "written", "failed", "failures", "seconds")})

    def event(self, name: str, **data: Any) -> None:
        """Log event ``name`` (for machines only) with this process's rank, the seconds since
        it started (``elapsed``) and ``data``."""
        event(log, name, rank=self.rank, elapsed=round(time.perf_counter() - self.started, 3), **data)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
