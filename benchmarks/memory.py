"""Peak memory (PSS) of `uge-protect shard`: for N and 8×N shards of the same size, and for
a shard of a few large images.

Memory must not grow with the number of shards (nothing accumulates across shards), and
must stay bounded by the pixel budget per batch (``--max-batch-pixels``) whatever the image
sizes: the large case (by default 4 solid-colour 36-Mpx PNGs, a shard of a few hundred KB)
runs with the default budget and with an unlimited one (all images in one batch). The
peak proportional set size (PSS: shared pages split between the processes that map them,
so forked DataLoader workers are not counted twice) of the whole process tree is sampled
every 50 ms with psutil, from the start until the last shard's completion marker is written.
Interpreter teardown is left out: while DataLoader workers exit, their shared pages are
re-attributed to the main process and the sum briefly double-counts.

    .venv/bin/python benchmarks/memory.py [--shards 2] [--per-shard 1000] [--size 128]
        [--only shards|large] [--large-images 4] [--large-mpx 36]
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_jpeg_shards, workdir  # noqa: E402

from uge_protect.shards.tario import write_tar_atomic  # noqa: E402


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


def shard_cmd(shards: list[Path], out: Path, workers: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uge_protect", "shard", *map(str, shards), "-o", str(out),
            "-m", "random", "--quiet", "--workers", str(workers), *extra]


def many_shards_case(base: Path, args: argparse.Namespace) -> None:
    """Peak PSS for N and 8×N shards of small images: must not grow with the shard count."""
    many = args.shards * 8
    shards = make_jpeg_shards(base / "in", n_images=many * args.per_shard, per_shard=args.per_shard, size=args.size)
    results = {}
    for n in (args.shards, many):
        out = base / f"out{n}"
        results[n] = peak_pss(shard_cmd(shards[:n], out, args.workers), out / "stats", n)
        shutil.rmtree(out)
        print(f"{n:3d} shards × {args.per_shard} images {args.size}px: peak PSS {results[n][0] / 2**20:7.1f} MiB "
              f"({results[n][1]:.1f} s)")
    ratio = results[many][0] / results[args.shards][0]
    print(f"peak PSS ratio {many} vs {args.shards} shards: {ratio:.3f} (target <= 1.1)")


def large_images_case(base: Path, args: argparse.Namespace) -> None:
    """Peak PSS for one small shard of large solid-colour PNGs, with the default pixel budget
    per batch and with none (every image in one batch)."""
    side = math.isqrt(int(args.large_mpx * 1_000_000))
    members = []
    for i in range(args.large_images):
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (40 * i % 256, 90, 160)).save(buf, format="PNG", compress_level=9)
        members += [(f"{i:08d}.png", buf.getvalue()), (f"{i:08d}.txt", f"large {i}".encode())]
    shard = base / "large" / "large-000000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    write_tar_atomic(shard, members)
    mpx = side * side / 1e6
    print(f"{args.large_images} images {side}×{side} ({mpx:.1f} Mpx) in a {shard.stat().st_size / 1e3:.0f} KB shard")
    for label, extra in (("default budget (64 Mpx/batch)", ()),
                         ("no budget (one batch)", ("--max-batch-pixels", str(10**12)))):
        out = base / "large-out"
        peak, seconds = peak_pss(shard_cmd([shard], out, args.workers, "--max-pixels", str(side * side), *extra),
                                 out / "stats", 1)
        shutil.rmtree(out)
        print(f"  {label:32s}: peak PSS {peak / 2**20:7.1f} MiB ({seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("shards", "large"), help="Run one case only.")
    parser.add_argument("--large-images", type=int, default=4)
    parser.add_argument("--large-mpx", type=float, default=36.0)
    args = parser.parse_args()
    base = workdir("memory")
    try:
        if args.only in (None, "shards"):
            many_shards_case(base, args)
        if args.only in (None, "large"):
            large_images_case(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
