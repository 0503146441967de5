"""What budget a fixed code from the caption needs before a CLIP trained from scratch stops learning the content.

The CLIP counterpart of ``shortcut_ceiling.py``. No fit, no method: each training image gets a
±ε pattern on a grid of blocks (so it survives the CLIP's random crops) computed from its
caption alone, in one of two ways:

- ``minilm``: the sign of a fixed random projection of the caption's MiniLM embedding
  (centred over the corpus), so captions that differ get codes that differ;
- ``words``: the sign of the sum of one fixed random pattern per word of the caption, a code
  that a text tower trained from scratch can compute from its token embeddings alone.

A small open_clip CLIP is trained from scratch on the coded pairs (as ``eval --task clip``) and
scored by Recall@10 on the clean test pairs. If a code a CLIP can read off the pixels does
not displace the content at some ε, no T2UE noise of that budget and shape will.

Reads the protocol's demo data (``<workdir>/demo/data``, written if missing) and writes
``docs/efficacy/clip-code-ceiling.md`` and ``.json``, labelled by date, commit and hardware:

    .venv/bin/python benchmarks/clip_code_ceiling.py [--workdir bench_output/efficacy_protocol]
        [--codes minilm words] [--epsilons 8 16] [--block 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from efficacy_common import sh
from efficacy_protocol import _git, _hardware

from uge_protect.eval.clip import train_and_score_clip
from uge_protect.shards.dataset import load_shards
from uge_protect.transforms.text_encoders import load_text_encoder


def _words(caption: str) -> set[str]:
    return set(re.findall(r"[a-z]+", caption.lower()))


def caption_code(captions: list[str], kind: str, channels: int, cells: int, seed: int) -> torch.Tensor:
    """A real-valued (N, channels, cells, cells) code per caption; its sign is the pattern."""
    g = torch.Generator().manual_seed(seed)
    dims = channels * cells * cells
    if kind == "words":
        vocab = sorted(set().union(*(_words(c) for c in captions)))
        patterns = {w: torch.randn(dims, generator=g) for w in vocab}
        code = torch.stack([sum((patterns[w] for w in _words(c)), torch.zeros(dims)) for c in captions])
    elif kind == "minilm":
        unique = sorted(set(captions))
        encoder = load_text_encoder("minilm")
        emb = torch.cat([encoder.encode(unique[i:i + 256]) for i in range(0, len(unique), 256)])
        index = {c: i for i, c in enumerate(unique)}
        emb = emb[torch.tensor([index[c] for c in captions])]
        code = (emb - emb.mean(0)) @ torch.randn(emb.shape[1], dims, generator=g)
    else:
        raise ValueError(f"unknown code {kind!r}")
    return code.view(-1, channels, cells, cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_protocol")
    p.add_argument("--codes", nargs="+", default=["minilm", "words"], choices=["minilm", "words"])
    p.add_argument("--epsilons", nargs="+", type=float, default=[8, 16], help="in 1/255 units")
    p.add_argument("--block", type=int, default=4, help="side of the code's blocks in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", default="docs/efficacy")
    a = p.parse_args()
    data = Path(a.workdir) / "demo" / "data"
    if not (data / "classes.json").is_file():
        sh("demo-data", str(data))
    train = load_shards(sorted(glob.glob(str(data / "train" / "*.tar"))))
    test = load_shards(sorted(glob.glob(str(data / "test" / "*.tar"))))
    side = train.images.shape[-1]
    cells = max(1, side // a.block)

    def score(images: torch.Tensor) -> dict[str, float]:
        r = train_and_score_clip(dataclasses.replace(train, images=images), test, seed=a.seed)
        return {"i2t": r["i2t"]["R@10"], "t2i": r["t2i"]["R@10"], "seconds": r["seconds"]}

    clean = score(train.images)
    print(f"clean: R@10 i2t {clean['i2t']:.3f} / t2i {clean['t2i']:.3f}", flush=True)
    rows = []
    for kind in a.codes:
        code = caption_code([c or "" for c in train.captions], kind, 3, cells, a.seed)
        for eps in a.epsilons:
            delta = F.interpolate(code.sign() * (eps / 255), size=(side, side), mode="nearest")
            x = ((train.images.float() / 255 + delta).clamp(0, 1) * 255).round().to(torch.uint8)
            r = score(x)
            rows.append({"code": kind, "epsilon": eps, **r})
            print(f"{kind} ±{eps:g}/255: R@10 i2t {r['i2t']:.3f} / t2i {r['t2i']:.3f}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": _git("rev-parse", "--short", "HEAD"),
            "hardware": _hardware(), "seed": a.seed, "block": a.block}
    lines = ["# A fixed code from the caption, against CLIP trained from scratch", "",
             f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['hardware']}; written by "
             f"`benchmarks/clip_code_ceiling.py` (demo shapes, seed {a.seed}, {a.block}×{a.block}-pixel blocks). "
             "Recall@10 on the clean test pairs of a CLIP trained from scratch on the coded pairs "
             "(image→text / text→image). Target of the T2UE issue: at most half of clean.", "",
             f"Clean: {clean['i2t']:.3f} / {clean['t2i']:.3f}.", "",
             "| code | ε | i2t R@10 | t2i R@10 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['code']} | {r['epsilon']:g}/255 | {r['i2t']:.3f} | {r['t2i']:.3f} |" for r in rows]
    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "clip-code-ceiling.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (docs / "clip-code-ceiling.json").write_text(json.dumps({"meta": meta, "clean": clean, "rows": rows}, indent=2),
                                                  encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
