"""The upload, against an in-memory stand-in for the Hub: batches, card last, resume, errors."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from typer.testing import CliRunner

from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.hub.push import push_output, stage_output
from uge_protect.hub.staging import git_blob_sha1, iter_staged_tree
from uge_protect.hub import upload
from uge_protect.hub.upload import SHA_CACHE_NAME

runner = CliRunner()
LFS_SUFFIXES = (".tar", ".parquet", ".png")


@dataclass
class _Lfs:
    size: int
    sha256: str


@dataclass
class _RepoFile:
    path: str
    size: int
    blob_id: str
    lfs: _Lfs | None


def _http_error(status: int, cls=HfHubHTTPError):
    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/datasets/x"))
    return cls(f"{status} Client Error", response=response)


class FakeHub:
    """What `push` uses of HfApi, in memory: repositories, branches, atomic commits. Binary files
    are stored as LFS (sha256), the others as git blobs, as on the Hub. ``fail_at_commit=N`` makes
    the N-th create_commit call raise (a dropped connection) without committing anything."""

    def __init__(self, fail_at_commit: int | None = None, error: BaseException | None = None):
        self.repos: dict[str, dict[str, dict[str, _RepoFile]]] = {}
        self.content: dict[tuple[str, str, str], bytes] = {}
        self.private: dict[str, bool] = {}
        self.commit_calls = 0
        self.commits: list[list[str]] = []
        self.fail_at_commit = fail_at_commit
        self.error = error

    def create_repo(self, repo_id, *, repo_type, private=False, exist_ok=False):
        assert repo_type == "dataset"
        if self.error is not None:
            raise self.error
        if repo_id not in self.repos:
            self.repos[repo_id] = {"main": {}}
            self.private[repo_id] = bool(private)

    def create_branch(self, repo_id, *, branch, repo_type, exist_ok=False):
        self.repos[repo_id].setdefault(branch, dict(self.repos[repo_id]["main"]))

    def list_repo_tree(self, repo_id, *, repo_type, revision=None, recursive=False):
        branch = revision or "main"
        if branch not in self.repos[repo_id]:
            raise _http_error(404, RevisionNotFoundError)
        return list(self.repos[repo_id][branch].values())

    def create_commit(self, repo_id, operations, *, commit_message, repo_type, revision=None):
        self.commit_calls += 1
        ops = list(operations)
        assert all(isinstance(op, CommitOperationAdd) for op in ops)
        if self.commit_calls == self.fail_at_commit:
            raise ConnectionError("connection reset by peer")
        tree = self.repos[repo_id][revision or "main"]
        for op in ops:
            src = op.path_or_fileobj
            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            # LFS files: hashed through the client's upload info, as huggingface_hub's LFS transfer does
            lfs = _Lfs(len(data), op.upload_info.sha256.hex()) if op.path_in_repo.endswith(LFS_SUFFIXES) else None
            tree[op.path_in_repo] = _RepoFile(op.path_in_repo, len(data), git_blob_sha1(data), lfs)
            self.content[(repo_id, revision or "main", op.path_in_repo)] = data
        self.commits.append([op.path_in_repo for op in ops])


def _all_committed(hub: FakeHub) -> Counter:
    return Counter(p for commit in hub.commits for p in commit)


def test_push_uploads_the_staged_folder_in_small_commits_card_last(output_copy, tmp_path):
    hub = FakeHub()
    result = push_output(output_copy, "me/demo", api=hub, private=True, files_per_commit=4, license="mit")
    stage = tmp_path / "stage"
    stage_output(output_copy, "me/demo", stage, license="mit")
    expected = set(iter_staged_tree(stage))
    tree = hub.repos["me/demo"]["main"]
    assert set(tree) == expected == set(result.uploaded) and result.skipped == []
    assert hub.private["me/demo"] is True
    assert all(len(c) <= 4 for c in hub.commits) and len(hub.commits) == result.commits
    assert hub.commits[-1] == ["README.md"]  # the card lands last, alone
    for path in expected:  # byte for byte what --dry-run writes
        assert hub.content[("me/demo", "main", path)] == (stage / path).read_bytes(), path
    # a second push finds everything there and commits nothing
    again = push_output(output_copy, "me/demo", api=hub, license="mit")
    assert again.uploaded == [] and again.commits == 0 and set(again.skipped) == expected


def test_interrupted_push_resumes_without_reuploading(output_copy, monkeypatch):
    hub = FakeHub(fail_at_commit=3)
    with pytest.raises(UserError, match=r"2 of \d+ commits were done: rerun the same command to resume"):
        push_output(output_copy, "me/demo", api=hub, files_per_commit=3)
    done = _all_committed(hub)
    assert sum(done.values()) == 6 and "README.md" not in hub.repos["me/demo"]["main"]
    assert (output_copy / SHA_CACHE_NAME).is_file()  # hashes kept for the rerun
    hub.fail_at_commit = None
    hashed: list[Path] = []
    monkeypatch.setattr(upload, "file_sha256", lambda p: hashed.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    result = push_output(output_copy, "me/demo", api=hub, files_per_commit=3)
    assert hashed == []  # committed files were compared by their cached sha256, not read again
    assert set(result.skipped) == set(done)  # the committed files were not sent again
    counts = _all_committed(hub)
    assert max(counts.values()) == 1  # every file committed exactly once over both runs
    assert set(counts) == set(hub.repos["me/demo"]["main"]) and hub.commits[-1] == ["README.md"]


def test_changed_file_is_uploaded_again_and_stale_shards_are_reported(output_copy):
    hub = FakeHub()
    push_output(output_copy, "me/demo", api=hub)
    tree = hub.repos["me/demo"]["main"]
    tree["shards/old-000009.tar"] = _RepoFile("shards/old-000009.tar", 3, "x", _Lfs(3, "y"))
    tree["protection.json"].blob_id = "0" * 40  # the repository holds another version
    messages: list[str] = []
    result = push_output(output_copy, "me/demo", api=hub, log=messages.append)
    assert result.uploaded == ["protection.json"]
    assert any("shards/old-000009.tar" in m and m.startswith("warning:") for m in messages)


def test_revision_branch(output_copy):
    hub = FakeHub()
    hub.create_repo("me/demo", repo_type="dataset")
    result = push_output(output_copy, "me/demo", api=hub, revision="v1")
    assert set(hub.repos["me/demo"]["v1"]) == set(result.uploaded) and hub.repos["me/demo"]["main"] == {}


@pytest.mark.parametrize("error, needle", [
    (_http_error(401), "token was rejected (401)"),
    (_http_error(403), "may not write to me/demo (403 forbidden)"),
    (_http_error(404, RepositoryNotFoundError), "not found or not accessible"),
    (_http_error(429), "rate-limited creating the repository (429"),
    (ConnectionError("name resolution failed"), "could not reach the Hub"),
])
def test_hub_errors_become_one_clear_line(output_copy, error, needle):
    with pytest.raises(UserError) as info:
        push_output(output_copy, "me/demo", api=FakeHub(error=error))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_token_and_repo_id_checked_before_any_upload(output_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no login cache
    result = runner.invoke(app, ["push", str(output_copy), "me/demo"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "no Hugging Face token found" in errors[0], result.output
    for bad in ("a/b/c", "bad id", "datasets/me/demo", "-x/--y"):
        with pytest.raises(UserError, match="invalid repository id"):
            push_output(output_copy, bad, api=FakeHub())
    assert not (output_copy / SHA_CACHE_NAME).exists()  # nothing was read or hashed
