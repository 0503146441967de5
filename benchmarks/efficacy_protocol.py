"""Efficacy under the evaluation protocol: held-out architectures, real photographs, worst case.

For each dataset (the generated demo shapes, the photographs of `uge-protect photo-data`) and
each method (the `random` control, EM class-wise and sample-wise, UGE, T2UE from captions and
from class prompts), with the package's
default fit options: fit, protect the training shards, then `uge-protect eval` trains every
hacker architecture on the protected and on the clean shards (same seed and settings) and
tests on the clean test shards. UGE also trains its owner's network (`--authorized`).

Each report marks its rows *seen in fit* (an architecture the method's fit trained against)
or *held out*, leaves out rows that did not learn clean data, and heads with the worst case
over held-out architectures. This script collects those headlines and writes them, with every
row, to ``docs/efficacy/<dataset>.md`` and ``.json``, labelled by date, commit and hardware:

    .venv/bin/python benchmarks/efficacy_protocol.py [--datasets demo photos] [--methods ...]
        [--workdir bench_output/efficacy_protocol] [--epochs 8] [--processes 1] [--docs docs/efficacy]
        [--fit-args METHOD=ARGS ...] [--tag NAME]

Everything finished is kept under --workdir (fits, protected shards, reports, a run cache
shared by the clean-trained models), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

from efficacy_common import evaluate, sh

METHODS = ("random", "em-class", "em-sample", "uge", "t2ue-sample", "t2ue-class")
#: Targets of the protocol (fractions): worst held-out ≤ this × its clean accuracy on the
#: photographs, ≤ this absolute accuracy on the demo; the owner within this of clean.
PHOTO_RATIO, DEMO_ABSOLUTE, OWNER_GAP = 0.5, 0.25, 0.03


def _order(arch: str) -> tuple[int, str]:
    from uge_protect.eval.config import DEFAULT_ARCHS

    return (DEFAULT_ARCHS.index(arch) if arch in DEFAULT_ARCHS else len(DEFAULT_ARCHS), arch)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def _data(work: Path, dataset: str) -> Path:
    data = work / dataset / "data"
    if not (data / "classes.json").is_file():
        sh("demo-data" if dataset == "demo" else "photo-data", str(data))
    return data


def _protect(work: Path, data: Path, method: str, seed: int, timings: dict[str, float], authorized: str,
             fit_args: dict[str, list[str]]) -> tuple[Path, Path | None]:
    """Fit (with the default options and ``fit_args[method]``) and shard; returns the
    protected directory and the artifact."""
    train = str(data / "train" / "*.tar")
    out = work / method
    art = None if method == "random" else work / f"{method}-artifact"
    if art is not None and not (art / "config.json").is_file():
        start = time.perf_counter()
        extra = fit_args.get(method, [])
        if method.startswith("em-"):
            sh("fit", "em", train, "-o", str(art), "--mode", method[3:], "--seed", str(seed), *extra)
        elif method == "t2ue-sample":  # `fit t2ue TRAIN` as a user runs it
            sh("fit", "t2ue", train, "-o", str(art), "--seed", str(seed), *extra)
        elif method == "t2ue-class":  # the class prompts are trained too, for `shard --mode class`
            sh("fit", "t2ue", train, "-o", str(art), "--class-names", str(data / "classes.json"),
               "--seed", str(seed), *extra)
        else:
            sh("fit", "uge", train, "-o", str(art), "--authorized", authorized, "--seed", str(seed), *extra)
        timings[f"fit {method}"] = time.perf_counter() - start
    if not (out / "protection.json").is_file():
        start = time.perf_counter()
        name = method.split("-")[0] if method != "random" else method
        mode = ["--mode", "class", "--class-names", str(data / "classes.json")] if method == "t2ue-class" else []
        sh("shard", train, "-o", str(out), "-m", name, *(["--artifact", str(art)] if art else []), *mode, "--quiet")
        timings[f"shard {method}"] = time.perf_counter() - start
    return out, art


def _verdict(dataset: str, head: dict, method: str) -> str:
    """Whether the worst held-out case meets the protocol's target, and by how much."""
    w = head.get("worst")
    if method == "random":
        return "control: protects nothing (expected near clean)"
    if w is None:
        return head.get("basis", "no held-out row")
    if dataset == "photos":
        limit = PHOTO_RATIO * w["clean_acc"]
        what = f"≤ {100 * PHOTO_RATIO:g}% of clean = {100 * limit:.1f}%"
    else:
        limit = DEMO_ABSOLUTE
        what = f"≤ {100 * DEMO_ABSOLUTE:g}%"
    gap = w["protected_acc"] - limit
    return f"target {what}: {'met' if gap <= 0 else f'missed by {100 * gap:.1f} points'}"


