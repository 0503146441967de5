"""Sanity benchmark for the embedded demo dataset: is the label learnable, and not trivially?

Writes the demo dataset to a temporary directory, reads it back with plain ``tarfile``,
trains a small CNN on CPU (random crop with padding + horizontal flip; every demo class is
closed under mirroring, so flips preserve labels) and prints the clean test accuracy per
epoch. As a check that the task is not trivial it also trains a linear classifier
(multinomial logistic regression) on raw pixels.

    python benchmarks/demo_accuracy.py --n-train 5000 --n-test 1000 --epochs 8
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from uge_protect.shards.demo import write_demo_dataset


def load_split(shards: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read images (N,H,W,3 uint8), labels and captions from demo shards."""
    fields: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if key not in fields:
                    fields[key] = {}
                    order.append(key)
                fields[key][ext] = tar.extractfile(member).read()
    images = np.stack([np.asarray(Image.open(io.BytesIO(fields[k]["png"])).convert("RGB"))
                       for k in order])
    labels = np.array([int(fields[k]["cls"]) for k in order], dtype=np.int64)
    captions = [fields[k]["txt"].decode("utf-8") for k in order]
    return images, labels, captions


def small_cnn(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with reflect padding and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
                  for i in range(0, len(x), bs))
    return correct / len(x)


def train_cnn(xtr, ytr, xte, yte, num_classes: int, epochs: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn(num_classes)
    bs = 32
    steps = epochs * ((len(xtr) + bs - 1) // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps,
                                                pct_start=0.2)
    accs = []
    for epoch in range(epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total_loss = 0.0
        for i in range(0, len(xtr), bs):
            idx = perm[i:i + bs]
            xb = augment(xtr[idx], gen)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
        acc = accuracy(model, xte, yte)
        accs.append(acc)
        print(f"  cnn epoch {epoch + 1:2d}/{epochs}: train loss {total_loss / len(xtr):.3f}  "
              f"test acc {acc:.4f}  ({time.time() - t0:.1f}s)", flush=True)
    return accs


def train_linear(xtr, ytr, xte, yte, num_classes: int, epochs: int, seed: int) -> float:
    """Multinomial logistic regression on standardized raw pixels; returns best test acc."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ftr, fte = xtr.flatten(1), xte.flatten(1)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mean) / std, (fte - mean) / std
    model = nn.Linear(ftr.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    best = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(ftr), generator=gen)
        for i in range(0, len(ftr), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(ftr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        best = max(best, accuracy(model, fte, yte))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="uge-demo-") as tmp:
        t0 = time.time()
        summary = write_demo_dataset(Path(tmp), n_train=args.n_train, n_test=args.n_test,
                                     image_size=args.image_size, seed=args.seed)
        t_write = time.time() - t0
        classes = json.loads(Path(summary["classes_path"]).read_text())
        img_tr, ytr, cap_tr = load_split(summary["splits"]["train"]["shards"])
        img_te, yte, _ = load_split(summary["splits"]["test"]["shards"])
    print(f"wrote + read demo dataset: {len(ytr)} train / {len(yte)} test, "
          f"{args.image_size}x{args.image_size}, {len(classes)} classes "
          f"(write {t_write:.1f}s, {len(set(cap_tr))} distinct train captions)")
    print("class counts (train):", np.bincount(ytr, minlength=len(classes)).tolist())

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).sub(0.5)

    xtr, xte = to_tensor(img_tr), to_tensor(img_te)
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)

    t0 = time.time()
    lin = train_linear(xtr, ytr_t, xte, yte_t, len(classes), args.linear_epochs, args.seed)
    print(f"linear (raw pixels) best test acc: {lin:.4f}  ({time.time() - t0:.1f}s)")

    t0 = time.time()
    accs = train_cnn(xtr, ytr_t, xte, yte_t, len(classes), args.epochs, args.seed)
    t_cnn = time.time() - t0
    print(f"cnn final test acc: {accs[-1]:.4f}  (training {t_cnn:.1f}s, "
          f"{torch.get_num_threads()} threads)")
    print(f"chance: {1 / len(classes):.4f}; total runtime {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    main()
