"""What budget a fixed class-wise pattern needs before a dataset stops being learnable.

No fit, no method: each class gets one fixed random pattern of ±ε on a grid of 8×8-pixel
blocks (so it survives crops), added to every training image of the class (the synthetic
shortcut of "Availability attacks create shortcuts"). A classifier is trained on that data
and tested on the clean test set, for several ε. The pattern is perfectly separable by class
but not optimised against any network, so it is no upper bound on what a fitted method does
(EM's optimised class noise protects the demo shapes at 8/255 where this pattern does not);
what it shows is how much more budget one dataset needs than another for the same shortcut.

Reads the protocol's data (``<workdir>/{demo,photos}/data``, written if missing) and writes
``docs/efficacy/shortcut-ceiling.md`` and ``.json``, labelled by date, commit and hardware:

    .venv/bin/python benchmarks/shortcut_ceiling.py [--workdir bench_output/efficacy_protocol]
        [--epsilons 8 16 32] [--archs small_cnn vit_tiny] [--datasets demo photos]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from efficacy_common import protocol_data, write_table
from efficacy_protocol import _git, _hardware

from uge_protect.eval.classify import TrainSettings, fit_classifier


def shortcut(labels: torch.Tensor, classes: int, side: int, epsilon: float, block: int, seed: int) -> torch.Tensor:
    """One ±ε pattern per class on a grid of ``block``-pixel blocks: (N, 3, side, side) for ``labels``."""
    g = torch.Generator().manual_seed(seed)
    cells = max(1, side // block)
    pattern = (torch.randint(0, 2, (classes, 3, cells, cells), generator=g).float() * 2 - 1) * epsilon
    return F.interpolate(pattern, size=(side, side), mode="nearest")[labels]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_protocol")
    p.add_argument("--datasets", nargs="+", default=["demo", "photos"], choices=["demo", "photos"])
    p.add_argument("--epsilons", nargs="+", type=float, default=[8, 16, 32], help="in 1/255 units")
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vit_tiny"])
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", default="docs/efficacy")
    a = p.parse_args()
    rows = []
    for dataset in a.datasets:
        train, test = protocol_data(a.workdir, dataset)
        k, side = train.num_classes, train.images.shape[-1]
        for arch in a.archs:
            s = TrainSettings(arch=arch, epochs=a.epochs, seed=a.seed)
            clean = fit_classifier(train.images, train.labels, test.images, test.labels, k, s)[1]["final_test_acc"]
            row = {"dataset": dataset, "arch": arch, "clean": clean, "shortcut": {}}
            if clean < 2 / k:  # it does not learn this data in the budget: no shortcut can show anything
                print(f"[{dataset}] {arch}: clean {100 * clean:.1f}%: did not learn, left out", flush=True)
                continue
            for eps in a.epsilons:
                delta = shortcut(train.labels, k, side, eps / 255, a.block, a.seed)
                x = ((train.images.float() / 255 + delta).clamp(0, 1) * 255).round().to(torch.uint8)
                acc = fit_classifier(x, train.labels, test.images, test.labels, k, s)[1]["final_test_acc"]
                row["shortcut"][f"{eps:g}"] = acc
                print(f"[{dataset}] {arch}: clean {100 * clean:.1f}%, shortcut ±{eps:g}/255 {100 * acc:.1f}%", flush=True)
            rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": _git("rev-parse", "--short", "HEAD"),
            "hardware": _hardware(), "epochs": a.epochs, "seed": a.seed, "block": a.block}
    eps_cols = [f"{e:g}" for e in a.epsilons]
    lines = ["# A fixed class-wise pattern at several budgets", "",
             f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['hardware']}; written by "
             f"`benchmarks/shortcut_ceiling.py` ({a.epochs} epochs, seed {a.seed}). Each class gets one random "
             f"±ε pattern on {a.block}×{a.block}-pixel blocks, added to all its training images; accuracy on the "
             "clean test set (%).", "",
             "| data | arch | clean | " + " | ".join(f"±{e}/255" for e in eps_cols) + " |",
             "|---|---|---:|" + "---:|" * len(eps_cols)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['arch']} | {100 * r['clean']:.1f} | "
                     + " | ".join(f"{100 * r['shortcut'][e]:.1f}" for e in eps_cols) + " |")
    write_table(a.docs, "shortcut-ceiling", lines, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
