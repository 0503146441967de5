"""Efficacy of UGE: learnable for the authorized network, not for hackers, students or other keys.

On the demo dataset (or, with ``--dataset photos``, the photographs of ``uge-protect
photo-data``; the page is then best named ``--name uge-photos``): fit UGE (authorized small_cnn, a fixed key), protect the training shards,
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

Writes ``docs/efficacy/uge.md`` and ``.json`` (``--docs``), labelled by date, commit and hardware:

    .venv/bin/python benchmarks/efficacy_uge.py [--workdir DIR] [--data DIR] [--epochs 8]
        [--archs small_cnn vgg11 mobilenet_v2 resnet18] [--defenses grayscale jpeg:75 ...]
        [--ablations no-fd no-ud nokey nokey-no-gm] [--processes 2] [--docs docs/efficacy]

Runs are kept under --workdir and the run cache is shared with the other efficacy benchmarks
(same data, same clean models), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from efficacy_common import classify_rows, evaluate, finish, sh, write_table
from efficacy_protocol import _git, _hardware

ABLATIONS = {
    "no-fd": ["--fd-weight", "0"],
    "no-ud": ["--ud-weight", "0"],
    "nokey": ["--no-key-projection"],
    "nokey-no-gm": ["--no-key-projection", "--gm-weight", "0"],
}
#: The default key: fixed and published, so that runs repeat (never protect real data with it).
BENCHMARK_KEY = hashlib.sha256(b"uge-protect benchmark key").hexdigest()
#: What each ablation's fit leaves out, for the page.
ABLATION_TEXT = {
    "no-fd": "without L_fd",
    "no-ud": "without L_ud",
    "nokey": "no key projection, L_gm on (the paper's form)",
    "nokey-no-gm": "no key projection, no L_gm",
}

#: What the method-aware rows are, per key scheme, for the page.
ATTACKER_TEXT = {
    "colour": "`ARCH@enumerated`: it trains `ARCH` behind the projection of every key direction and keeps the run "
              "best on its clean set; `best enumerated`: the best of those runs on the test set (in hindsight); "
              "`ARCH@estimated:STAT`: behind the direction a statistic of the protected images picks against the "
              "attacker's clean set (`hf-energy`: the high-frequency colour energy the protection raises most; "
              "`class-means`: the share of variance between the class means, corrected for chance; `linear-probe`: "
              "the squared weight of a linear probe trained on the protected images); `ARCH@all-keys`: behind the "
              "mean of all projections. A row whose protected-trained accuracy equals its clean-trained one trained "
              "behind the key's own direction, where the noise is removed exactly.",
    "texture": "`ARCH@enumerated`: behind the projection of a random texture key; `ARCH@invariant`: on the 4×4 "
               "block means; `ARCH@fold:block` / `ARCH@fold:image`: on the images less their part of period 4, per "
               "8×8 block / over the whole image; `ARCH@estimated:image-pca`: less each image's top principal 4×4 "
               "texture.",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _role(row: dict) -> str:
    role = row.get("role") or "–"
    return role if row.get("learned", True) else f"{role}, did not learn"


def markdown(results: dict, meta: dict) -> list[str]:
    """The lines of ``uge.md``: ``results`` holds ``rows`` (one per classifier result: ``data``
    (``random``, ``uge``, ``uge (no gate)`` or ``uge-ABLATION``), ``arch``, ``defense``,
    ``role``, ``learned``, ``clean``, ``protected``; accuracies in [0, 1]) and the ``headline``
    of the UGE report without a defense; ``meta`` the run's settings."""
    rows = results["rows"]
    fit_args = " ".join(meta.get("fit_args") or [])
    lines = [
        f"# UGE on the {'photographs' if meta.get('dataset') == 'photos' else 'demo shapes'}: the owner, hackers, "
        "another key, distilled students, a method-aware attacker, defenses, ablations",
        "",
        f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['hardware']}; written by "
        f"`benchmarks/efficacy_uge.py` ({meta['epochs']} epochs per classifier, seed {meta['seed']}; "
        f"`fit uge --authorized {meta['authorized']}` with "
        + ("the benchmark's published key" if meta.get("published_key", True) else "a key given with `--key-seed`")
        + (f" and `{fit_args}`" if fit_args else ", default options otherwise") + "). "
        "Each model was trained on the UGE-protected and on the clean training shards (same seed and "
        "settings) and tested on the clean test shards; accuracy in %. `ARCH+key` is the owner's "
        f"network, `ARCH+key:{meta['other_key']}` the same architecture behind another key, "
        "`STUDENT<-ARCH+key` a student distilled without labels from the owner's network (with its "
        "confidence gate; `uge (no gate)`: from the bare network). How UGE works: "
        "[../methods/uge.md](../methods/uge.md); the held-out protocol's headline: [demo.md](demo.md).",
        "",
    ]
    fit = results.get("fit_architectures")
    if fit is not None:
        names = ", ".join(f"`{n}`" for n in fit) or "nothing"
        lines += [(f"The fit trained against {names}: rows of those architectures are *seen in fit*, "
                   "the others *held out* (the role column)."), ""]
    head = results.get("headline") or {}
    w, o = head.get("worst"), head.get("owner_worst")
    if w or o:
        parts = []
        if w:
            parts.append(f"worst held-out `{w['arch']}` {_pct(w['protected_acc'])} against {_pct(w['clean_acc'])} clean")
        if o:
            parts.append(f"the owner `{o['arch']}` {_pct(o['protected_acc'])} against {_pct(o['clean_acc'])} clean")
        lines += ["Headline of the report without a defense: " + "; ".join(parts) + ".", ""]

    def table(header: list[str], picked: list[dict], first: Callable[[dict], list[str]]) -> list[str]:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * (len(header) - 2) + "---:|---:|"]
        for r in picked:
            cells = [*first(r), f"`{r['arch']}`", _role(r), _pct(r["clean"]), _pct(r["protected"])]
            out.append("| " + " | ".join(cells) + " |")
        return out

    cols = ["model", "role", "clean-trained", "protected-trained"]
    plain = [r for r in rows if r["defense"] == "none" and r["data"] in ("uge", "uge (no gate)", "random")]
    lines += ["## Efficacy (no defense)", ""]
    lines += table(["training data", *cols], plain, lambda r: [r["data"]]) + [""]
    defended = [r for r in rows if r["data"] == "uge" and r["defense"] != "none"]
    if defended:
        lines += ["## Defenses", "",
                  "A data-level defense (grayscale, JPEG) preprocesses the training and the test images alike.", ""]
        lines += table(["defense", *cols], defended, lambda r: [r["defense"]]) + [""]
    lines += method_aware_lines(rows, meta)
    ablated = [r for r in rows if r["data"].startswith("uge-")]
    if ablated:
        lines += ["## Ablations", "", "Each a fit with the default options except the one named.", ""]
        def fit_text(r: dict) -> list[str]:
            name = r["data"][len("uge-"):]
            return [f"{ABLATION_TEXT.get(name, name)} (`{' '.join(ABLATIONS.get(name, []))}`)"]

        lines += table(["fit", *cols], ablated, fit_text) + [""]
    lines += ["## Time (s)", ""] + [f"- {k}: {v:.0f}" for k, v in (meta.get("timings") or {}).items()] + [""]
    return lines