def _markdown(dataset: str, results: dict[str, dict], meta: dict) -> str:
    lines = [
        f"# Efficacy on the {'demo shapes' if dataset == 'demo' else 'photographs'}: worst case over held-out "
        "architectures",
        "",
        f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['hardware']}; written by "
        f"`benchmarks/efficacy_protocol.py` ({meta['epochs']} epochs per classifier, seed {meta['seed']}, "
        "defense none, each method with its default fit options unless the method's name says otherwise; "
        "UGE's owner is `--authorized " + meta["authorized"] + "`).",
        "",
        "Accuracy on the clean test set (%). *Worst held-out*: the highest accuracy any architecture the "
        "fit did not use reached after training on the protected data. Rows that did not learn clean data "
        "(clean accuracy under half of the best clean row, or not clearly above chance) are left out of it. "
        f"Hacker architectures: {', '.join(meta['archs'])} (the `random` control: every default one, to show "
        "which learn this data).",
        "",
        "| method | fit used | worst held-out (protected / clean) | verdict | owner (protected / clean) |",
        "|---|---|---|---|---|",
    ]
    for method, r in results.items():
        head = r["headline"]
        w = head.get("worst")
        worst = f"{w['arch']}: {100 * w['protected_acc']:.1f} / {100 * w['clean_acc']:.1f}" if w else head["basis"]
        o = head.get("owner_worst")
        owner = "–"
        if o:
            gap = o["clean_acc"] - o["protected_acc"]
            owner = (f"{o['arch']}: {100 * o['protected_acc']:.1f} / {100 * o['clean_acc']:.1f} "
                     f"({'within' if gap <= OWNER_GAP else 'not within'} {100 * OWNER_GAP:g} points)")
        fit = ", ".join(r["fit_architectures"] or []) or "nothing"
        lines.append(f"| {method} | {fit} | {worst} | {r['verdict']} | {owner} |")
    lines += ["", "## Every row", "", "| method | arch | role | clean | protected |", "|---|---|---|---:|---:|"]
    for method, r in results.items():
        for row in r["rows"]:
            role = row["role"] + ("" if row["learned"] else ", did not learn")
            lines.append(f"| {method} | {row['arch']} | {role} | {100 * row['clean']:.1f} | {100 * row['protected']:.1f} |")
    lines += ["", "## Time (s)", ""] + [f"- {k}: {v:.0f}" for k, v in meta["timings"].items()] + [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_output/efficacy_protocol")
    p.add_argument("--datasets", nargs="+", default=["demo", "photos"], choices=["demo", "photos"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--archs", nargs="*", default=None, help="hacker architectures (default: eval's)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=1, help="evaluate under accelerate launch with N CPU processes")
    p.add_argument("--docs", default="docs/efficacy", help="where the tables go")
    p.add_argument("--authorized", default="small_cnn", help="UGE's authorized architecture")
    p.add_argument("--fit-args", nargs="*", default=[], metavar="METHOD=ARGS",
                   help="extra fit options of a method, e.g. 'em-class=--pattern-size 8' (for trials)")
    p.add_argument("--tag", default=None,
                   help="write <dataset>-<tag>.md/.json (a trial or a subset of methods) instead of <dataset>.md")
    a = p.parse_args()
    from uge_protect.eval.config import DEFAULT_ARCHS

    archs = list(a.archs) if a.archs else list(DEFAULT_ARCHS)
    fit_args = {m: v.split() for m, v in (item.split("=", 1) for item in a.fit_args)}
    for dataset in a.datasets:
        work = Path(a.workdir) / dataset
        data = _data(Path(a.workdir), dataset)
        # timings of earlier, resumed invocations are kept beside the runs
        timing_file = work / "timings.json"
        timings: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        results: dict[str, dict] = {}
        for method in a.methods:
            out, art = _protect(work, data, method, a.seed, timings, a.authorized, fit_args)
            extra = ["--authorized", str(art)] if method == "uge" and art else []
            start = time.perf_counter()
            # the control runs on every default hacker, to show which ones learn this data at all
            report = evaluate(out, data, work / "reports" / method, defenses=["none"], epochs=a.epochs,
                              archs=sorted(set(archs) | set(DEFAULT_ARCHS), key=_order) if method == "random" else archs,
                              seed=a.seed, cache=work / "run-cache", processes=a.processes, extra=extra)
            if report.get("cached_runs", 0) < len(report["tasks"]["classify"]["runs"]):  # some runs trained now
                timings.setdefault(f"eval {method}", time.perf_counter() - start)
            work.mkdir(parents=True, exist_ok=True)
            timing_file.write_text(json.dumps(timings, indent=2))
            head = report["headline"]["classify"]
            rows = [{"arch": r["arch"], "role": r["role"], "learned": r["learned"],
                     "clean": r["clean"]["final_test_acc"]["mean"], "protected": r["protected"]["final_test_acc"]["mean"]}
                    for r in report["tasks"]["classify"]["summary"]]
            label = method + (f" ({' '.join(fit_args[method])})" if fit_args.get(method) else "")
            results[label] = {"headline": head, "verdict": _verdict(dataset, head, method), "rows": rows,
                               "fit_architectures": report["protection"]["fit_architectures"]}
            print(f"[{dataset}] {method}: {_verdict(dataset, head, method)}", flush=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "commit": _git("rev-parse", "--short", "HEAD"),
                "hardware": _hardware(), "epochs": a.epochs, "seed": a.seed, "archs": archs, "timings": timings,
                "authorized": a.authorized}
        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        name = f"{dataset}-{a.tag}" if a.tag else dataset
        (docs / f"{name}.md").write_text(_markdown(dataset, results, meta), encoding="utf-8")
        (docs / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
        print((docs / f"{name}.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
