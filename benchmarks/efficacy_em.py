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
--clip-defenses) and by the classifiers of --defense-archs without a defense. The clean-trained models are
shared between the methods through `eval --cache`, and every finished run is kept, so an
interrupted benchmark resumes where it stopped. With --processes N the evaluations run under
`accelerate launch` with N CPU processes. The default grid is about 35 training runs:
roughly 1.5 hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from efficacy_common import classify_rows, clip_rows, evaluate, finish, sh


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_em")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vgg11", "resnet18"])
    p.add_argument("--defenses", nargs="*",
                   default=["grayscale", "jpeg:75", "jpeg:10", "class-mean", "cutout", "mixup", "strong-aug", "adv-train"])
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

    common = dict(epochs=a.epochs, seed=a.seed, cache=work / "run-cache", processes=a.processes)
    table = []
    for name, path in protected.items():
        # EM's clip mode is judged by CLIP below; the classifiers in --defense-archs add a cross-check
        archs = a.defense_archs if name == "em-clip" else a.archs
        reports = [evaluate(path, data, work / "reports" / name / "none", archs=archs, defenses=["none"], **common)]
        defended = name in ("em-class", "em-sample") or (name == "random" and a.control_defenses)
        for d in a.defenses if defended else []:
            slug = d.replace(":", "")
            reports.append(evaluate(path, data, work / "reports" / name / slug, archs=a.defense_archs,
                                    defenses=[d], **common))
        for report in reports:
            table += [(name, *row) for row in classify_rows(report)]
        if a.clean_fraction and defended:
            report = evaluate(path, data, work / "reports" / name / f"clean-fraction-{a.clean_fraction:g}",
                              archs=a.defense_archs, defenses=["none"], clean_fraction=a.clean_fraction, **common)
            table += [(name, arch, f"{100 * a.clean_fraction:g}% clean", c, pr)
                      for arch, _, c, pr in classify_rows(report)]

    # CLIP from scratch: the random control and EM's CLIP mode (the clean CLIP runs are shared)
    clip_table = []
    for name in ("random", "em-clip"):
        if name not in protected:
            continue
        defenses = ["none"] + (a.clip_defenses if name != "random" else [])
        report = evaluate(protected[name], data, work / "reports" / name / "clip", archs=["small_cnn"],
                          defenses=defenses, task="clip", **common)
        clip_table += [(name, *row) for row in clip_rows(report)]

    finish(work, f"EM: clean test accuracy of models trained on protected vs clean demo shards "
           f"({a.epochs} epochs, seed {a.seed})", table, clip_table, timings)


if __name__ == "__main__":
    main()
