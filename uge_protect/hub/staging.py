"""Choosing what of an output directory goes to the Hub, and laying it out.

Only files the pipeline (and ``uge-protect eval``) wrote to be read by others are staged, and
only for shards that are complete:

- ``shards/<name>.tar`` and ``shards/sizes.json``: the shards named in ``sizes.json``, each with
  its completion marker (``stats/<name>.json``) written under the directory's configuration and
  matching the shard's size. Shards without any written sample are left out (with their
  markers, and from the staged ``sizes.json``): ``datasets`` cannot read a dataset whose first
  shard is empty;
- ``manifests/<name>.parquet`` of every shard, empty ones included (left out with
  ``include_manifests=False``);
- ``stats/<name>.json``, ``run.json`` and ``protection.json``, so that a downloaded copy verifies
  with ``uge-protect inspect --no-sources``;
- an evaluation report, staged under ``eval/`` (``report.json``, ``report.md``, its figures);
- ``README.md``, the dataset card, generated (:mod:`uge_protect.hub.card`).

Temporary files of interrupted writes, the lock file, shards without a completion marker and
anything else in the directory are never staged. A JSON file that holds a secret field (a UGE
``key_seed``) stops the staging: published outputs carry fingerprints only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from uge_protect.errors import UserError
from uge_protect.hub.card import render_dataset_card
from uge_protect.hub.layout import CARD_NAME, EVAL_DIR, EvalReport, StagedFile, UploadPlan
from uge_protect.shards.layout import OutputLayout, outside_link, read_json
from uge_protect.shards.lock import DirectoryLock

#: Hub limits (https://huggingface.co/docs/hub/repositories-recommendations, storage-limits).
MAX_FILE_BYTES = 50 * 1000**3  # hard limit per file
RECOMMENDED_FILE_BYTES = 20 * 1000**3  # above this the Hub advises splitting
MAX_ENTRIES_PER_FOLDER = 10_000
MAX_FILES_PER_REPO = 100_000

#: JSON fields that hold secrets; their presence in a staged file is an error.
SECRET_FIELDS = frozenset({"key_seed", "secret", "token", "hf_token", "password", "api_key"})


class ReadLock:
    """A shared lock on ``DIR/.lock`` (see :mod:`uge_protect.shards.lock`): no ``shard`` run can
    start writing while it is held, and taking it fails while one is writing."""

    def __init__(self, root: Path):
        path = OutputLayout(root).lock_file
        self._lock = DirectoryLock(
            path, shared=True,
            busy_message=f"a uge-protect run is writing to {path.parent}; wait for it to finish, then push",
        )

    def __enter__(self) -> "ReadLock":
        if self._lock.path.is_file():
            self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def find_report(root: Path, report_dir: Path | None = None) -> EvalReport | None:
    """The evaluation report to publish: ``report_dir`` if given, else ``DIR/eval/``, else the one
    subdirectory of DIR holding a uge-protect ``report.json`` (several: an error asking for ``--report``)."""
    if report_dir is not None:
        if not (report_dir / "report.json").is_file():
            raise UserError(f"--report {report_dir}: no report.json there (a report directory of `uge-protect eval`)")
        return _load_report(report_dir)
    if (root / EVAL_DIR / "report.json").is_file():
        return _load_report(root / EVAL_DIR)
    found = sorted(p.parent for p in root.glob("*/report.json") if _is_eval_report(p))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{root} holds several evaluation reports ({names}); pick one with --report DIR")
    return _load_report(found[0]) if found else None


def _is_eval_report(path: Path) -> bool:
    try:
        return read_json(path).get("kind") == "uge-protect evaluation"
    except (OSError, ValueError, AttributeError):
        return False


def _load_report(directory: Path) -> EvalReport:
    try:
        report = read_json(directory / "report.json")
    except ValueError as exc:
        raise UserError(f"{directory / 'report.json'} is not valid JSON ({exc})") from None
    if not isinstance(report, dict) or report.get("kind") != "uge-protect evaluation":
        raise UserError(f"{directory / 'report.json'} is not a report of `uge-protect eval`")
    figures = [Path(f).name for f in (report.get("files") or {}).get("figures", [])]
    return EvalReport(directory, report, [f for f in figures if (directory / f).is_file()])


def find_secret_fields(data: Any, where: str = "") -> list[str]:
    """Paths of JSON fields named like secrets (``key_seed``, ``token``, ...), recursively."""
    found: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{where}.{k}" if where else str(k)
            if str(k).lower() in SECRET_FIELDS:
                found.append(path)
            found.extend(find_secret_fields(v, path))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found.extend(find_secret_fields(v, f"{where}[{i}]"))
    return found


def _check_json_public(path: Path, label: str) -> dict[str, Any]:
    try:
        data = read_json(path)
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    secrets = find_secret_fields(data)
    if secrets:
        raise UserError(
            f"{label} holds secret fields ({', '.join(secrets[:5])}); it must never be published, "
            "so nothing was staged"
        )
    return data


def _shard_files(layout: OutputLayout, sizes: dict[str, Any], run: dict[str, Any],
                 include_manifests: bool) -> list[StagedFile]:
    """The manifests, shards and completion markers of the run's shards, each checked complete."""
    root = layout.root
    files: list[StagedFile] = []
    for name in sorted(sizes):
        shard = layout.shard(name)
        stats_path = layout.stats(name)
        if not shard.is_file() or not stats_path.is_file():
            state = "missing" if not shard.is_file() else "not complete (no stats file)"
            raise UserError(f"shard {name} is listed in sizes.json but {state}; "
                            "rerun the same `uge-protect shard` command")
        stats = _check_json_public(stats_path, f"stats/{stats_path.name}")
        if stats.get("config_fingerprint") != run.get("fingerprint"):
            raise UserError(f"shard {name} was written under another configuration; rerun `uge-protect shard` on {root}")
        if stats.get("bytes") is not None and int(stats["bytes"]) != shard.stat().st_size:
            raise UserError(f"shard {name} does not match its completion marker (size); "
                            f"check it with `uge-protect inspect {root}`")
        if int(stats.get("written", -1)) != int(sizes[name]):
            raise UserError(f"sizes.json and stats/{stats_path.name} disagree on {name}; "
                            f"check the directory with `uge-protect inspect {root}`")
        if include_manifests:
            manifest = layout.manifest(name)
            if not manifest.is_file():
                raise UserError(f"the manifest of {name} is missing ({manifest}); rerun `uge-protect shard` "
                                "or push with --no-manifests")
            files.append(StagedFile(f"manifests/{manifest.name}", manifest))
        if int(sizes[name]) == 0:
            # an empty tar (an empty input shard, or every sample failed) is not published: datasets'
            # WebDataset loader cannot infer features when the first shard is empty. Its manifest is.
            continue
        files.append(StagedFile(f"shards/{name}", shard))
        files.append(StagedFile(f"stats/{stats_path.name}", stats_path))
    return files


