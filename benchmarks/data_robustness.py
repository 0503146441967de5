"""How far a dataset's classes are from each other in pixel space, which bounds what ε-bounded noise can do.

An unlearnable-examples method adds at most ±ε to every pixel. It works when a network can
learn the noise faster than the content, which needs the content's class evidence to be
fragile at that scale. Two measurements per dataset say how fragile it is, without any
protection method:

- **robust accuracy**: a classifier trained on the clean data (8 epochs, as `eval`), then
  attacked on the clean test set by L∞ PGD (10 steps, random start) at several ε. On data
  like CIFAR-10, a normally trained network keeps almost nothing at 8/255; where it keeps
  much, the class evidence is larger than ε and the noise competes with it rather than
  replacing it;
- **colour statistics**: a linear classifier on six numbers per image (the per-channel mean and
  standard deviation), trained on clean data. ±ε moves each of those numbers by at most ε.

Reads the protocol's data (``<workdir>/{demo,photos}/data``, written if missing) and writes
``docs/efficacy/data-robustness.md`` and ``.json``, labelled by date, commit and hardware:

    .venv/bin/python benchmarks/data_robustness.py [--workdir bench_output/efficacy_protocol]
        [--epsilons 2 4 8 16] [--archs small_cnn vit_tiny] [--datasets demo photos]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from efficacy_common import protocol_data, write_table
from efficacy_protocol import _git, _hardware

from uge_protect.eval.classify import TrainSettings, fit_classifier
from uge_protect.eval.defenses import pgd_attack


def colour_statistics(images: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of uint8 (N, 3, H, W) images in [0, 1] units: (N, 6)."""
    x = images.float() / 255
    return torch.cat([x.mean((2, 3)), x.std((2, 3), unbiased=False)], 1)


def colour_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, steps: int = 500) -> float:
    """Test accuracy of a linear classifier on the six colour statistics (standardised on train)."""
    a, b = colour_statistics(train_x), colour_statistics(test_x)
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-6)
    a, b = (a - mu) / sd, (b - mu) / sd
    torch.manual_seed(0)
    probe = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(a), train_y.long()).backward()
        opt.step()
    with torch.no_grad():
        return float((probe(b).argmax(1) == test_y).float().mean())


def robust_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float,
                    seed: int, batch: int = 250) -> float:
    """Accuracy of ``model`` on uint8 ``images`` under L∞ PGD-10 (step ε/4) at ``epsilon``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, images.shape[0], batch):
        x, y = images[i:i + batch].float() / 255, labels[i:i + batch].long()
        if epsilon > 0:
            x = pgd_attack(model, x, y, epsilon=epsilon, step=epsilon / 4, steps=10, generator=g)
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
    return correct / images.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_protocol")
    p.add_argument("--datasets", nargs="+", default=["demo", "photos"], choices=["demo", "photos"])
    p.add_argument("--epsilons", nargs="+", type=float, default=[2, 4, 8, 16], help="in 1/255 units")
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vit_tiny"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--test-images", type=int, default=500, help="test images attacked per dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", default="docs/efficacy")
    a = p.parse_args()
    rows = []
    for dataset in a.datasets:
        train, test = protocol_data(a.workdir, dataset)
        k = train.num_classes
        probe = colour_probe(train.images, train.labels, test.images, test.labels, k)
        print(f"[{dataset}] linear probe on 6 colour statistics: {100 * probe:.1f}%", flush=True)
        pick = torch.randperm(test.images.shape[0], generator=torch.Generator().manual_seed(a.seed))[:a.test_images]
        x, y = test.images[pick], test.labels[pick]  # a seeded sample over every class
        for arch in a.archs:
            s = TrainSettings(arch=arch, epochs=a.epochs, seed=a.seed)
            model, result = fit_classifier(train.images, train.labels, test.images, test.labels, k, s)
            robust = {f"{e:g}": robust_accuracy(model, x, y, e / 255, a.seed) for e in a.epsilons}
            row = {"dataset": dataset, "arch": arch, "classes": k, "colour_probe": probe,
                   "clean": result["final_test_acc"], "robust": robust}
            rows.append(row)
            print(f"[{dataset}] {arch}: clean {100 * row['clean']:.1f}%, PGD-10 "
                  + ", ".join(f"{e}/255 {100 * v:.1f}%" for e, v in robust.items()), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": _git("rev-parse", "--short", "HEAD"),
            "hardware": _hardware(), "epochs": a.epochs, "seed": a.seed, "test_images": a.test_images}
    eps_cols = [f"{e:g}" for e in a.epsilons]
    lines = ["# How far apart the classes are in pixel space", "",
             f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['hardware']}; written by "
             f"`benchmarks/data_robustness.py` ({a.epochs} epochs, seed {a.seed}). A classifier trained on the "
             f"clean training data, tested on {a.test_images} clean test images (a seeded sample) attacked by L∞ PGD-10 at each ε "
             "(accuracy, %); and a linear classifier on six colour statistics per image (per-channel mean and "
             "standard deviation), which ±ε moves by at most ε each.", "",
             "| data | classes | colour probe | arch | clean | " + " | ".join(f"PGD {e}/255" for e in eps_cols) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * len(eps_cols)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['classes']} | {100 * r['colour_probe']:.1f} | {r['arch']} | "
                     f"{100 * r['clean']:.1f} | " + " | ".join(f"{100 * r['robust'][e]:.1f}" for e in eps_cols) + " |")
    write_table(a.docs, "data-robustness", lines, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
