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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from uge_protect import __version__
from uge_protect.atomic import atomic_write
from uge_protect.errors import UserError
from uge_protect.hub.staging import CARD_NAME, StagedFile, UploadPlan, git_blob_sha1
from uge_protect.shards.layout import file_sha256

REPO_TYPE = "dataset"
DEFAULT_FILES_PER_COMMIT = 50
DEFAULT_BYTES_PER_COMMIT = 8 * 1024**3
SHA_CACHE_NAME = ".hub-sha256.json"


class HubClient(Protocol):
    """The part of :class:`huggingface_hub.HfApi` the upload uses (tests inject a fake)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def create_branch(self, repo_id: str, **kwargs: Any) -> Any: ...

    def list_repo_tree(self, repo_id: str, **kwargs: Any) -> Iterable[Any]: ...

    def create_commit(self, repo_id: str, operations: Iterable[Any], **kwargs: Any) -> Any: ...


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


def validate_repo_id(repo_id: str) -> str:
    """``owner/name`` or ``name`` as the Hub accepts it; a clear error otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    try:
        _validate(repo_id)
    except HFValidationError as exc:
        raise UserError(f"invalid repository id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    if repo_id.startswith(("datasets/", "models/", "spaces/")):
        raise UserError(f"invalid repository id {repo_id!r}: give OWNER/NAME without the 'datasets/' prefix")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN``, else the login cache (``hf auth login``)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` "
                        "(a token with write access), or use --dry-run STAGING_DIR to upload nothing")
    return found


def hub_error(exc: BaseException, repo_id: str, action: str) -> UserError:
    """One clear line for an error of the Hub client."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(exc, "response", None), "status_code", None)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or use --dry-run STAGING_DIR")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"revision not found in {repo_id} while {action}: {first_line}")
    if status == 401:
        return UserError(f"the Hugging Face token was rejected (401) while {action}: "
                         "log in again with `hf auth login` or set HF_TOKEN to a valid token")
    if status == 403:
        return UserError(f"this token may not write to {repo_id} (403 forbidden) while {action}: "
                         "use a token with write access to that namespace")
    if status == 429:
        return UserError(f"the Hub rate-limited {action} (429; about 128 commits per hour per repository): "
                         "wait a few minutes")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return UserError(f"dataset repository {repo_id} not found or not accessible with this token while {action}")
    if isinstance(exc, HfHubHTTPError):
        return UserError(f"the Hub refused {action} ({status}): {first_line}")
    return UserError(f"could not reach the Hub while {action} ({first_line})")


def _client_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        from httpx2 import HTTPError as HttpxError  # huggingface_hub >= 2
    except ImportError:  # pragma: no cover - older huggingface_hub
        try:
            from httpx import HTTPError as HttpxError
        except ImportError:
            HttpxError = HfHubHTTPError
    try:
        from requests import RequestException
    except ImportError:  # pragma: no cover
        RequestException = HfHubHTTPError
    return (HfHubHTTPError, OfflineModeIsEnabled, HttpxError, RequestException, ConnectionError, TimeoutError)


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
        try:
            atomic_write(self.path, json.dumps(self.entries, indent=0, sort_keys=True))
        except OSError:  # a read-only directory: the cache is only an optimisation
            pass
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


def default_client(token: str, endpoint: str | None = None) -> HubClient:
    """A :class:`huggingface_hub.HfApi` that identifies uploads as uge-protect's. ``endpoint``
    defaults to ``HF_ENDPOINT`` or https://huggingface.co."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="uge-protect", library_version=__version__)


def upload_plan(
    plan: UploadPlan,
    repo_id: str,
    *,
    api: HubClient,
    private: bool = False,
    revision: str | None = None,
    files_per_commit: int = DEFAULT_FILES_PER_COMMIT,
    bytes_per_commit: int = DEFAULT_BYTES_PER_COMMIT,
    log: Callable[[str], None] | None = None,
) -> PushResult:
    """Upload ``plan`` to the dataset repository ``repo_id``, skipping what is already there."""
    from huggingface_hub import CommitOperationAdd

    say = log or (lambda _msg: None)
    if files_per_commit < 1 or files_per_commit > 1000:
        raise UserError("files per commit must be between 1 and 1000 (the Hub advises < 100)")
    errors = _client_errors()
    result = PushResult(repo_id, revision, warnings=list(plan.warnings))
    for warning in plan.warnings:
        say(f"warning: {warning}")
    try:
        # private=None lets the Hub apply the namespace's default visibility; an existing repository keeps its own
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True)
    except errors as exc:
        raise hub_error(exc, repo_id, "creating the repository") from None
    if revision and revision != "main":
        try:
            api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True)
        except errors as exc:
            raise hub_error(exc, repo_id, f"creating branch {revision!r}") from None
    try:
        remote = {
            e.path: e for e in api.list_repo_tree(repo_id, repo_type=REPO_TYPE, revision=revision, recursive=True)
            if hasattr(e, "blob_id") or hasattr(e, "lfs")
        }
    except errors as exc:
        raise hub_error(exc, repo_id, "listing the repository's files") from None

    cache = Sha256Cache(plan.root)
    todo: list[StagedFile] = []
    try:
        for f in plan.files:
            if _is_uploaded(f, remote.get(f.path_in_repo), cache):
                result.skipped.append(f.path_in_repo)
            else:
                todo.append(f)
    finally:
        cache.save()
    planned = set(plan.paths())
    stale = sorted(p for p in remote if p.startswith(("shards/", "manifests/")) and p not in planned)
    if stale:
        result.warnings.append(
            f"the repository holds {len(stale)} file(s) under shards/ or manifests/ that this output does not have "
            f"(e.g. {stale[0]}); the default config reads every shards/*.tar, so delete them on the Hub")
        say(f"warning: {result.warnings[-1]}")
    if result.skipped:
        say(f"{len(result.skipped)} of {len(plan.files)} files are already in {repo_id}; skipping them")
    batches = _batches(todo, files_per_commit, bytes_per_commit)
    try:
        for i, batch in enumerate(batches, 1):
            ops = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                      path_or_fileobj=f.data if f.data is not None else str(f.source)) for f in batch]
            n_bytes = sum(f.size for f in batch)
            what = "the dataset card" if batch[0].path_in_repo == CARD_NAME else f"{len(batch)} files"
            say(f"commit {i}/{len(batches)}: {what}, {n_bytes / 1e6:.1f} MB")
            try:
                api.create_commit(repo_id, ops, commit_message=f"uge-protect push: {what} ({i}/{len(batches)})",
                                  repo_type=REPO_TYPE, revision=revision)
            except ValueError as exc:  # the Hub's check of the card's metadata
                raise UserError(f"the Hub rejected {what}: {' '.join(str(exc).split())}") from None
            except errors as exc:
                err = hub_error(exc, repo_id, f"committing {what} ({i}/{len(batches)})")
                raise UserError(f"{err}; {result.commits} of {len(batches)} commits were done: "
                                "rerun the same command to resume") from None
            result.commits += 1
            for f, op in zip(batch, ops):  # where the client hashed a file (LFS transfer), remember it for a rerun
                known = getattr(op.upload_info, "_sha256", None)
                if isinstance(known, bytes):
                    cache.record(f, known.hex())
            result.uploaded += [f.path_in_repo for f in batch]
            result.uploaded_bytes += n_bytes
    finally:
        cache.save()
    return result
