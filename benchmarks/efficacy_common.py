"""Shared helpers of the efficacy benchmarks: run the CLI, evaluate with a shared run cache, read reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

CLI = [sys.executable, "-m", "uge_protect"]


def sh(*args: str) -> None:
    """Run ``uge-protect ARGS`` and fail loudly."""
    print("$ uge-protect " + " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True)


def protocol_data(workdir: str | Path, dataset: str):
    """The protocol's ``demo`` or ``photos`` data under ``workdir`` (written if missing): (train, test) in memory."""
    import glob

    from uge_protect.shards.dataset import load_shards

    data = Path(workdir) / dataset / "data"
    if not (data / "classes.json").is_file():
        sh("demo-data" if dataset == "demo" else "photo-data", str(data))
    return (load_shards(sorted(glob.glob(str(data / "train" / "*.tar")))),
            load_shards(sorted(glob.glob(str(data / "test" / "*.tar")))))


def write_table(docs: str | Path, name: str, lines: list[str], payload: dict) -> None:
    """Write ``<docs>/<name>.md`` (the lines) and ``<name>.json`` (the payload), and print the table."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (docs / f"{name}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print("\n".join(lines))


def evaluate(protected: Path, data: Path, out: Path, *, archs: list[str], defenses: list[str], epochs: int,
             seed: int, cache: Path, processes: int = 1, clean_fraction: float = 0.0,
             task: str = "classify", extra: list[str] | tuple[str, ...] = ()) -> dict:
    """``uge-protect eval`` unless ``out/report.json`` exists from the same arguments; returns
    the report. ``extra``: more ``eval`` arguments (``--authorized DIR``, ...)."""
    cmd = ["eval", "--task", task, "--protected", str(protected),
           "--clean-train", str(data / "train" / "*.tar"), "--test", str(data / "test" / "*.tar"),
           "-o", str(out), "--epochs", str(epochs), "--seed", str(seed), "--cache", str(cache), "--quiet"]
    if clean_fraction:
        cmd += ["--clean-fraction", str(clean_fraction)]
    for arch in archs:
        cmd += ["--arch", arch]
    for d in defenses:
        cmd += ["--defense", d]
    cmd += list(extra)
    done = out / "eval-args.json"  # a resumed benchmark reruns an eval whose arguments changed
    if not (out / "report.json").is_file() or not done.is_file() or json.loads(done.read_text()) != cmd:
        if processes > 1:
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                      str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "-m", "uge_protect"]
            print("$ accelerate launch ... uge-protect " + " ".join(cmd), flush=True)
            env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
            subprocess.run([*launch, *cmd], check=True, env=env)
        else:
            sh(*cmd)
        done.write_text(json.dumps(cmd))
    return json.loads((out / "report.json").read_text())


def classify_rows(report: dict) -> Iterator[tuple[str, str, float, float]]:
    """(arch, defense, clean final, protected final) per classification result."""
    for r in report["tasks"].get("classify", {}).get("summary", []):
        yield r["arch"], r["defense"], r["clean"]["final_test_acc"]["mean"], r["protected"]["final_test_acc"]["mean"]


def clip_rows(report: dict) -> Iterator[tuple[str, float, float, float, float]]:
    """(defense, clean i2t R@10, clean t2i R@10, protected i2t R@10, protected t2i R@10) per CLIP run."""
    for run in report["tasks"].get("clip", {}).get("runs", []):
        yield (run["defense"], *(run[w][d]["R@10"] for w in ("clean", "protected") for d in ("i2t", "t2i")))


def finish(work: Path, title: str, table: list[tuple], clip_table: list[tuple], timings: dict[str, float]) -> None:
    """Print the tables and timings of a benchmark and write them to ``work/summary.json``."""
    print_tables(title, table, clip_table)
    for k, v in timings.items():
        print(f"time {k}: {v:.0f} s")
    (work / "summary.json").write_text(json.dumps({"rows": table, "clip_rows": clip_table, "timings": timings},
                                                  indent=2))


def print_tables(title: str, table: list[tuple], clip_table: list[tuple]) -> None:
    """Print the classification and CLIP tables of a benchmark."""
    print(f"\n{title}")
    width = max([10, *(len(str(row[1])) for row in table)])
    print(f"{'training data':<16} {'arch':<{width}} {'defense':<12} {'clean-trained':>13} {'protected-trained':>17}")
    for name, arch, defense, clean, prot in table:
        print(f"{name:<16} {arch:<{width}} {defense:<12} {100 * clean:12.1f}% {100 * prot:16.1f}%")
    if clip_table:
        print("\nCLIP trained from scratch on protected vs clean pairs: Recall@10 on the clean test pairs")
        print(f"{'training data':<16} {'defense':<10} {'clean i2t':>9} {'clean t2i':>9} {'prot i2t':>9} {'prot t2i':>9}")
        for name, defense, ci, ct, pi, pt in clip_table:
            print(f"{name:<16} {defense:<10} {ci:9.3f} {ct:9.3f} {pi:9.3f} {pt:9.3f}")
