"""The dataset card (``README.md``) of a pushed output directory.

The YAML header declares the repository's ``configs`` explicitly: ``default`` is the WebDataset
shards (``shards/*.tar``), ``manifests`` the per-sample parquet manifests. Without explicit
configs the ``datasets`` library picks a loader by the most common file extension, breaks ties
toward parquet, and would serve the manifests as the data. The body says, for people, what
protection was applied (method, ε, fingerprints, counts, failures), how to load the data with
``datasets``, open_clip and a plain PyTorch loader, and, when an evaluation report is staged, its
main table and a figure. The words are in ``templates/dataset_card.md``, a Jinja template that
:meth:`huggingface_hub.DatasetCard.from_template` renders; this module works out what it shows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from uge_protect import __version__
from uge_protect.errors import UserError
from uge_protect.eval.protocol import headline_text
from uge_protect.hub.layout import EVAL_DIR, MANIFESTS_GLOB, SHARDS_GLOB, UploadPlan
from uge_protect.hub.recipes import open_clip_command, pytorch_recipe
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.tario import iter_tar_samples

#: The card's text, a Jinja template rendered by :meth:`huggingface_hub.DatasetCard.from_template`.
TEMPLATE = Path(__file__).with_name("templates") / "dataset_card.md"
IMAGE_EXTENSIONS = ("png", "webp", "jpg", "jpeg")
_LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.+\-]*$")


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "1B<n<10B"


def shard_pattern(names: list[str]) -> str:
    """A brace pattern for shard names (``demo-{000000..000004}.tar``) when they are numbered
    contiguously with one prefix; otherwise the names joined by ``::`` (open_clip and webdataset
    accept both)."""
    names = sorted(names)
    if len(names) == 1:
        return names[0]
    parts = [re.fullmatch(r"(.*?)(\d+)\.tar", n) for n in names]
    if all(parts):
        prefixes = {m.group(1) for m in parts}
        widths = {len(m.group(2)) for m in parts}
        numbers = [int(m.group(2)) for m in parts]
        if len(prefixes) == 1 and len(widths) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            first, last = parts[0].group(2), parts[-1].group(2)
            return f"{prefixes.pop()}{{{first}..{last}}}.tar"
    return "::".join(names)


def _data_summary(plan: UploadPlan) -> dict[str, Any]:
    """Fields of a sample, label count, captions and image sizes, from a shard and the manifests."""
    layout = OutputLayout(plan.root)
    fields: list[str] = []
    for name in sorted(plan.sizes):
        if plan.sizes[name] > 0:
            with open(layout.shard(name), "rb") as fh:
                first = next(iter_tar_samples(fh), None)
            if first is not None:
                fields = list(first.fields)
                break
    # column statistics per manifest (pyarrow.compute: no Python objects per row, fine for large outputs)
    max_label: int | None = None
    captions = 0
    widths: set[int] = set()
    heights: set[int] = set()
    for name in plan.sizes:
        path = layout.manifest(name)
        if not path.is_file():
            continue
        table = pq.read_table(path, columns=["status", "label", "caption", "width", "height"])
        table = table.filter(pc.equal(table["status"], "ok"))
        if table.num_rows == 0:
            continue
        top = pc.max(table["label"]).as_py()
        if top is not None:
            max_label = top if max_label is None else max(max_label, top)
        captions += table.num_rows - table["caption"].null_count
        for col, seen in (("width", widths), ("height", heights)):
            mm = pc.min_max(table[col]).as_py()
            seen.update(v for v in (mm["min"], mm["max"]) if v is not None)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in fields), "png")
    return {
        "fields": fields,
        "image_ext": image_ext,
        "num_classes": max_label + 1 if max_label is not None else 0,
        "has_captions": captions > 0 or "txt" in fields,
        # one square size for every written image: the recipe crops at that size
        "image_size": widths.pop() if len(widths) == 1 and widths == heights else None,
    }



def _fmt_eps(eps: Any) -> str:
    try:
        return f"{float(eps) * 255:.4g}/255"
    except (TypeError, ValueError):
        return "unknown"


def _protection_rows(protection: dict[str, Any], sizes: dict[str, int]) -> list[tuple[str, str]]:
    """The rows of the card's "Protection applied" table."""
    method = protection.get("method") or {}
    settings = protection.get("settings") or {}
    budget = protection.get("budget") or {}
    counts = protection.get("counts") or {}
    psnr = f"{budget['psnr_mean']:.2f} dB" if budget.get("psnr_mean") is not None else "–"
    rows = [
        ("method", f"`{method.get('method', 'unknown')}`"),
        ("budget ε (L∞)", f"{_fmt_eps(budget.get('epsilon', method.get('epsilon')))} "
                          f"({budget.get('levels', '?')} levels; holds for every pixel after quantization)"),
        ("measured L∞ / mean PSNR", f"{budget.get('linf_max', '?')} levels / {psnr}"),
    ]
    for key, label in (("artifact_fingerprint", "artifact fingerprint (sha256)"),
                       ("key_fingerprint", "key fingerprint"),
                       ("authorized", "authorized architecture"),
                       ("authorized_init_fingerprint", "authorized network fingerprint"),
                       ("mode", "mode")):
        if method.get(key) is not None:
            rows.append((label, f"`{method[key]}`"))
    fmt = settings.get("image_format", "png")
    lossy = settings.get("allow_lossy") or fmt == "jpeg"
    rows += [
        ("image format", f"{fmt} ({'lossy: weakens the protection' if lossy else 'lossless'})"),
        ("seed", str(settings.get("seed", "–"))),
        ("shards", str(len(sizes))),
        ("input samples", str(counts.get("samples", "–"))),
        ("written (protected) samples", str(sum(sizes.values()))),
        ("failed samples (not written)", str(counts.get("failed", 0))),
        ("configuration fingerprint", f"`{protection.get('config_fingerprint', '–')}`"),
        ("uge-protect version", str((protection.get("versions") or {}).get("uge-protect", __version__))),
    ]
    return rows


