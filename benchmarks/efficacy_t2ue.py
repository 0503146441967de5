"""T2UE beyond the protocol's headline: CLIP trained from scratch, and the defense grid.

On the demo shapes (``<workdir>/data``, written if missing), beside the `random` control and
EM class-wise:
- ``t2ue-sample``: ``fit t2ue TRAIN`` with no options (concepts from the labels), ``shard -m
  t2ue`` with no mode options (noise from each caption);
- ``t2ue-clusters``: ``fit t2ue TRAIN --clusters K`` (concepts are caption clusters: what a
  corpus without labels gets), ``shard -m t2ue``.

Each is evaluated by ``uge-protect eval --task clip`` (a CLIP trained from scratch on the
protected pairs, Recall@10 on the clean test pairs) and, for T2UE from captions and EM
class-wise, by the classifier defense grid (grayscale, JPEG 75 and 10, cutout, mixup, strong
augmentation, 20% of the data left clean). Writes ``docs/efficacy/t2ue.md`` and ``.json``,
labelled by date, commit and hardware. Runs and fits are reused from the same --workdir as
``efficacy_protocol.py`` (``<workdir>/demo``), so a resumed or second run trains only what is new:

    .venv/bin/python benchmarks/efficacy_t2ue.py [--workdir bench_output/efficacy_protocol]
        [--clusters 10] [--processes 2] [--docs docs/efficacy]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from efficacy_common import clip_rows, evaluate, sh
from efficacy_protocol import _git, _hardware

DEFENSES = ["grayscale", "jpeg:75", "jpeg:10", "class-mean", "cutout", "mixup", "strong-aug"]


def _protect(work: Path, data: Path, name: str, fit: list[str] | None, method: str, seed: int,
             timings: dict[str, float]) -> Path:
    train = str(data / "train" / "*.tar")
    art, out = work / f"{name}-artifact", work / name
    if fit is not None and not (art / "config.json").is_file():
        start = time.perf_counter()
        sh("fit", *fit, train, "-o", str(art), "--seed", str(seed))
        timings[f"fit {name}"] = time.perf_counter() - start
    if not (out / "protection.json").is_file():
        start = time.perf_counter()
        sh("shard", train, "-o", str(out), "-m", method, *(["--artifact", str(art)] if fit else []), "--quiet")
        timings[f"shard {name}"] = time.perf_counter() - start
    return out


def _clip(report: dict) -> dict[str, dict[str, float]]:
    return {d: {"clean_i2t": ci, "clean_t2i": ct, "protected_i2t": pi, "protected_t2i": pt}
            for d, ci, ct, pi, pt in clip_rows(report)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_protocol")
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defense-archs", nargs="+", default=["small_cnn"])
    p.add_argument("--defenses", nargs="*", default=DEFENSES)
    p.add_argument("--clean-fraction", type=float, default=0.2)
    p.add_argument("--clip-defenses", nargs="*", default=["grayscale", "jpeg:10"])
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--docs", default="docs/efficacy")
    a = p.parse_args()
    root = Path(a.workdir)
    work = root / "demo"
    data = work / "data"
    if not (data / "classes.json").is_file():
        sh("demo-data", str(data))
    timing_file = work / "timings-t2ue.json"
    timings: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    configs = {
        "random": (None, "random"),
        "em-class": (["em", "--mode", "class"], "em"),
        "t2ue-sample": (["t2ue"], "t2ue"),
        "t2ue-clusters": (["t2ue", "--clusters", str(a.clusters)], "t2ue"),
    }
    common = dict(epochs=a.epochs, seed=a.seed, cache=work / "run-cache", processes=a.processes)
    results: dict[str, dict] = {name: {"clip": {}, "defenses": {}} for name in configs}
    protected = {name: _protect(work, data, name, fit, method, a.seed, timings)
                 for name, (fit, method) in configs.items()}
    # the headline figures first (CLIP without a defense), then the defense grid, then CLIP's defenses
    for name, out in protected.items():
        start = time.perf_counter()
        results[name]["clip"].update(_clip(evaluate(out, data, work / "reports-t2ue" / name / "clip", archs=["small_cnn"],
                                                    defenses=["none"], task="clip", **common)))
        timings.setdefault(f"eval clip {name}", time.perf_counter() - start)
        timing_file.write_text(json.dumps(timings, indent=2))
        print(f"[t2ue] {name} clip: {json.dumps(results[name]['clip'])}", flush=True)
    for name in ("t2ue-sample", "em-class"):
        out, reports, grid = protected[name], work / "reports-t2ue" / name, results[name]["defenses"]
        start = time.perf_counter()
        report = evaluate(out, data, reports / "defenses", archs=a.defense_archs, defenses=a.defenses, **common)
        for row in report["tasks"]["classify"]["summary"]:
            grid.setdefault(row["defense"], {})[row["arch"]] = {
                "clean": row["clean"]["final_test_acc"]["mean"], "protected": row["protected"]["final_test_acc"]["mean"]}
        if a.clean_fraction:
            report = evaluate(out, data, reports / f"clean-{a.clean_fraction:g}", archs=a.defense_archs,
                              defenses=["none"], clean_fraction=a.clean_fraction, **common)
            for row in report["tasks"]["classify"]["summary"]:
                grid.setdefault(f"{100 * a.clean_fraction:g}% left clean", {})[row["arch"]] = {
                    "clean": row["clean"]["final_test_acc"]["mean"],
                    "protected": row["protected"]["final_test_acc"]["mean"]}
        timings.setdefault(f"eval defenses {name}", time.perf_counter() - start)
        timing_file.write_text(json.dumps(timings, indent=2))
        print(f"[t2ue] {name} defenses: {json.dumps(grid)}", flush=True)
    if a.clip_defenses:
        start = time.perf_counter()
        results["t2ue-sample"]["clip"].update(_clip(evaluate(
            protected["t2ue-sample"], data, work / "reports-t2ue" / "t2ue-sample" / "clip-defenses",
            archs=["small_cnn"], defenses=a.clip_defenses, task="clip", **common)))
        timings.setdefault("eval clip defenses t2ue-sample", time.perf_counter() - start)
        timing_file.write_text(json.dumps(timings, indent=2))

    meta = {"date": time.strftime("%Y-%m-%d"), "commit": _git("rev-parse", "--short", "HEAD"),
            "hardware": _hardware(), "epochs": a.epochs, "seed": a.seed, "clusters": a.clusters,
            "timings": timings}
    lines = [
        "# T2UE on the demo shapes: CLIP from scratch and the defense grid", "",
        f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['hardware']}; written by "
        f"`benchmarks/efficacy_t2ue.py` ({a.epochs} epochs per classifier, the CLIP for eval's default of 4, seed {a.seed}). `t2ue-sample`: `fit t2ue` with no "
        f"options, noise from each caption; `t2ue-clusters`: `fit t2ue --clusters {a.clusters}` (concepts from "
        "caption clusters, as for a corpus without labels). The headline figures under the protocol (held-out "
        "architectures) are in [demo.md](demo.md) and [photos.md](photos.md).", "",
        "## CLIP trained from scratch on the protected pairs (Recall@10 on the clean test pairs)", "",
        "Target: at most half of clean, both directions.", "",
        "| training data | defense | clean i2t / t2i | protected i2t / t2i | protected / clean (worse direction) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for d, c in r["clip"].items():
            ratio = max(c["protected_i2t"] / max(c["clean_i2t"], 1e-9), c["protected_t2i"] / max(c["clean_t2i"], 1e-9))
            lines.append(f"| {name} | {d} | {c['clean_i2t']:.3f} / {c['clean_t2i']:.3f} | "
                         f"{c['protected_i2t']:.3f} / {c['protected_t2i']:.3f} | {ratio:.2f} |")
    lines += ["", f"## Defenses (classifier {', '.join(a.defense_archs)}; clean-trained / protected-trained, %)", "",
              "| defense | " + " | ".join(n for n, r in results.items() if r["defenses"]) + " |",
              "|---|" + "---|" * sum(1 for r in results.values() if r["defenses"])]
    with_grid = [r for r in results.values() if r["defenses"]]
    for d in (with_grid[0]["defenses"] if with_grid else {}):
        cells = []
        for r in with_grid:
            v = r["defenses"].get(d, {})
            cells.append(" ; ".join(f"{arch} {100 * x['clean']:.1f} / {100 * x['protected']:.1f}" for arch, x in v.items()))
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", "## Time (s)", ""] + [f"- {k}: {v:.0f}" for k, v in timings.items()] + [""]
    docs = Path(a.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "t2ue.md").write_text("\n".join(lines), encoding="utf-8")
    (docs / "t2ue.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
