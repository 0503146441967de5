"""The dataset card (``README.md``) of a pushed output directory.

The YAML header declares the repository's ``configs`` explicitly: ``default`` is the WebDataset
shards (``shards/*.tar``), ``manifests`` the per-sample parquet manifests. Without explicit
configs the ``datasets`` library picks a loader by the most common file extension, breaks ties
toward parquet, and would serve the manifests as the data. The body says, for people, what
protection was applied (method, ε, fingerprints, counts, failures), how to load the data with
``datasets``, open_clip and a plain PyTorch loader, and, when an evaluation report is staged, its
main table and a figure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from uge_protect import __version__
from uge_protect.errors import UserError
from uge_protect.shards.layout import OutputLayout
from uge_protect.shards.tario import iter_tar_samples

if TYPE_CHECKING:
    from uge_protect.hub.staging import UploadPlan

IMAGE_EXTENSIONS = ("png", "webp", "jpg", "jpeg")
_LICENSE_RE = re.compile(r"^[a-z0-9][a-z0-9.+\-]*$")

#: One sentence per method for people reading the card; the numbers are in the evaluation.
METHOD_DESCRIPTIONS = {
    "random": "**`random` is a control: uniform noise within the budget that does not protect anything.** "
              "It exists to compare protections against noise alone.",
    "em": "Error-minimizing noise (EM; Huang et al., ICLR 2021): noise fitted so that a model trained on these "
          "images learns the noise instead of their content.",
    "t2ue": "Text-to-Unlearnable Examples (T2UE; arXiv 2508.03091): noise generated from each caption by a "
            "text-conditioned generator, so that a model trained on the pairs learns the noise instead of the content.",
    "uge": "Ungeneralizable Examples (UGE; Ye & Wang, CVPR 2024): the data stays learnable for the owner's "
           "authorized network (kept private, named here only by fingerprints) and is meant to be unlearnable "
           "for every other network.",
}


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


def _data_summary(plan: "UploadPlan") -> dict[str, Any]:
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


def pytorch_recipe(urls: str, image_ext: str, num_classes: int, image_size: int | None) -> str:
    """The PyTorch classifier recipe of the card and the README: a ``webdataset`` pipeline in a
    ``torch.utils.data.DataLoader``, and a training loop."""
    if image_size:
        crop = f"transforms.RandomCrop({image_size}, padding={max(1, image_size // 8)}),"
    else:
        crop = "transforms.RandomResizedCrop(224),  # images of several sizes: make them one size"
    return f'''import torch
import webdataset as wds
from torchvision import transforms

urls = "{urls}"
augment = transforms.Compose([
    {crop}
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
])
dataset = (
    wds.WebDataset(urls, shardshuffle=100, nodesplitter=wds.split_by_node)
    .shuffle(1000)
    .decode("pil")
    .to_tuple("{image_ext}", "cls")
    .map_tuple(augment, int)
)
loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)

model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, {num_classes}),
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for epoch in range(1):
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
'''


def open_clip_command(train_data: str, n_shards: int) -> str:
    """open_clip's own training entry point on the shards; it reads ``sizes.json`` by itself."""
    workers = max(1, min(4, n_shards))
    return (f"python -m open_clip_train.main --dataset-type webdataset \\\n"
            f"    --train-data '{train_data}' \\\n"
            f"    --model RN50 --batch-size 256 --workers {workers} --epochs 32")


def _fmt_eps(eps: Any) -> str:
    try:
        return f"{float(eps) * 255:.4g}/255"
    except (TypeError, ValueError):
        return "unknown"


