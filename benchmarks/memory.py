"""Peak memory (PSS) of `uge-protect shard` for N and 8×N shards of the same size.

Memory must not grow with the number of shards (nothing accumulates across shards). The
peak proportional set size (PSS: shared pages split between the processes that map them,
so forked DataLoader workers are not counted twice) of the whole process tree is sampled
every 50 ms with psutil, from the start until the last shard's completion marker is written.
Interpreter teardown is left out: while DataLoader workers exit, their shared pages are
re-attributed to the main process and the sum briefly double-counts.

    .venv/bin/python benchmarks/memory.py [--shards 2] [--per-shard 1000] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_jpeg_shards, workdir  # noqa: E402


def peak_pss(cmd: list[str], stats_dir: Path, n_shards: int) -> tuple[int, float]:
    """Run ``cmd``; return (peak PSS of its process tree in bytes while shards are being
    written, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        if stats_dir.is_dir() and len(list(stats_dir.glob("*.json"))) >= n_shards:
            break
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    base = workdir("memory")
    try:
        many = args.shards * 8
        shards = make_jpeg_shards(base / "in", n_images=many * args.per_shard, per_shard=args.per_shard, size=args.size)
        results = {}
        for n in (args.shards, many):
            out = base / f"out{n}"
            cmd = [sys.executable, "-m", "uge_protect", "shard", *map(str, shards[:n]), "-o", str(out),
                   "-m", "random", "--quiet", "--workers", str(args.workers)]
            results[n] = peak_pss(cmd, out / "stats", n)
            shutil.rmtree(out)
            print(f"{n:3d} shards × {args.per_shard} images {args.size}px: peak PSS {results[n][0] / 2**20:7.1f} MiB "
                  f"({results[n][1]:.1f} s)")
        ratio = results[many][0] / results[args.shards][0]
        print(f"peak PSS ratio {many} vs {args.shards} shards: {ratio:.3f} (target <= 1.1)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
