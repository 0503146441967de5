"""Progress reporting: a bar for people (samples/s, shards, failures) and JSON lines for machines."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm


class Progress:
    """Tracks samples, shards and failures of one process; renders a bar and/or JSON lines."""

    def __init__(self, total_shards: int, *, show: bool, log_path: str | None, rank: int = 0):
        self.total_shards = total_shards
        self.shards_done = 0
        self.samples = 0
        self.failed = 0
        self.started = time.perf_counter()
        self._bar = tqdm(unit="img", desc="protect", dynamic_ncols=True, file=sys.stderr) if show else None
        self._log: TextIO | None = None
        if log_path:
            path = log_path if rank == 0 else f"{log_path}.rank{rank}"
            self._log = open(path, "a", encoding="utf-8")
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
        """Append one JSON line ``{"event": name, "rank": r, "time": t, ...}`` to the log."""
        if self._log is not None:
            record = {"event": name, "rank": self.rank, "elapsed": round(time.perf_counter() - self.started, 3), **data}
            self._log.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._log.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._log is not None:
            self._log.close()
