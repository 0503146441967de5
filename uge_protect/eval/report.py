"""Write an evaluation's report.json, report.md (tables) and PNG figures (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from uge_protect.atomic import atomic_write
from uge_protect.eval.protocol import headline_text

FIG_CURVES = "accuracy_per_epoch.png"
FIG_BARS = "clean_vs_protected.png"
FIG_GRID = "samples_grid.png"
FIG_HEADLINE = "headline.png"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    return obj


def _ms(stat: dict[str, Any]) -> str:
    """'mean ± std' in percent (just the mean for one value)."""
    if stat["n"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{100 * stat['mean']:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the headline, the settings, the notes, one section per task, the figures."""
    lines = _md_header(report)
    cls = report["tasks"].get("classify")
    if cls:
        lines += _md_classify(cls, report["settings"]["repeats"])
    clip = report["tasks"].get("clip")
    if clip:
        lines += _md_clip(clip)
    figs = [f for f in (report.get("files") or {}).get("figures", [])]
    if figs:
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figs] + [""]
    return "\n".join(lines)


def _md_header(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    d = report["data"]
    method = (report.get("protection") or {}).get("method") or {}
    fit = (report.get("protection") or {}).get("fit_architectures")
    lines = [
        f"**{headline_text(report)}**",
        "",
        "# uge-protect evaluation",
        "",
        f"- the fit used: {', '.join(f'`{a}`' for a in fit) if fit else ('no network' if fit == [] else 'not recorded')}"
        " (rows of these architectures are marked *seen in fit* and do not count in the headline)",
        f"- protected: `{report['protection']['directory']}` (method `{method.get('method', 'unknown')}`)",
        f"- training samples: protected {d['protected_train']['n']}, clean {d['clean_train']['n']}; "
        f"test {d['test']['n']} (clean); {d['num_classes']} classes; images {'×'.join(map(str, d['image_shape']))}",
        f"- partial protection: {100 * d['partial_protection']['clean_fraction_actual']:.1f}% of the protected "
        f"training samples replaced by their clean versions ({d['partial_protection']['n_replaced_by_clean']})",
        f"- epochs {s['epochs']}, batch {s['batch_size']}, {s['optimizer']} lr {s['lr']} ({s['schedule']}), "
        f"weight decay {s['weight_decay']}, crop padding {s['crop_padding']}, flip {'on' if s['flip'] else 'off'}, "
        f"seed {s['seed']}, repeats {s['repeats']}, device {s['device']}",
        f"- adversarial training: PGD ε {s['adv_epsilon']:.4f} ({255 * s['adv_epsilon']:.1f}/255), "
        f"step {255 * s['adv_step']:.1f}/255, {s['adv_steps']} steps (used by the adv-train defense only)",
        f"- runtime: {report.get('runtime_seconds', 0):.0f} s",
        "",
    ]
    for note in report.get("notes", []):
        lines.append(f"> {note}")
    lines.append("")
    return lines


def _md_classify(cls: dict[str, Any], rep: int) -> list[str]:
    lines = [
        "## Classification: clean test accuracy (%)",
        "",
        f"Mean ± sample std over {rep} repeat(s). *Drop* = clean − protected (final); a protection works "
        "when the protected column is far below the clean one for every *held-out* row. A row whose clean "
        "accuracy is under half of its defense's best clean row *did not learn* and is left out of the headline.",
        "",
        "| defense | arch | role | clean final | protected final | drop | clean best | protected best |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in cls["summary"]:
        c, p = row["clean"], row["protected"]
        row_role = row.get("role", "–") + ("" if row.get("learned", True) else ", did not learn")
        lines.append(
            f"| {row['defense']} | {row['arch']} | {row_role} | {_ms(c['final_test_acc'])} | {_ms(p['final_test_acc'])} | "
            f"{100 * row['drop_final_test_acc']:.1f} | {_ms(c['best_test_acc'])} | {_ms(p['best_test_acc'])} |"
        )
    lines += ["", "### Test accuracy per epoch (%, mean over repeats)", ""]
    n_ep = len(cls["summary"][0]["clean"]["per_epoch_test_acc_mean"]) if cls["summary"] else 0
    lines.append("| defense | arch | train data | " + " | ".join(str(e + 1) for e in range(n_ep)) + " |")
    lines.append("|---|---|---|" + "---:|" * n_ep)
    for row in cls["summary"]:
        for which in ("clean", "protected"):
            accs = row[which]["per_epoch_test_acc_mean"]
            lines.append(f"| {row['defense']} | {row['arch']} | {which} | "
                         + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    lines.append("")
    return lines


def _md_clip(clip: dict[str, Any]) -> list[str]:
    lines = [
        "## CLIP trained from scratch: retrieval on clean test pairs",
        "",
        f"CLIP architecture `{clip.get('arch', 'clip')}`: "
        f"{clip['runs'][0].get('role', '–') if clip['runs'] else '–'}.",
        "",
        "| defense | seed | train data | i2t R@1 | i2t R@5 | i2t R@10 | i2t median rank | "
        "t2i R@1 | t2i R@5 | t2i R@10 | t2i median rank | zero-shot acc |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in clip["runs"]:
        for which in ("clean", "protected"):
            r = run.get(which) or {}
            cells = []
            for direction in ("i2t", "t2i"):
                m = r.get(direction) or {}
                cells += [_num(m.get("R@1"), pct=True), _num(m.get("R@5"), pct=True),
                          _num(m.get("R@10"), pct=True), _num(m.get("median_rank"))]
            zs = r.get("zero_shot_accuracy", r.get("zero_shot"))
            cells.append(_num(zs, pct=True))
            lines.append(f"| {run['defense']} | {run['seed']} | {which} | " + " | ".join(cells) + " |")
    if clip.get("skipped_defenses"):
        lines.append("")
        lines.append(f"Not run for CLIP (training-time classifier defenses): {', '.join(clip['skipped_defenses'])}.")
    lines.append("")
    return lines


def _num(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):  # e.g. {"accuracy": ...}
        v = v.get("accuracy", v.get("top1"))
        if v is None:
            return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{100 * f:.1f}" if pct else f"{f:g}"


# ----------------------------------------------------------------------------- figures


def plot_headline(report: dict[str, Any], path: Path) -> None:
    """The headline figure: per classifier row, the clean-trained accuracy and the highest
    protected-trained accuracy over the defenses; held-out rows in colour, seen and owner rows
    grey and hatched, rows that did not learn left out; a line at the worst held-out case."""
    plt = _plt()
    summary = [r for r in report["tasks"]["classify"]["summary"] if r.get("learned", True)]
    archs = list(dict.fromkeys(r["arch"] for r in summary))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(archs) + 2.5), 3.8))
    for i, arch in enumerate(archs):
        rows = [r for r in summary if r["arch"] == arch]
        worst = max(rows, key=lambda r: r["protected"]["final_test_acc"]["mean"])
        held = worst.get("role") in ("held out", "fit not recorded")
        colour = "tab:red" if held else "0.6"
        ax.bar(i - 0.2, 100 * worst["clean"]["final_test_acc"]["mean"], 0.4, color="tab:blue" if held else "0.8",
               edgecolor="black", linewidth=0.4, label="trained on clean" if i == 0 else None)
        ax.bar(i + 0.2, 100 * worst["protected"]["final_test_acc"]["mean"], 0.4, color=colour,
               hatch=None if held else "//", edgecolor="black", linewidth=0.4,
               label="trained on protected (best defense)" if i == 0 else None)
    worst = ((report.get("headline") or {}).get("classify") or {}).get("worst")
    if worst:
        basis = report["headline"]["classify"]["basis"]
        ax.axhline(100 * worst["protected_acc"], color="tab:red", linestyle="--", linewidth=1,
                   label=f"worst case over {basis}: {100 * worst['protected_acc']:.1f}%")
    ax.set_xticks(range(len(archs)))
    ax.set_xticklabels([f"{a}\n({next(r for r in summary if r['arch'] == a).get('role', '')})" for a in archs],
                       fontsize=7)
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("held-out architectures (colour) vs seen in fit / owner (grey)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if archs:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summary: list[dict[str, Any]], path: Path) -> None:
    """One panel per defense: test accuracy per epoch, a colour per arch, solid clean, dashed protected."""
    plt = _plt()
    defenses = list(dict.fromkeys(r["defense"] for r in summary))
    archs = list(dict.fromkeys(r["arch"] for r in summary))
    cols = min(3, len(defenses))
    rows = math.ceil(len(defenses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, defense in enumerate(defenses):
        ax = axes[k // cols][k % cols]
        for row in (r for r in summary if r["defense"] == defense):
            c = colors[archs.index(row["arch"]) % len(colors)]
            for which, style in (("clean", "-"), ("protected", "--")):
                accs = [100 * a for a in row[which]["per_epoch_test_acc_mean"]]
                ax.plot(range(1, len(accs) + 1), accs, style, color=c, marker="o", markersize=3,
                        label=f"{row['arch']} {which}")
        ax.set_title(f"defense: {defense}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(defenses), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(summary: list[dict[str, Any]], path: Path) -> None:
    """Final clean test accuracy per defense: clean vs protected bars for each arch (error bars: std)."""
    plt = _plt()
    defenses = list(dict.fromkeys(r["defense"] for r in summary))
    archs = list(dict.fromkeys(r["arch"] for r in summary))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(defenses) * len(archs) ** 0.5 + 2), 3.8))
    group = 2 * len(archs)
    width = 0.8 / group
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, arch in enumerate(archs):
        for w, which in enumerate(("clean", "protected")):
            xs, ys, es = [], [], []
            for i, defense in enumerate(defenses):
                row = next(r for r in summary if r["defense"] == defense and r["arch"] == arch)
                st = row[which]["final_test_acc"]
                xs.append(i - 0.4 + width * (2 * j + w + 0.5))
                ys.append(100 * st["mean"])
                es.append(100 * st["std"] if st["n"] > 1 else 0.0)
            ax.bar(xs, ys, width, yerr=es, color=colors[j % len(colors)], alpha=1.0 if which == "clean" else 0.45,
                   hatch=None if which == "clean" else "//", edgecolor="black", linewidth=0.4,
                   label=f"{arch} {which}")
    ax.set_xticks(range(len(defenses)))
    ax.set_xticklabels(defenses)
    ax.set_ylabel("final clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("trained on clean vs protected data, per defense")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(archs)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(clean: torch.Tensor, protected: torch.Tensor, path: Path, amplify: float = 10.0) -> None:
    """Rows: clean, protected, and the perturbation × ``amplify`` around mid-grey."""
    plt = _plt()
    n = clean.shape[0]
    delta = protected.float() - clean.float()
    noise = (127.5 + amplify * delta).clamp(0, 255).to(torch.uint8)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 1.2, 4.2), squeeze=False)
    for r, (name, imgs) in enumerate((("clean", clean), ("protected", protected), (f"noise ×{amplify:g}", noise))):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    linf = int(delta.abs().max()) if delta.numel() else 0
    fig.suptitle(f"clean / protected / perturbation ×{amplify:g} (L∞ = {linf}/255)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: str | Path, *,
                 samples: tuple[torch.Tensor, torch.Tensor] | None = None, figures: bool = True) -> dict[str, Any]:
    """Write figures, report.md and report.json into ``out``; return the file names (also stored in the report)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[str] = []
    if figures:
        cls = report["tasks"].get("classify")
        if cls and cls["summary"]:
            plot_headline(report, out / FIG_HEADLINE)
            figs.append(FIG_HEADLINE)
            plot_curves(cls["summary"], out / FIG_CURVES)
            plot_bars(cls["summary"], out / FIG_BARS)
            figs += [FIG_CURVES, FIG_BARS]
        if samples is not None:
            plot_grid(samples[0], samples[1], out / FIG_GRID)
            figs.append(FIG_GRID)
    files = {"json": "report.json", "markdown": "report.md", "figures": figs}
    report["files"] = files
    atomic_write(out / "report.md", render_markdown(report))
    atomic_write(out / "report.json", json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False))
    return files