def _classify_rows(summary: list[dict[str, Any]]) -> list[list[str]]:
    """Cells of the classifier table: accuracy trained on clean vs on protected data, and the drop."""
    rows = []
    for row in summary:
        clean = row["clean"]["final_test_acc"]["mean"]
        protected = row["protected"]["final_test_acc"]["mean"]
        role = str(row.get("role", "–")) + ("" if row.get("learned", True) else ", did not learn")
        rows.append([str(row["defense"]), str(row["arch"]), role, f"{100 * clean:.1f}%", f"{100 * protected:.1f}%",
                     f"{100 * (clean - protected):.1f}"])
    return rows


def _clip_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Cells of the CLIP table: Recall@10 image→text / text→image, trained on clean vs on protected pairs."""
    rows = []
    for run in runs:
        cells = []
        for which in ("clean", "protected"):
            res = run.get(which) or {}
            cells.append(" / ".join(f"{(res.get(d) or {}).get('R@10', float('nan')):.3f}" for d in ("i2t", "t2i")))
        rows.append([str(run["defense"]), str(run["seed"]), *cells])
    return rows


def _evaluation(plan: UploadPlan) -> dict[str, Any] | None:
    """What the card's "Evaluation" section shows of the staged report, or None without one."""
    if plan.report is None:
        return None
    r = plan.report.report
    headline = None
    if isinstance(r.get("headline"), dict):
        try:
            headline = headline_text(r)
        except (KeyError, TypeError, ValueError):
            pass  # a report without a well-formed headline: the tables still say it all
    tasks = r.get("tasks") or {}
    summary = (tasks.get("classify") or {}).get("summary") or []
    figures = plan.report.figures
    figure = next((f for f in ("headline.png", "clean_vs_protected.png") if f in figures), figures[0]) if figures else None
    return {
        "headline": headline,
        "classify_rows": _classify_rows(summary),
        "keyed": any("+key" in row["arch"] for row in summary),
        "clip_rows": _clip_rows((tasks.get("clip") or {}).get("runs") or []),
        "figure": figure,
        "figure_name": Path(figure).stem if figure else None,
    }


def _metadata(
    plan: UploadPlan,
    method: str,
    data: dict[str, Any],
    *,
    repo_id: str | None,
    license: str,
    pretty_name: str | None,
    extra_tags: list[str] | None,
) -> DatasetCardData:
    """The card's YAML metadata: license, name, tags, task and size categories, and explicit configs."""
    task_categories = []
    if data["num_classes"]:
        task_categories.append("image-classification")
    if data["has_captions"]:
        task_categories.append("zero-shot-image-classification")
    # the `random` control protects nothing: no unlearnable-examples tag for it
    tags = ["uge-protect", "protected-data", *([] if method == "random" else ["unlearnable-examples"]),
            "webdataset", method, *(extra_tags or [])]
    configs: list[dict[str, Any]] = [
        {"config_name": "default", "default": True, "data_files": [{"split": "train", "path": SHARDS_GLOB}]},
    ]
    if plan.include_manifests:
        configs.append({"config_name": "manifests", "data_files": [{"split": "train", "path": MANIFESTS_GLOB}]})
    return DatasetCardData(
        license=license,
        pretty_name=pretty_name or (repo_id.split("/")[-1] if repo_id else f"{method}-protected images"),
        tags=list(dict.fromkeys(tags)),
        task_categories=task_categories or ["image-classification"],
        size_categories=[size_category(sum(plan.sizes.values()))],
        configs=configs,
    )


def render_dataset_card(
    plan: UploadPlan,
    *,
    repo_id: str | None = None,
    license: str = "unknown",
    pretty_name: str | None = None,
    extra_tags: list[str] | None = None,
) -> str:
    """The ``README.md`` text for ``plan``: YAML metadata with explicit configs, then the body
    (``templates/dataset_card.md``)."""
    if not _LICENSE_RE.match(license):
        raise UserError(f"--license {license!r} is not a Hub license identifier (e.g. cc-by-4.0, mit, other, unknown)")
    method = (plan.protection.get("method") or {}).get("method", "unknown")
    data = _data_summary(plan)
    meta = _metadata(plan, method, data, repo_id=repo_id, license=license, pretty_name=pretty_name,
                     extra_tags=extra_tags)
    pattern = shard_pattern(list(plan.sizes))
    local = f"data/shards/{pattern}"
    failures = plan.protection.get("failures") or {}
    card = DatasetCard.from_template(
        meta,
        template_path=str(TEMPLATE),
        method=method,
        protection_rows=_protection_rows(plan.protection, plan.sizes),
        failures=", ".join(f"`{k}` {v}" for k, v in sorted(failures.items())),
        pattern=pattern,
        fields=", ".join(f"`{f}`" for f in data["fields"]) or "(no samples)",
        include_manifests=plan.include_manifests,
        manifests_glob=MANIFESTS_GLOB,
        repo=repo_id or "OWNER/NAME",
        image_ext=data["image_ext"],
        open_clip_command=open_clip_command(local, len(plan.sizes)) if data["has_captions"] else None,
        pytorch_recipe=(pytorch_recipe(local, data["image_ext"], data["num_classes"], data["image_size"]).rstrip()
                        if data["num_classes"] else None),
        eval_dir=EVAL_DIR,
        evaluation=_evaluation(plan),
        version=__version__,
    )
    return str(card)
