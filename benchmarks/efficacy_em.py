"""Efficacy of EM (sample-wise, class-wise, CLIP) against clean training and the `random` control.

On the demo dataset: fit EM, protect the training shards, then `uge-protect eval` trains each
architecture on protected and on clean shards (same seed, same settings) and tests on the clean
test shards, under each defense. Prints one table; every report is kept under --workdir.

    .venv/bin/python benchmarks/efficacy_em.py [--workdir DIR] [--epochs 8]
        [--archs small_cnn vgg11 resnet18] [--defenses grayscale jpeg:75 ...]
        [--defense-archs small_cnn] [--modes class sample] [--clean-fraction 0.2]
        [--processes 2]

Every architecture is trained without a defense; every defense (and partial protection,
--clean-fraction) is run on the architectures in --defense-archs, for EM's class and sample
modes (for the `random` control only with --control-defenses). EM's clip mode (fitted on
captions, no labels) is judged by a CLIP trained from scratch (`eval --task clip`, with
--clip-defenses) and by the classifiers without a defense. The clean-trained models are
shared between the methods through `eval --cache`, and every finished run is kept, so an
interrupted benchmark resumes where it stopped. With --processes N the evaluations run under
`accelerate launch` with N CPU processes. The default grid is about 35 training runs:
roughly 1.5 hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "uge_protect"]


def sh(*args: str) -> None:
    print("$ uge-protect " + " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True)


def evaluate(protected: Path, data: Path, out: Path, archs: list[str], defenses: list[str], a,
             clean_fraction: float = 0.0, task: str = "classify") -> dict:
    if not (out / "report.json").is_file():
        cmd = ["eval", "--task", task, "--protected", str(protected), "--clean-train", str(data / "train" / "*.tar"),
               "--test", str(data / "test" / "*.tar"), "-o", str(out), "--epochs", str(a.epochs),
               "--seed", str(a.seed), "--cache", str(Path(a.workdir) / "run-cache"), "--quiet"]
        if clean_fraction:
            cmd += ["--clean-fraction", str(clean_fraction)]
        for arch in archs:
            cmd += ["--arch", arch]
        for d in defenses:
            cmd += ["--defense", d]
        if a.processes > 1:
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                      str(a.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "-m", "uge_protect"]
            print("$ accelerate launch ... uge-protect " + " ".join(cmd), flush=True)
            env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
            subprocess.run([*launch, *cmd], check=True, env=env)
        else:
            sh(*cmd)
    return json.loads((out / "report.json").read_text())


def rows(report: dict):
    """(arch, defense, clean final, protected final) per result of a report."""
    for r in report["tasks"]["classify"]["summary"]:
        yield r["arch"], r["defense"], r["clean"]["final_test_acc"]["mean"], r["protected"]["final_test_acc"]["mean"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_em")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vgg11", "resnet18"])
    p.add_argument("--defenses", nargs="*",
                   default=["grayscale", "jpeg:75", "jpeg:10", "cutout", "mixup", "strong-aug", "adv-train"])
    p.add_argument("--clean-fraction", type=float, default=0.2,
                   help="partial protection: this fraction of the training set left clean (0: skip)")
    p.add_argument("--control-defenses", action="store_true",
                   help="also run the defenses on the `random` control (by default it is run without a defense)")
    p.add_argument("--processes", type=int, default=1, help="evaluate under accelerate launch with N CPU processes")
    p.add_argument("--defense-archs", nargs="+", default=["small_cnn"])
    p.add_argument("--modes", nargs="+", default=["class", "sample", "clip"], choices=["class", "sample", "clip"])
    p.add_argument("--clip-defenses", nargs="*", default=["grayscale", "jpeg:10"],
                   help="data-level defenses for the CLIP evaluation of EM's clip mode")
    p.add_argument("--sample-rounds", type=int, default=20)
    a = p.parse_args()
    work = Path(a.workdir)
    data = work / "data"
    timings: dict[str, float] = {}
    if not (data / "classes.json").is_file():
        sh("demo-data", str(data))
    protected: dict[str, Path] = {}
    out = work / "random"
    if not (out / "protection.json").is_file():
        sh("shard", str(data / "train" / "*.tar"), "-o", str(out), "-m", "random", "--quiet")
    protected["random"] = out
    for mode in a.modes:
        art, out = work / f"em-{mode}-artifact", work / f"em-{mode}"
        if not (art / "config.json").is_file():
            start = time.perf_counter()
            extra = ["--max-rounds", str(a.sample_rounds)] if mode == "sample" else []
            sh("fit", "em", str(data / "train" / "*.tar"), "-o", str(art), "--mode", mode, "--seed", str(a.seed), *extra)
            timings[f"fit em {mode}"] = time.perf_counter() - start
        if not (out / "protection.json").is_file():
            start = time.perf_counter()
            sh("shard", str(data / "train" / "*.tar"), "-o", str(out), "-m", "em", "--artifact", str(art), "--quiet")
            timings[f"shard em {mode}"] = time.perf_counter() - start
        protected[f"em-{mode}"] = out

    table = []
    for name, path in protected.items():
        reports = [evaluate(path, data, work / "reports" / name / "none", a.archs, ["none"], a)]
        defended = name in ("em-class", "em-sample") or (name == "random" and a.control_defenses)
        for d in a.defenses if defended else []:
            slug = d.replace(":", "")
            reports.append(evaluate(path, data, work / "reports" / name / slug, a.defense_archs, [d], a))
        for report in reports:
            for arch, defense, clean, prot in rows(report):
                table.append((name, arch, defense, clean, prot))
        if a.clean_fraction and defended:
            report = evaluate(path, data, work / "reports" / name / f"clean-fraction-{a.clean_fraction:g}",
                              a.defense_archs, ["none"], a, clean_fraction=a.clean_fraction)
            for arch, _, clean, prot in rows(report):
                table.append((name, arch, f"{100 * a.clean_fraction:g}% clean", clean, prot))

    # CLIP from scratch: the random control and EM's CLIP mode (the clean CLIP runs are shared)
    clip_table = []
    for name in ("random", "em-clip"):
        if name not in protected:
            continue
        defenses = ["none"] + (a.clip_defenses if name != "random" else [])
        report = evaluate(protected[name], data, work / "reports" / name / "clip", ["small_cnn"], defenses, a,
                          task="clip")
        for run in report["tasks"]["clip"]["runs"]:
            clip_table.append((name, run["defense"],
                               *(run[w][d]["R@10"] for w in ("clean", "protected") for d in ("i2t", "t2i"))))

    print("\nclean test accuracy of models trained on protected vs clean demo shards "
          f"({a.epochs} epochs, seed {a.seed})")
    print(f"{'training data':<12} {'arch':<10} {'defense':<10} {'clean-trained':>13} {'protected-trained':>17}")
    for name, arch, defense, clean, prot in table:
        print(f"{name:<12} {arch:<10} {defense:<10} {100 * clean:12.1f}% {100 * prot:16.1f}%")
    if clip_table:
        print("\nCLIP trained from scratch on protected vs clean pairs: Recall@10 on the clean test pairs")
        print(f"{'training data':<12} {'defense':<10} {'clean i2t':>9} {'clean t2i':>9} {'prot i2t':>9} {'prot t2i':>9}")
        for name, defense, ci, ct, pi, pt in clip_table:
            print(f"{name:<12} {defense:<10} {ci:9.3f} {ct:9.3f} {pi:9.3f} {pt:9.3f}")
    for k, v in timings.items():
        print(f"time {k}: {v:.0f} s")
    (work / "summary.json").write_text(json.dumps({"rows": table, "clip_rows": clip_table, "timings": timings}, indent=2))


if __name__ == "__main__":
    main()