def method_aware_lines(rows: list[dict], meta: dict) -> list[str]:
    """The section of the attacker who knows UGE (``eval --method-aware``): per architecture,
    the enumerated key it keeps (best on its clean set), the best enumerated key in hindsight,
    the estimated key and the average over all keys."""
    aware = [r for r in rows if r["data"] == "uge (method-aware)"]
    if not aware:
        return []
    lines = ["## An attacker who knows the method", "",
             f"The attacker holds the protected shards, the code and a clean labelled "
             f"{100 * meta.get('attacker_fraction', 0.01):g}% of the training set, not the key. "
             + ATTACKER_TEXT[meta.get("key_scheme", "colour")], "",
             "| attacker | clean-trained | protected-trained |", "|---|---:|---:|"]
    for group in dict.fromkeys(r["group"] for r in aware if r.get("group")):
        members = [r for r in aware if r.get("group") == group]
        kept = next(r for r in members if r.get("picked"))
        best = max(members, key=lambda r: r["protected"])
        lines.append(f"| `{group}` (kept `{kept['arch']}`) | {_pct(kept['clean'])} | {_pct(kept['protected'])} |")
        lines.append(f"| `{group}`, best enumerated (`{best['arch']}`) | {_pct(best['clean'])} | "
                     f"{_pct(best['protected'])} |")
    for r in aware:
        if not r.get("group"):
            lines.append(f"| `{r['arch']}` | {_pct(r['clean'])} | {_pct(r['protected'])} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None,
                   help="runs (default: bench_output/efficacy_uge, or bench_output/efficacy_uge_photos for --dataset photos)")
    p.add_argument("--dataset", default="demo", choices=["demo", "photos"],
                   help="the demo shapes or the photographs of `uge-protect photo-data`")
    p.add_argument("--data", default=None,
                   help="the dataset's directory, made when missing (default: bench_output/efficacy_em/data for "
                        "the demo, bench_output/efficacy_uge_photos/data for the photographs)")
    p.add_argument("--cache", default="bench_output/efficacy_em/run-cache", help="run cache shared with efficacy_em")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--authorized", default="small_cnn",
                   help="the owner's architecture (small_cnn: ResNet-18's stock stem reaches only ~56%% on the "
                        "32x32 demo in 8 epochs, too weak a teacher for the distillation row)")
    p.add_argument("--key-seed", default=BENCHMARK_KEY,
                   help="the key, 32+ hex digits (default: a fixed, published benchmark key, so that runs "
                        "repeat; never use a published key to protect real data)")
    p.add_argument("--other-key", type=int, default=99)
    p.add_argument("--archs", nargs="+", default=["small_cnn", "vgg11", "mobilenet_v2", "resnet18"])
    p.add_argument("--distill", nargs="*", default=["vgg11", "small_cnn"])
    p.add_argument("--defenses", nargs="*",
                   default=["grayscale", "jpeg:75", "jpeg:10", "class-mean", "cutout", "mixup", "strong-aug", "adv-train"])
    p.add_argument("--defense-archs", nargs="+", default=["small_cnn"])
    p.add_argument("--clean-fraction", type=float, default=0.2,
                   help="partial protection: this fraction of the training set left clean (0: skip)")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--processes", type=int, default=1, help="evaluate under accelerate launch with N CPU processes")
    p.add_argument("--method-aware-archs", nargs="*", default=["small_cnn", "vgg11", "mlp"],
                   help="architectures of the attacker who knows the method (`eval --method-aware`; empty: skip)")
    p.add_argument("--attacker-fraction", type=float, default=0.01, help="the attacker's clean labelled set")
    p.add_argument("--docs", default="docs/efficacy", help="where uge.md and uge.json go")
    p.add_argument("--name", default="uge", help="write NAME.md/.json (e.g. for a run of a subset)")
    p.add_argument("--key-scheme", default="colour", choices=["colour", "texture"],
                   help="the key of every fit (texture: no ablations, which drop the key projection)")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="extra `fit uge` options (last)")
    a = p.parse_args()
    if a.key_scheme == "texture":
        a.ablations = []
    default_data = "bench_output/efficacy_em/data" if a.dataset == "demo" else "bench_output/efficacy_uge_photos/data"
    default_work = "bench_output/efficacy_uge" + ("_photos" if a.dataset == "photos" else "")
    work, data = Path(a.workdir or default_work), Path(a.data or default_data)
    # timings of earlier, resumed invocations are kept beside the runs
    timing_file = work / "timings.json"
    timings: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    if not (data / "classes.json").is_file():
        sh("demo-data" if a.dataset == "demo" else "photo-data", str(data))
    train = str(data / "train" / "*.tar")

    def protect(name: str, fit_args: list[str]) -> tuple[Path, Path]:
        art, out = work / f"{name}-artifact", work / name
        if not (art / "config.json").is_file():
            start = time.perf_counter()
            sh("fit", "uge", train, "-o", str(art), "--authorized", a.authorized, "--key-seed", str(a.key_seed),
               "--seed", str(a.seed), "--key-scheme", a.key_scheme, *fit_args, *a.fit_args)
            timings[f"fit {name}"] = time.perf_counter() - start
        if not (out / "protection.json").is_file():
            start = time.perf_counter()
            sh("shard", train, "-o", str(out), "-m", "uge", "--artifact", str(art), "--quiet")
            timings[f"shard {name}"] = time.perf_counter() - start
        work.mkdir(parents=True, exist_ok=True)
        timing_file.write_text(json.dumps(timings, indent=2))
        return art, out

    common = dict(epochs=a.epochs, seed=a.seed, cache=Path(a.cache), processes=a.processes)
    table: list[tuple] = []
    rows: list[dict] = []

    def add(name: str, report: dict, defense_label: str | None = None, students_only: bool = False) -> None:
        table.extend((name, arch, defense_label or d, c, pr) for arch, d, c, pr in classify_rows(report)
                     if not students_only or "<-" in arch)
        for r in report["tasks"].get("classify", {}).get("summary", []):
            if students_only and "<-" not in r["arch"]:
                continue  # the rest of that report repeats the gated one's rows
            rows.append({"data": name, "arch": r["arch"], "defense": defense_label or r["defense"],
                         "role": r.get("role"), "learned": r.get("learned", True),
                         "clean": r["clean"]["final_test_acc"]["mean"],
                         "protected": r["protected"]["final_test_acc"]["mean"]})

    random_out = work / "random"
    if not (random_out / "protection.json").is_file():
        sh("shard", train, "-o", str(random_out), "-m", "random", "--quiet")
    add("random", evaluate(random_out, data, work / "reports" / "random", archs=a.archs, defenses=["none"], **common))

    art, out = protect("uge", [])
    owner = ["--authorized", str(art)]
    extra = [*owner, "--other-key", str(a.other_key), *(x for s in a.distill for x in ("--distill", s))]
    main_report = evaluate(out, data, work / "reports" / "uge" / "none", archs=a.archs, defenses=["none"],
                           extra=extra, **common)
    add("uge", main_report)
    if a.distill:  # what the confidence gate does: the same students, from the bare network
        add("uge (no gate)", evaluate(out, data, work / "reports" / "uge" / "no-gate", archs=[], defenses=["none"],
                                      extra=[*owner, "--no-gate", *(x for s in a.distill for x in ("--distill", s))],
                                      **common), students_only=True)
    for d in a.defenses:
        add("uge", evaluate(out, data, work / "reports" / "uge" / d.replace(":", ""), archs=a.defense_archs,
                            defenses=[d], extra=owner, **common))
    if a.clean_fraction:
        report = evaluate(out, data, work / "reports" / "uge" / f"clean-fraction-{a.clean_fraction:g}",
                          archs=a.defense_archs, defenses=["none"], clean_fraction=a.clean_fraction, extra=owner,
                          **common)
        add("uge", report, f"{100 * a.clean_fraction:g}% clean")
    if a.method_aware_archs:
        report = evaluate(out, data, work / "reports" / "uge" / "method-aware", archs=a.method_aware_archs,
                          defenses=["none"], extra=["--method-aware", "--attacker-fraction", str(a.attacker_fraction)],
                          **common)
        for r in report["tasks"]["classify"]["summary"]:
            if "@" in r["arch"]:
                rows.append({"data": "uge (method-aware)", "arch": r["arch"], "defense": "none",
                             "role": r.get("role"), "learned": r.get("learned", True),
                             "clean": r["clean"]["final_test_acc"]["mean"],
                             "protected": r["protected"]["final_test_acc"]["mean"],
                             "attacker_acc": r.get("attacker_acc"), "picked": r.get("picked"), "group": r.get("group")})
    for name in a.ablations:
        art_x, out_x = protect(f"uge-{name}", ABLATIONS[name])
        add(f"uge-{name}", evaluate(out_x, data, work / "reports" / f"uge-{name}", archs=a.defense_archs,
                                    defenses=["none"], extra=["--authorized", str(art_x)], **common))

    finish(work, f"UGE: clean test accuracy of models trained on protected vs clean {a.dataset} shards "
           f"({a.epochs} epochs, seed {a.seed}, authorized {a.authorized})", table, [], timings)
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": _git("rev-parse", "--short", "HEAD"),
            "hardware": _hardware(), "epochs": a.epochs, "seed": a.seed, "authorized": a.authorized,
            "other_key": a.other_key, "key_scheme": a.key_scheme, "published_key": a.key_seed == BENCHMARK_KEY, "archs": a.archs, "distill": a.distill, "defenses": a.defenses,
            "defense_archs": a.defense_archs, "clean_fraction": a.clean_fraction, "ablations": a.ablations,
            "fit_args": a.fit_args, "dataset": a.dataset, "method_aware_archs": a.method_aware_archs,
            "attacker_fraction": a.attacker_fraction, "timings": timings}
    results = {"rows": rows, "headline": main_report.get("headline", {}).get("classify"),
               "fit_architectures": main_report.get("protection", {}).get("fit_architectures")}
    write_table(a.docs, a.name, markdown(results, meta), {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
