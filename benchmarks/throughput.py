"""Throughput of `uge-protect shard` against a minimal one-process re-encode loop.

The reference is what anyone would write first: Python's ``tarfile`` and Pillow in one
process, reading each member, decoding the PNG, encoding it again as PNG with the pipeline's
settings (level 1, Huffman-only) and writing the tar. The pipeline does that and more (the
method's pass, L∞ and PSNR of every image, hashes, manifests, resumable output), on every
core it is given.

For each size (PNG shards, 180 images each, photo-like content):
* the reference loop's images per second;
* ``shard -m random`` with its defaults, steady state: images over the run's own seconds
  (``protection.json``: from the output lock to the merge, so interpreter start, imports and
  the accelerator's set-up are left out and reported apart), and its ratio to the loop;
* where the time went: seconds per stage, summed over threads and processes
  (``timings.stages``, see ``uge_protect/pipeline/stages.py``);
* ``-m uge`` and ``-m t2ue`` (artifacts from a short fit on the demo shapes, at their
  default sizes: the apply cost does not depend on how well they were fitted), each as a
  ratio to ``random``;
* ``random`` on one core and on two (``taskset``), and the ratio.

Then JPEG input that ``--image-size`` shrinks (1024² photos to 256²): the decode with and
without DCT scaling, and ``shard -m random`` against the loop, which decodes in full.

Then the start-up of a run: one one-image shard, against ``python -c pass`` and against
``python -c "import torch"``.

    .venv/bin/python benchmarks/throughput.py [--images 4000] [--sizes 128 256]
        [--methods random uge t2ue] [--limit uge=540] [--no-cores] [--jpeg 1024 256] [--jpeg-images 1000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_image_shards, workdir  # noqa: E402

from uge_protect.pipeline.stages import STAGES  # noqa: E402
from uge_protect.shards.decode import decode_image, resize_image  # noqa: E402

CLI = [sys.executable, "-m", "uge_protect"]
PER_SHARD = 180


def make_png_shards(directory: Path, *, n_images: int, size: int) -> list[Path]:
    """``n_images`` smooth random PNGs with captions and labels, PER_SHARD per shard."""
    return make_image_shards(directory, n_images=n_images, per_shard=PER_SHARD, size=size, image_format="PNG",
                             texture=6, labels=True, caption=lambda i: f"a photo of thing {i % 10}")


def reference_loop(shards: list[Path], out: Path, resize: int | None = None) -> float:
    """Images per second of the minimal one-process loop (decode, re-encode as PNG, write);
    with ``resize``, each image is decoded in full, then resized and centre-cropped to
    ``resize``² as ``shard --image-size`` does."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n = 0
    start = time.perf_counter()
    for path in shards:
        with tarfile.open(path) as src, tarfile.open(out / path.name, "w") as dst:
            for member in src:
                name, data = member.name, src.extractfile(member).read()
                if name.endswith((".png", ".jpg")):
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                    if resize:
                        img = resize_image(img, resize, "center_crop")
                    buf = io.BytesIO()
                    img.save(buf, format="PNG", compress_level=1, compress_type=2)
                    data, name = buf.getvalue(), name.rsplit(".", 1)[0] + ".png"
                    n += 1
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    return n / (time.perf_counter() - start)


