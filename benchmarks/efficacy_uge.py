"""Efficacy of UGE: learnable for the authorized network, not for hackers, students or other keys.

On the demo dataset: fit UGE (authorized small_cnn, a fixed key), protect the training shards,
then `uge-protect eval` trains each model on protected and on clean shards (same seed, same
settings) and tests on the clean test shards:

* hackers: every architecture of --archs;
* the owner: the authorized network (`--authorized`, row ``small_cnn+key``);
* the authorized architecture with another key (``small_cnn+key:99``);
* students distilled (no labels) from the authorized network on the same training set
  (``vgg11<-small_cnn+key``, ``small_cnn<-small_cnn+key``), from the network with its
  confidence gate (as the owner deploys it) and, as ``uge (no gate)``, without it;
* the `random` control, the defenses (on --defense-archs and the owner), partial protection,
  and the ablations: without L_fd, without L_ud, and the paper's key-less form (authorization
  by architecture and initialisation only, L_gm active) with and without L_gm. (Without L_gm
  under the key projection is the default itself: there L_gm is zero by construction.)

    .venv/bin/python benchmarks/efficacy_uge.py [--workdir DIR] [--data DIR] [--epochs 8]
        [--archs small_cnn vgg11 mobilenet_v2 resnet18] [--defenses grayscale jpeg:75 ...]
        [--ablations no-fd no-ud nokey nokey-no-gm] [--processes 2]

Runs are kept under --workdir and the run cache is shared with the other efficacy benchmarks
(same data, same clean models), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from efficacy_common import classify_rows, evaluate, finish, sh

ABLATIONS = {
    "no-fd": ["--fd-weight", "0"],
    "no-ud": ["--ud-weight", "0"],
    "nokey": ["--no-key-projection"],
    "nokey-no-gm": ["--no-key-projection", "--gm-weight", "0"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_uge")
    p.add_argument("--data", default="bench_output/efficacy_em/data", help="demo data (made when missing)")
    p.add_argument("--cache", default="bench_output/efficacy_em/run-cache", help="run cache shared with efficacy_em")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--authorized", default="small_cnn",
                   help="the owner's architecture (small_cnn: ResNet-18's stock stem reaches only ~56%% on the "
                        "32x32 demo in 8 epochs, too weak a teacher for the distillation row)")
    p.add_argument("--key-seed", default=hashlib.sha256(b"uge-protect benchmark key").hexdigest(),
                   help="the key, 32+ hex digits (default: a fixed, published benchmark key, so that runs "
                        "repeat; never use a published key to protect real data)")
    p.add_argument("--other-key", type=int, default=99)
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vgg11", "mobilenet_v2", "resnet18"])
    p.add_argument("--distill", nargs="*", default=["vgg11", "small_cnn"])
    p.add_argument("--defenses", nargs="*",
                   default=["grayscale", "jpeg:75", "jpeg:10", "cutout", "mixup", "strong-aug", "adv-train"])
    p.add_argument("--defense-archs", nargs="+", default=["small_cnn"])
    p.add_argument("--clean-fraction", type=float, default=0.2,
                   help="partial protection: this fraction of the training set left clean (0: skip)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--processes", type=int, default=1, help="evaluate under accelerate launch with N CPU processes")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="extra `fit uge` options (last)")
    a = p.parse_args()
    work, data = Path(a.workdir), Path(a.data)
    timings: dict[str, float] = {}
    if not (data / "classes.json").is_file():
        sh("demo-data", str(data))
    train = str(data / "train" / "*.tar")

    def protect(name: str, fit_args: list[str]) -> tuple[Path, Path]:
        art, out = work / f"{name}-artifact", work / name
        if not (art / "config.json").is_file():
            start = time.perf_counter()
            sh("fit", "uge", train, "-o", str(art), "--authorized", a.authorized, "--key-seed", str(a.key_seed),
               "--seed", str(a.seed), *fit_args, *a.fit_args)
            timings[f"fit {name}"] = time.perf_counter() - start
        if not (out / "protection.json").is_file():
            start = time.perf_counter()
            sh("shard", train, "-o", str(out), "-m", "uge", "--artifact", str(art), "--quiet")
            timings[f"shard {name}"] = time.perf_counter() - start
        return art, out

    common = dict(epochs=a.epochs, seed=a.seed, cache=Path(a.cache), processes=a.processes)
    table: list[tuple] = []

    def add(name: str, report: dict, defense_label: str | None = None) -> None:
        table.extend((name, arch, defense_label or d, c, pr) for arch, d, c, pr in classify_rows(report))

    random_out = work / "random"
    if not (random_out / "protection.json").is_file():
        sh("shard", train, "-o", str(random_out), "-m", "random", "--quiet")
    add("random", evaluate(random_out, data, work / "reports" / "random", archs=a.archs, defenses=["none"], **common))

    art, out = protect("uge", [])
    owner = ["--authorized", str(art)]
    extra = [*owner, "--other-key", str(a.other_key), *(x for s in a.distill for x in ("--distill", s))]
    add("uge", evaluate(out, data, work / "reports" / "uge" / "none", archs=a.archs, defenses=["none"],
                        extra=extra, **common))
    if a.distill:  # what the confidence gate does: the same students, from the bare network
        add("uge (no gate)", evaluate(out, data, work / "reports" / "uge" / "no-gate", archs=[], defenses=["none"],
                                      extra=[*owner, "--no-gate", *(x for s in a.distill for x in ("--distill", s))],
                                      **common))
    for d in a.defenses:
        add("uge", evaluate(out, data, work / "reports" / "uge" / d.replace(":", ""), archs=a.defense_archs,
                            defenses=[d], extra=owner, **common))
    if a.clean_fraction:
        report = evaluate(out, data, work / "reports" / "uge" / f"clean-fraction-{a.clean_fraction:g}",
                          archs=a.defense_archs, defenses=["none"], clean_fraction=a.clean_fraction, extra=owner,
                          **common)
        add("uge", report, f"{100 * a.clean_fraction:g}% clean")
    for name in a.ablations:
        art_x, out_x = protect(f"uge-{name}", ABLATIONS[name])
        add(f"uge-{name}", evaluate(out_x, data, work / "reports" / f"uge-{name}", archs=a.defense_archs,
                                    defenses=["none"], extra=["--authorized", str(art_x)], **common))

    finish(work, f"UGE: clean test accuracy of models trained on protected vs clean demo shards "
           f"({a.epochs} epochs, seed {a.seed}, authorized {a.authorized})", table, [], timings)


if __name__ == "__main__":
    main()