def _protection_table(protection: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    method = protection.get("method") or {}
    settings = protection.get("settings") or {}
    budget = protection.get("budget") or {}
    counts = protection.get("counts") or {}
    rows = [
        ("method", f"`{method.get('method', 'unknown')}`"),
        ("budget ε (L∞)", f"{_fmt_eps(budget.get('epsilon', method.get('epsilon')))} "
                          f"({budget.get('levels', '?')} levels; holds for every pixel after quantization)"),
        ("measured L∞ / mean PSNR", f"{budget.get('linf_max', '?')} levels / "
                                    + (f"{budget['psnr_mean']:.2f} dB" if budget.get("psnr_mean") is not None else "–")),
    ]
    for key, label in (("artifact_fingerprint", "artifact fingerprint (sha256)"),
                       ("key_fingerprint", "key fingerprint"),
                       ("authorized", "authorized architecture"),
                       ("authorized_init_fingerprint", "authorized network fingerprint"),
                       ("mode", "mode")):
        if method.get(key) is not None:
            rows.append((label, f"`{method[key]}`"))
    fmt = settings.get("image_format", "png")
    rows += [
        ("image format", f"{fmt} ({'lossy: weakens the protection' if settings.get('allow_lossy') or fmt == 'jpeg' else 'lossless'})"),
        ("seed", str(settings.get("seed", "–"))),
        ("shards", str(len(sizes))),
        ("input samples", str(counts.get("samples", "–"))),
        ("written (protected) samples", str(sum(sizes.values()))),
        ("failed samples (not written)", str(counts.get("failed", 0))),
        ("configuration fingerprint", f"`{protection.get('config_fingerprint', '–')}`"),
        ("uge-protect version", str((protection.get("versions") or {}).get("uge-protect", __version__))),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    failures = protection.get("failures") or {}
    if failures:
        lines += ["", "Samples that could not be protected were left out (never published unprotected); "
                      "by reason: " + ", ".join(f"`{k}` {v}" for k, v in sorted(failures.items())) + "."]
    return lines


def _eval_section(plan: "UploadPlan", eval_dir: str) -> list[str]:
    report = plan.report
    if report is None:
        return []
    r = report.report
    lines = ["## Evaluation", "",
             "Models trained on the protected and on the clean training data with the same seed and settings, "
             "tested on **clean** held-out data (from `uge-protect eval`). "
             f"Full report: [`{eval_dir}/report.md`]({eval_dir}/report.md), numbers in "
             f"[`{eval_dir}/report.json`]({eval_dir}/report.json).", ""]
    if isinstance(r.get("headline"), dict):
        from uge_protect.eval.protocol import headline_text

        try:
            lines += [f"**{headline_text(r)}**", ""]
        except (KeyError, TypeError, ValueError):
            pass  # a report without a well-formed headline: the table below still says it all
    cls = (r.get("tasks") or {}).get("classify")
    if cls and cls.get("summary"):
        lines += ["| defense | model | role | trained on clean | trained on protected | drop |",
                  "|---|---|---|---:|---:|---:|"]
        for row in cls["summary"]:
            c = row["clean"]["final_test_acc"]["mean"]
            p = row["protected"]["final_test_acc"]["mean"]
            role = str(row.get("role", "–")) + ("" if row.get("learned", True) else ", did not learn")
            lines.append(f"| {row['defense']} | {row['arch']} | {role} | {100 * c:.1f}% | {100 * p:.1f}% | "
                         f"{100 * (c - p):.1f} |")
        lines.append("")
        if any("+key" in row["arch"] for row in cls["summary"]):
            lines += ["`ARCH+key` is the owner's authorized network; `ARCH+key:N` the same architecture with "
                      "another key; `STUDENT<-ARCH+key` a student distilled from the owner's network without labels.", ""]
    clip = (r.get("tasks") or {}).get("clip")
    if clip and clip.get("runs"):
        lines += ["CLIP trained from scratch, Recall@10 on clean test pairs (image→text / text→image):", "",
                  "| defense | seed | trained on clean | trained on protected |", "|---|---:|---:|---:|"]
        for run in clip["runs"]:
            cells = []
            for which in ("clean", "protected"):
                res = run.get(which) or {}
                cells.append(" / ".join(f"{(res.get(d) or {}).get('R@10', float('nan')):.3f}" for d in ("i2t", "t2i")))
            lines.append(f"| {run['defense']} | {run['seed']} | {cells[0]} | {cells[1]} |")
        lines.append("")
    figures = report.figures
    if figures:
        fig = next((f for f in ("headline.png", "clean_vs_protected.png") if f in figures), figures[0])
        lines += [f"![{Path(fig).stem}]({eval_dir}/{fig})", ""]
    return lines


def render_dataset_card(
    plan: "UploadPlan",
    *,
    repo_id: str | None = None,
    license: str = "unknown",
    pretty_name: str | None = None,
    extra_tags: list[str] | None = None,
) -> str:
    """The ``README.md`` text for ``plan``: YAML metadata with explicit configs, then the body."""
    from uge_protect.hub.staging import EVAL_DIR

    if not _LICENSE_RE.match(license):
        raise UserError(f"--license {license!r} is not a Hub license identifier (e.g. cc-by-4.0, mit, other, unknown)")
    method = (plan.protection.get("method") or {}).get("method", "unknown")
    data = _data_summary(plan)
    n_written = sum(plan.sizes.values())
    task_categories = []
    if data["num_classes"]:
        task_categories.append("image-classification")
    if data["has_captions"]:
        task_categories.append("zero-shot-image-classification")
    # the `random` control protects nothing: no unlearnable-examples tag for it
    tags = ["uge-protect", "protected-data", *([] if method == "random" else ["unlearnable-examples"]),
            "webdataset", method, *(extra_tags or [])]
    configs: list[dict[str, Any]] = [
        {"config_name": "default", "default": True, "data_files": [{"split": "train", "path": "shards/*.tar"}]},
    ]
    if plan.include_manifests:
        configs.append({"config_name": "manifests", "data_files": [{"split": "train", "path": "manifests/*.parquet"}]})
    meta: dict[str, Any] = {
        "license": license,
        "pretty_name": pretty_name or (repo_id.split("/")[-1] if repo_id else f"{method}-protected images"),
        "tags": list(dict.fromkeys(tags)),
        "task_categories": task_categories or ["image-classification"],
        "size_categories": [size_category(n_written)],
        "configs": configs,
    }
    repo = repo_id or "OWNER/NAME"
    pattern = shard_pattern(list(plan.sizes))
    fields = ", ".join(f"`{f}`" for f in data["fields"]) or "(no samples)"
    body = [
        f"# {meta['pretty_name']}",
        "",
        f"Every image in this dataset carries a small, bounded perturbation added by "
        f"uge-protect (method `{method}`). The images look the same to people; "
        "captions, labels and all other fields are byte-for-byte those of the source data.",
        "",
        METHOD_DESCRIPTIONS.get(method, f"Method `{method}`."),
        "",
        "## Protection applied",
        "",
        *_protection_table(plan.protection, plan.sizes),
        "",
        "Secrets (a UGE key, an authorized network's weights) are never published: only their fingerprints.",
        "",
        "## Files",
        "",
        "| path | what |",
        "|---|---|",
        f"| `shards/{pattern}` | WebDataset shards; each sample has {fields} (images lossless unless noted above) |",
        "| `shards/sizes.json` | samples per shard (what open_clip reads) |",
    ]
    if plan.include_manifests:
        body.append("| `manifests/*.parquet` | one row per input sample: key, shard, status and failure reason, caption, "
                    "label, size, measured L∞ and PSNR, sha256 of the original and protected image bytes |")
    body += [
        "| `stats/*.json`, `run.json`, `protection.json` | per-shard completion markers, the run's configuration and "
        "the protection summary; `uge-protect inspect DIR --no-sources` verifies a downloaded copy |",
    ]
    if plan.report is not None:
        body.append(f"| `{EVAL_DIR}/` | the evaluation report (JSON, Markdown, figures) |")
    body += [
        "",
        "## How to load it",
        "",
        "### 🤗 datasets",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo}", split="train")  # the WebDataset shards (default config)',
        f'print(ds[0]["{data["image_ext"]}"], ds[0].get("txt"), ds[0].get("cls"))',
    ]
    if plan.include_manifests:
        body += [
            "# the manifests: the `datasets` library uses one loader per repository (here: webdataset),",
            "# so load them by their files rather than by the `manifests` config name",
            f'manifests = load_dataset("{repo}", data_files={{"train": "manifests/*.parquet"}}, split="train")',
        ]
    body += [
        "```",
        "",
        "### Local copy (for open_clip and PyTorch)",
        "",
        "```bash",
        f"hf download {repo} --repo-type dataset --local-dir data",
        "```",
        "",
    ]
    if data["has_captions"]:
        body += [
            "### open_clip",
            "",
            "open_clip's training program reads the shards as they are: `txt` captions, "
            f"`{data['image_ext']}` images and `shards/sizes.json` (so no `--train-num-samples`). "
            "It needs at least as many shards as `--workers` × processes.",
            "",
            "```bash",
            open_clip_command(f"data/shards/{pattern}", len(plan.sizes)),
            "```",
            "",
        ]
    if data["num_classes"]:
        body += [
            "### PyTorch (a classifier on the `cls` labels)",
            "",
            "```python",
            pytorch_recipe(f"data/shards/{pattern}", data["image_ext"], data["num_classes"], data["image_size"]).rstrip(),
            "```",
            "",
            "Several GPUs or machines: `split_by_node` gives each process its own shards "
            "(it reads `RANK`/`WORLD_SIZE`), and the DataLoader's workers split them further.",
            "",
        ]
    body += _eval_section(plan, EVAL_DIR)
    body += [
        "## Notes",
        "",
        "- Re-encoding the images lossily (JPEG) or training with defenses can weaken a protection; the "
        "evaluation (when present) reports what was measured, and only that.",
        f"- Made with uge-protect {__version__}.",
        "",
    ]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{header}---\n\n" + "\n".join(body)