def _report_files(report: EvalReport, protection: dict[str, Any]) -> list[StagedFile]:
    """The evaluation report's files under ``eval/``, once it is known to evaluate this protection."""
    _check_report_matches(report, protection)
    _check_json_public(report.directory / "report.json", "the evaluation report")
    files = [StagedFile(f"{EVAL_DIR}/report.json", report.directory / "report.json")]
    if (report.directory / "report.md").is_file():
        files.append(StagedFile(f"{EVAL_DIR}/report.md", report.directory / "report.md"))
    return files + [StagedFile(f"{EVAL_DIR}/{f}", report.directory / f) for f in report.figures]


def plan_upload(
    root: str | Path,
    *,
    include_manifests: bool = True,
    report_dir: str | Path | None = None,
    card: bool = True,
    card_options: dict[str, Any] | None = None,
) -> UploadPlan:
    """Check that ``root`` is a finished output directory and list the files to upload.

    ``card_options`` go to :func:`uge_protect.hub.card.render_dataset_card` (``repo_id``,
    ``license``, ...). Raises :class:`UserError` for anything that is not publishable."""
    root = Path(root)
    layout = OutputLayout(root)
    if not root.is_dir():
        raise UserError(f"output directory not found: {root}")
    if not layout.run_file.is_file():
        raise UserError(f"{root} is not a uge-protect output directory (no run.json)")
    if not layout.sizes_file.is_file() or not layout.protection_file.is_file():
        raise UserError(f"the run in {root} has not finished (no shards/sizes.json or protection.json); "
                        "rerun the same `uge-protect shard` command to complete it")
    run = _check_json_public(layout.run_file, "run.json")
    protection = _check_json_public(layout.protection_file, "protection.json")
    sizes = read_json(layout.sizes_file)
    if not isinstance(sizes, dict) or not sizes:
        raise UserError(f"{layout.sizes_file} lists no shards: nothing to publish")
    missing = protection.get("missing_shards") or []
    if missing:
        raise UserError(f"{len(missing)} input shard(s) of the run in {root} are not done (e.g. {missing[0]}); "
                        "rerun the same `uge-protect shard` command to complete it")

    files = _shard_files(layout, sizes, run, include_manifests)
    warnings: list[str] = []
    extra = sorted(p.name for p in layout.shards_dir.glob("*.tar") if p.name not in sizes)
    if extra:
        warnings.append(f"{len(extra)} tar file(s) in {layout.shards_dir} are not part of this run and are "
                        f"not uploaded (e.g. {extra[0]})")
    published = {name: int(n) for name, n in sorted(sizes.items()) if int(n) > 0}
    if not published:
        raise UserError(f"no shard in {root} holds a protected sample: nothing to publish")
    empty = sorted(set(sizes) - set(published))
    if empty:
        warnings.append(f"{len(empty)} shard(s) hold no protected sample and are left out (e.g. {empty[0]}); "
                        "their manifests record why")
        sizes_json = (json.dumps(published, indent=2, sort_keys=True) + "\n").encode("utf-8")
        files.append(StagedFile("shards/sizes.json", data=sizes_json))  # the published shards only
    else:
        files.append(StagedFile("shards/sizes.json", layout.sizes_file))
    files.append(StagedFile("run.json", layout.run_file))
    files.append(StagedFile("protection.json", layout.protection_file))
    for f in files:  # what inspect refuses to read is not published either
        if f.source is not None and outside_link(root, f.source):
            raise UserError(f"{f.source} links to a path outside {root}; replace the link with the file itself")

    report = find_report(root, Path(report_dir) if report_dir is not None else None)
    if report is not None:
        files += _report_files(report, protection)

    plan = UploadPlan(root, files, protection, published, report, include_manifests, warnings)
    if card:
        text = render_dataset_card(plan, **(card_options or {}))
        plan.files.append(StagedFile(CARD_NAME, data=text.encode("utf-8")))
    plan.warnings += check_limits(plan.files)
    return plan


