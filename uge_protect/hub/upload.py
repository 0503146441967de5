"""Resumable, multi-commit upload of a staged output directory to a Hugging Face dataset repository.

How an interrupted upload resumes: before committing, the repository's tree at the target
revision is listed, and every staged file whose content is already there (same size and same
sha256 for LFS files, same git blob id otherwise) is skipped. Each commit is atomic on the Hub,
so after an interruption the rerun of the same command uploads only what the finished commits
did not hold. The local sha256 of each file is cached in ``DIR/.hub-sha256.json`` (keyed by
path, size and modification time) so that a rerun does not hash the shards again.

Commits hold at most ``files_per_commit`` files (default 50) and about ``bytes_per_commit`` bytes,
under the Hub's advice of < 100 files per commit. The dataset card ``README.md`` is committed
last, in its own commit: a repository that shows this card holds the complete upload, and the
card's explicit ``configs`` never point at shards that are not there yet.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from uge_protect.errors import UserError
from uge_protect.hub.client import HubClient, RetryPolicy, call_hub
from uge_protect.hub.layout import CARD_NAME, StagedFile, UploadPlan
from uge_protect.hub.staging import git_blob_sha1
from uge_protect.shards.layout import file_sha256

REPO_TYPE = "dataset"
DEFAULT_FILES_PER_COMMIT = 50
DEFAULT_BYTES_PER_COMMIT = 8 * 1024**3
SHA_CACHE_NAME = ".hub-sha256.json"

logger = logging.getLogger(__name__)


@dataclass
class PushResult:
    """What one push did."""

    repo_id: str
    revision: str | None
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    commits: int = 0
    uploaded_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


class Sha256Cache:
    """sha256 of local files, remembered per (path, size, mtime) in ``DIR/.hub-sha256.json``."""

    def __init__(self, root: Path):
        self.path = root / SHA_CACHE_NAME
        try:
            self.entries: dict[str, list[Any]] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}
        self._dirty = False

    def sha256(self, f: StagedFile) -> str:
        if f.data is not None:
            import hashlib

            return hashlib.sha256(f.data).hexdigest()
        st = f.source.stat()
        key = str(f.source.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = file_sha256(f.source)
        self.record(f, digest)
        return digest

    def record(self, f: StagedFile, digest: str) -> None:
        """Remember the sha256 of a file on disk (computed elsewhere, e.g. by the Hub client)."""
        if f.source is None:
            return
        st = f.source.stat()
        self.entries[str(f.source.resolve())] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:  # a read-only directory: the cache is only an optimisation
            tmp.unlink(missing_ok=True)
        self._dirty = False


def _is_uploaded(f: StagedFile, remote: Any, cache: Sha256Cache) -> bool:
    """Whether the repository already holds exactly this file's content."""
    if remote is None or getattr(remote, "size", None) != f.size:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return getattr(lfs, "sha256", None) == cache.sha256(f)
    blob_id = getattr(remote, "blob_id", None)
    return blob_id is not None and blob_id == git_blob_sha1(f.data if f.data is not None else f.source)


def _batches(files: list[StagedFile], max_files: int, max_bytes: int) -> list[list[StagedFile]]:
    """Consecutive batches of at most ``max_files`` files and about ``max_bytes`` bytes; the card alone, last."""
    data = [f for f in files if f.path_in_repo != CARD_NAME]
    card = [f for f in files if f.path_in_repo == CARD_NAME]
    out: list[list[StagedFile]] = []
    batch: list[StagedFile] = []
    size = 0
    for f in data:
        if batch and (len(batch) >= max_files or size + f.size > max_bytes):
            out.append(batch)
            batch, size = [], 0
        batch.append(f)
        size += f.size
    if batch:
        out.append(batch)
    if card:
        out.append(card)
    return out


def _prepare_repo(api: HubClient, repo_id: str, private: bool, revision: str | None, retry: RetryPolicy) -> None:
    """Create the repository (and the branch) unless they exist."""
    # private=None lets the Hub apply the namespace's default visibility; an existing repository keeps its own
    call_hub(lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True),
             repo_id, "creating the repository", retry)
    if revision and revision != "main":
        call_hub(lambda: api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True),
                 repo_id, f"creating branch {revision!r}", retry)


def _remote_files(api: HubClient, repo_id: str, revision: str | None, retry: RetryPolicy) -> dict[str, Any]:
    """The repository's files at ``revision``, by path."""
    entries = call_hub(lambda: list(api.list_repo_tree(repo_id, repo_type=REPO_TYPE, revision=revision,
                                                        recursive=True)),
                       repo_id, "listing the repository's files", retry)
    return {e.path: e for e in entries if hasattr(e, "blob_id") or hasattr(e, "lfs")}


