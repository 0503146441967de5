"""Throughput of `shard --method random` against the benchmark-only pass-through.

Both run the same stages (read → decode → batch → protect → encode → write) in the same
process, back to back, on the same shards; the ratio says what the perturbation costs next
to I/O. Then the same job with 1 and 2 processes (Accelerate, CPU, gloo), each process
limited to one core's worth of work (--workers 0 --encode-threads 0: read, decode, protect and
encode all in the process's main thread), to measure scaling.

    .venv/bin/python benchmarks/throughput.py [--images 4000] [--sizes 64 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_jpeg_shards, workdir  # noqa: E402

from uge_protect.pipeline import ShardJobConfig, run_shard_job  # noqa: E402
from uge_protect.methods.registry import create_method  # noqa: E402


def timed_run(shards: list[Path], out: Path, method: str, **kw) -> float:
    """Images per second of one in-process run (wall clock around the whole job)."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = ShardJobConfig(inputs=[str(p) for p in shards], output=str(out), quiet=True, **kw)
    start = time.perf_counter()
    summary = run_shard_job(cfg, create_method(method, allow_hidden=True))
    seconds = time.perf_counter() - start
    return summary["counts"]["written"] / seconds


def launched_run(shards: list[Path], out: Path, processes: int) -> float:
    """Images per second of a CLI run under `accelerate launch` with N CPU processes."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        launch.append("--multi_gpu")
    cmd = [*launch, "-m", "uge_protect", "shard", *map(str, shards), "-o", str(out), "-m", "random",
           "--quiet", "--workers", "0", "--encode-threads", "0"]
    subprocess.run(cmd, env=env, check=True)
    protection = json.loads((out / "protection.json").read_text())
    return protection["timings"]["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encode-threads", type=int, default=2)
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--process-pixels", type=float, default=16000 * 64 * 64,
                        help="pixels per process-scaling run (at least --images images)")
    args = parser.parse_args()
    base = workdir("throughput")
    print(f"{os.cpu_count()} CPU cores; {args.images} images per size; workers {args.workers}, "
          f"encode threads {args.encode_threads}; PNG level 1, Huffman-only")
    try:
        for size in args.sizes:
            shards = make_jpeg_shards(base / f"in{size}", n_images=args.images, per_shard=args.per_shard, size=size)
            kw = dict(num_workers=args.workers, encode_threads=args.encode_threads, batch_size=64)
            timed_run(shards[:2], base / "warm", "passthrough", **kw)  # warm caches and imports
            passthrough = timed_run(shards, base / f"pass{size}", "passthrough", **kw)
            random = timed_run(shards, base / f"rand{size}", "random", **kw)
            print(f"{size}x{size}: pass-through {passthrough:8.1f} img/s | random {random:8.1f} img/s | "
                  f"ratio random/pass-through {random / passthrough:.3f} (target >= 0.9)")
        for size in [] if args.skip_processes else args.sizes:
            # Small images: more of them, so per-run fixed costs do not dominate a 2 s run.
            n = max(args.images, int(args.process_pixels / (size * size)))
            shards = make_jpeg_shards(base / f"proc{size}", n_images=n, per_shard=args.per_shard, size=size)
            one = launched_run(shards, base / "p1", 1)
            two = launched_run(shards, base / "p2", 2)
            print(f"{size}x{size} random, {n} images, 1 process {one:8.1f} img/s | 2 processes {two:8.1f} img/s | "
                  f"speed-up {two / one:.2f}x (target >= 1.7 on 2 cores)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