def _check_report_matches(report: EvalReport, protection: dict[str, Any]) -> None:
    evaluated = (report.report.get("protection") or {}).get("method")
    if evaluated is not None and evaluated != protection.get("method"):
        raise UserError(f"the evaluation report in {report.directory} evaluates another protection "
                        f"(method {evaluated.get('method')!r}, not this directory's); pass the right one with --report")


def check_limits(files: list[StagedFile]) -> list[str]:
    """Refuse what the Hub refuses (file size, entries per folder, files per repository); warn
    above the recommended file size."""
    warnings: list[str] = []
    if len(files) > MAX_FILES_PER_REPO:
        raise UserError(f"{len(files)} files exceed the Hub's {MAX_FILES_PER_REPO:,} files per repository; "
                        "write fewer, larger shards (uge-protect keeps one output shard per input shard)")
    per_folder: dict[str, int] = {}
    for f in files:
        folder = f.path_in_repo.rpartition("/")[0]
        per_folder[folder] = per_folder.get(folder, 0) + 1
        size = f.size
        if size > MAX_FILE_BYTES:
            raise UserError(f"{f.path_in_repo} is {size / 1e9:.1f} GB, above the Hub's 50 GB per file; "
                            "re-shard the input into smaller shards")
        if size > RECOMMENDED_FILE_BYTES:
            warnings.append(f"{f.path_in_repo} is {size / 1e9:.1f} GB; the Hub recommends files under 20 GB")
    for folder, n in sorted(per_folder.items()):
        if n > MAX_ENTRIES_PER_FOLDER:
            raise UserError(f"{folder or 'the repository root'} would hold {n:,} files, above the Hub's "
                            f"{MAX_ENTRIES_PER_FOLDER:,} per folder; write fewer, larger shards")
    return warnings


def write_staging(plan: UploadPlan, staging_dir: str | Path) -> Path:
    """Write exactly the files of ``plan`` into ``staging_dir`` (which must be new or empty).

    Shards (``.tar``) are hard-linked where the filesystem allows it, so a dry run of a large
    output costs no space: they share their bytes with the output directory and must not be
    modified in place. Everything else is copied."""
    staging = Path(staging_dir)
    if staging.exists() and (not staging.is_dir() or any(staging.iterdir())):
        raise UserError(f"staging folder {staging} exists and is not empty; choose a new folder")
    if staging.resolve() == plan.root.resolve():
        raise UserError("the staging folder must not be the output directory itself")
    staging.mkdir(parents=True, exist_ok=True)
    for f in plan.files:
        dest = staging / f.path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.data is not None:
            dest.write_bytes(f.data)
            continue
        if f.path_in_repo.endswith(".tar"):
            try:
                os.link(f.source, dest)
                continue
            except OSError:
                pass
        shutil.copy2(f.source, dest)
    return staging


def iter_staged_tree(staging: Path) -> Iterator[str]:
    """Repository paths of every file under a staging folder (for tests and checks)."""
    for p in sorted(staging.rglob("*")):
        if p.is_file():
            yield p.relative_to(staging).as_posix()


def git_blob_sha1(data_or_path: bytes | Path) -> str:
    """The git object id of a file's content (what the Hub reports for files not stored in LFS)."""
    if isinstance(data_or_path, bytes):
        return hashlib.sha1(b"blob %d\0" % len(data_or_path) + data_or_path).hexdigest()
    size = data_or_path.stat().st_size
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(data_or_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