def _to_upload(plan: UploadPlan, remote: dict[str, Any], result: PushResult, cache: Sha256Cache) -> list[StagedFile]:
    """The files of ``plan`` the repository does not hold yet; the others go to ``result.skipped``.
    Warns about shards and manifests in the repository that the plan does not have."""
    todo: list[StagedFile] = []
    try:
        for f in plan.files:
            if _is_uploaded(f, remote.get(f.path_in_repo), cache):
                result.skipped.append(f.path_in_repo)
            else:
                todo.append(f)
    finally:
        cache.save()  # the hashes made so far serve a rerun, whatever happens next
    planned = set(plan.paths())
    stale = sorted(p for p in remote if p.startswith(("shards/", "manifests/")) and p not in planned)
    if stale:
        result.warnings.append(
            f"the repository holds {len(stale)} file(s) under shards/ or manifests/ that this output does not have "
            f"(e.g. {stale[0]}); the default config reads every shards/*.tar, so delete them on the Hub")
        logger.warning("%s", result.warnings[-1])
    if result.skipped:
        logger.info("%d of %d files are already in %s; skipping them", len(result.skipped), len(plan.files),
                    result.repo_id)
    return todo


def _commit_all(api: HubClient, batches: list[list[StagedFile]], result: PushResult, cache: Sha256Cache,
                retry: RetryPolicy) -> None:
    """One commit per batch, in order; ``result`` counts what was committed."""
    from huggingface_hub import CommitOperationAdd

    repo_id, revision = result.repo_id, result.revision
    for i, batch in enumerate(batches, 1):
        ops = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                  path_or_fileobj=f.data if f.data is not None else str(f.source)) for f in batch]
        n_bytes = sum(f.size for f in batch)
        what = "the dataset card" if batch[0].path_in_repo == CARD_NAME else f"{len(batch)} files"
        logger.info("commit %d/%d: %s, %.1f MB", i, len(batches), what, n_bytes / 1e6)
        commit = partial(api.create_commit, repo_id, ops, repo_type=REPO_TYPE, revision=revision,
                         commit_message=f"uge-protect push: {what} ({i}/{len(batches)})")
        try:
            call_hub(commit, repo_id, f"committing {what} ({i}/{len(batches)})", retry)
        except ValueError as exc:  # the Hub's check of the card's metadata
            raise UserError(f"the Hub rejected {what}: {' '.join(str(exc).split())}") from None
        except UserError as err:
            raise UserError(f"{err}; {result.commits} of {len(batches)} commits were done: "
                            "rerun the same command to resume") from None
        result.commits += 1
        for f, op in zip(batch, ops):  # where the client hashed a file (LFS transfer), remember it for a rerun
            known = getattr(op.upload_info, "_sha256", None)
            if isinstance(known, bytes):
                cache.record(f, known.hex())
        result.uploaded += [f.path_in_repo for f in batch]
        result.uploaded_bytes += n_bytes


def upload_plan(
    plan: UploadPlan,
    repo_id: str,
    *,
    api: HubClient,
    private: bool = False,
    revision: str | None = None,
    files_per_commit: int = DEFAULT_FILES_PER_COMMIT,
    bytes_per_commit: int = DEFAULT_BYTES_PER_COMMIT,
    retry: RetryPolicy | None = None,
) -> PushResult:
    """Upload ``plan`` to the dataset repository ``repo_id``, skipping what is already there.

    Progress and warnings go to the logger ``uge_protect.hub.upload``; Hub calls are retried as
    ``retry`` says (default: :class:`RetryPolicy`)."""
    if files_per_commit < 1 or files_per_commit > 1000:
        raise UserError("files per commit must be between 1 and 1000 (the Hub advises < 100)")
    retry = retry or RetryPolicy()
    result = PushResult(repo_id, revision, warnings=list(plan.warnings))
    for warning in plan.warnings:
        logger.warning("%s", warning)
    _prepare_repo(api, repo_id, private, revision, retry)
    cache = Sha256Cache(plan.root)
    todo = _to_upload(plan, _remote_files(api, repo_id, revision, retry), result, cache)
    try:
        _commit_all(api, _batches(todo, files_per_commit, bytes_per_commit), result, cache, retry)
    finally:
        cache.save()
    return result