def shard_run(shards: list[Path], out: Path, method: str, artifact: Path | None = None,
              cores: str | None = None, extra: list[str] | None = None) -> dict:
    """A CLI run; returns its ``protection.json`` timings plus the process's wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "shard", *map(str, shards), "-o", str(out), "-m", method, "--quiet", *(extra or [])]
    if artifact is not None:
        cmd += ["--artifact", str(artifact)]
    if cores is not None:
        cmd = ["taskset", "-c", cores, *cmd]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    timings = json.loads((out / "protection.json").read_text())["timings"]
    return {**timings, "wall": wall}


def jpeg_section(base: Path, n_images: int, source: int, target: int) -> None:
    """JPEG photos of ``source``² resized to ``target``²: the decode alone with and without
    the DCT-scaled path, then the loop (full decode) against ``shard -m random``."""
    shards = make_image_shards(base / f"jpeg{source}", n_images=n_images, per_shard=PER_SHARD // 4, size=source,
                               labels=True, caption=lambda i: f"a photo of thing {i % 10}")
    with tarfile.open(shards[0]) as tar:
        data = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")][:20]

    def full(b: bytes) -> None:
        resize_image(Image.open(io.BytesIO(b)).convert("RGB"), target, "center_crop")

    def scaled(b: bytes) -> None:
        decode_image(b, image_size=target, resize_mode="center_crop")

    ms = {f.__name__: 1000 * min(_seconds(lambda: [f(b) for b in data]) for _ in range(3)) / len(data)
          for f in (full, scaled)}
    print(f"\nJPEG {source}x{source} -> {target}x{target} (quality 90): decode and resize {ms['full']:.2f} ms/img "
          f"in full, {ms['scaled']:.2f} ms/img DCT-scaled ({ms['full'] / ms['scaled']:.2f}x)")
    loop = reference_loop(shards, base / "loop-jpeg", resize=target)
    t = shard_run(shards, base / "random-jpeg", "random",
                  extra=["--image-size", str(target), "--resize-mode", "center_crop"])
    print(f"  reference loop (full decode) {loop:7.1f} img/s; random {t['images_per_second']:7.1f} img/s steady "
          f"state ({t['images_per_second'] / loop:.2f}x the loop; {t['samples_processed']} images)")
    for line in _stage_lines(t.get("stages", {}), t["samples_processed"]):
        print(f"          {line}")


def _seconds(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def _median_wall(cmd: list[str], runs: int = 3) -> float:
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def fit_artifacts(base: Path, methods: list[str]) -> dict[str, Path]:
    """Short fits at the methods' default sizes on the demo shapes (apply cost only)."""
    data = base / "demo"
    arts: dict[str, Path] = {}
    need = [m for m in methods if m in ("uge", "t2ue")]
    if not need:
        return arts
    subprocess.run([*CLI, "demo-data", str(data), "--train", "200", "--test", "20"], check=True,
                   stdout=subprocess.DEVNULL)
    train = str(data / "train" / "*.tar")
    for method in need:
        art = base / f"{method}-artifact"
        extra = ["--authorized", "small_cnn"] if method == "uge" else []  # a fresh key
        subprocess.run([*CLI, "fit", method, train, "-o", str(art), "--steps", "2", *extra], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        arts[method] = art
    return arts


def _stage_lines(stages: dict[str, dict[str, float]], images: int) -> list[str]:
    """One line per stage: CPU ms per image, its share of the run's CPU, wall ms per image."""
    total = sum(v["cpu_s"] for v in stages.values()) or 1.0
    return [f"{s:14s} cpu {1000 * v['cpu_s'] / images:6.3f} ms/img ({100 * v['cpu_s'] / total:4.1f}%)  "
            f"wall {1000 * v['wall_s'] / images:6.3f} ms/img" for s in STAGES if (v := stages.get(s))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--methods", nargs="+", default=["random", "uge", "t2ue"])
    parser.add_argument("--no-cores", action="store_true", help="skip the 1-core / 2-core runs")
    parser.add_argument("--jpeg", type=int, nargs=2, default=[1024, 256], metavar=("SOURCE", "TARGET"),
                        help="the JPEG section's stored and --image-size sides")
    parser.add_argument("--jpeg-images", type=int, default=1000, help="0 skips the JPEG section")
    parser.add_argument("--limit", nargs="*", default=[], metavar="METHOD=N",
                        help="run METHOD on its first shards only, at least N images (a method that is slow on "
                             "this machine, e.g. uge=540 on a CPU)")
    args = parser.parse_args()
    limits = {m: int(n) for m, _, n in (x.partition("=") for x in args.limit)}
    os.environ.setdefault("HF_HOME", str(Path(workdir("throughput-hf"))))
    base = workdir("throughput")
    print(f"{os.cpu_count()} CPU cores; {args.images} images per size, {PER_SHARD} per shard; `shard` defaults "
          "(--workers 2 --encode-threads 2, PNG level 1, Huffman-only)")
    try:
        arts = fit_artifacts(base, args.methods)
        for size in args.sizes:
            shards = make_png_shards(base / f"in{size}", n_images=args.images, size=size)
            shard_run(shards[:1], base / "warm", "random")  # warm the page cache and the imports
            loop = reference_loop(shards, base / f"loop{size}")
            print(f"\n{size}x{size}: reference loop (one process) {loop:7.1f} img/s")
            rates: dict[str, float] = {}
            for method in args.methods:
                n = limits.get(method)
                some = shards[: -(-n // PER_SHARD)] if n else shards
                t = shard_run(some, base / f"{method}{size}", method, arts.get(method))
                rates[method] = t["images_per_second"]
                vs = (f"{rates[method] / loop:.2f}x the loop" if method == "random"
                      else f"{rates[method] / rates['random']:.2f}x random" if "random" in rates else "")
                print(f"  {method:7s} {rates[method]:7.1f} img/s steady state ({vs}; {t['samples_processed']} images); "
                      f"run {t['seconds']:.2f} s, "
                      f"process {t['wall']:.2f} s (start-up and exit {t['wall'] - t['seconds']:.2f} s)")
                for line in _stage_lines(t.get("stages", {}), t["samples_processed"]):
                    print(f"          {line}")
            if not args.no_cores and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
                one = shard_run(shards, base / "core1", "random", cores="0")["images_per_second"]
                two = shard_run(shards, base / "core2", "random", cores="0,1")["images_per_second"]
                print(f"  random on 1 core {one:7.1f} img/s, on 2 cores {two:7.1f} img/s: {two / one:.2f}x "
                      f"({(two / one - 1):.2f} per added core)")
        if args.jpeg_images:
            jpeg_section(base, args.jpeg_images, *args.jpeg)
        tiny = make_png_shards(base / "tiny", n_images=1, size=32)
        python = _median_wall([sys.executable, "-c", "pass"])
        torch_import = _median_wall([sys.executable, "-c", "import torch"])
        out = base / "tiny-out"
        run = _median_wall(["bash", "-c", f"rm -rf {out} && {' '.join(CLI)} shard {tiny[0]} -o {out} -m random -q"])
        print(f"\nstart-up: a one-image run {run:.2f} s; python -c pass {python:.2f} s; import torch "
              f"{torch_import:.2f} s: {run - python:.2f} s above the interpreter, {run - torch_import:.2f} s above "
              "importing torch")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
