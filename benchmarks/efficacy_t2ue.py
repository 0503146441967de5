"""Efficacy of T2UE (both backbones, both modes) against clean training and the `random` control.

On the demo dataset: fit T2UE with each backbone (defaults otherwise), protect the training
shards in sample and class mode, then `uge-protect eval` trains classifiers and a CLIP from
scratch on protected and on clean shards and tests them on the clean test shards. The
defenses (and partial protection) run on --defense-config. Every report is kept under
--workdir; the run cache is shared with `efficacy_em.py` (same data, same clean models), so
an interrupted benchmark resumes where it stopped.

    .venv/bin/python benchmarks/efficacy_t2ue.py [--workdir DIR] [--data DIR] [--epochs 8]
        [--backbones ssa unet] [--modes class sample] [--archs small_cnn vgg11 resnet18]
        [--defense-config ssa-class] [--defenses grayscale jpeg:10 ...] [--processes 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from efficacy_common import classify_rows, clip_rows, evaluate, finish, sh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_t2ue")
    p.add_argument("--data", default="bench_output/efficacy_em/data", help="demo data (written if missing)")
    p.add_argument("--cache", default="bench_output/efficacy_em/run-cache")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbones", nargs="+", default=["ssa", "unet"], choices=["ssa", "unet"])
    p.add_argument("--modes", nargs="+", default=["class", "sample"], choices=["class", "sample"])
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vgg11", "resnet18"])
    p.add_argument("--defense-config", default="ssa-class", help="BACKBONE-MODE the defenses run on")
    p.add_argument("--defense-archs", nargs="+", default=["small_cnn"])
    p.add_argument("--defenses", nargs="*",
                   default=["grayscale", "jpeg:75", "jpeg:10", "cutout", "mixup", "strong-aug", "adv-train"])
    p.add_argument("--clip-defenses", nargs="*", default=["grayscale", "jpeg:10"])
    p.add_argument("--clean-fraction", type=float, default=0.2)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="extra `fit t2ue` options (last)")
    a = p.parse_args()
    work, data, cache = Path(a.workdir), Path(a.data), Path(a.cache)
    work.mkdir(parents=True, exist_ok=True)
    if not (data / "classes.json").is_file():
        sh("demo-data", str(data))
    timings: dict[str, float] = {}
    protected: dict[str, Path] = {}
    out = work / "random"
    if not (out / "protection.json").is_file():
        sh("shard", str(data / "train" / "*.tar"), "-o", str(out), "-m", "random", "--quiet")
    protected["random"] = out
    for backbone in a.backbones:
        art = work / f"t2ue-{backbone}-artifact"
        if not (art / "config.json").is_file():
            start = time.perf_counter()
            resume = ["--resume"] if (art / "checkpoint.pt").is_file() else []
            sh("fit", "t2ue", str(data / "train" / "*.tar"), "-o", str(art), "--backbone", backbone,
               "--seed", str(a.seed), *resume, *a.fit_args)
            timings[f"fit t2ue {backbone}"] = time.perf_counter() - start
        for mode in a.modes:
            out = work / f"t2ue-{backbone}-{mode}"
            if not (out / "protection.json").is_file():
                extra = ["--mode", mode] + (["--class-names", str(data / "classes.json")] if mode == "class" else [])
                start = time.perf_counter()
                sh("shard", str(data / "train" / "*.tar"), "-o", str(out), "-m", "t2ue", "--artifact", str(art),
                   "--quiet", *extra)
                timings[f"shard t2ue {backbone} {mode}"] = time.perf_counter() - start
            protected[f"{backbone}-{mode}"] = out

    common = dict(epochs=a.epochs, seed=a.seed, cache=cache, processes=a.processes)
    table, clip_table = [], []
    for name, path in protected.items():
        reports = [evaluate(path, data, work / "reports" / name / "none", archs=a.archs, defenses=["none"], **common)]
        if name == a.defense_config:
            for d in a.defenses:
                reports.append(evaluate(path, data, work / "reports" / name / d.replace(":", ""),
                                        archs=a.defense_archs, defenses=[d], **common))
        for report in reports:
            table += [(name, *row) for row in classify_rows(report)]
        if name == a.defense_config and a.clean_fraction:
            report = evaluate(path, data, work / "reports" / name / f"clean-fraction-{a.clean_fraction:g}",
                              archs=a.defense_archs, defenses=["none"], clean_fraction=a.clean_fraction, **common)
            table += [(name, arch, f"{100 * a.clean_fraction:g}% clean", c, pr)
                      for arch, _, c, pr in classify_rows(report)]
        clip_defenses = ["none"] + (a.clip_defenses if name == a.defense_config else [])
        report = evaluate(path, data, work / "reports" / name / "clip", archs=["small_cnn"],
                          defenses=clip_defenses, task="clip", **common)
        clip_table += [(name, *row) for row in clip_rows(report)]

    finish(work, f"T2UE: clean test accuracy of models trained on protected vs clean demo shards "
           f"({a.epochs} epochs, seed {a.seed})", table, clip_table, timings)


if __name__ == "__main__":
    main()
