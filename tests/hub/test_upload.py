"""The upload, against an in-memory stand-in for the Hub: batches, card last, resume, retries, errors."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError
from typer.testing import CliRunner

from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.hub import upload
from uge_protect.hub.client import RetryPolicy, retry_after
from uge_protect.hub.push import push_output, stage_output
from uge_protect.hub.staging import git_blob_sha1, iter_staged_tree
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


def _http_error(status: int, cls=HfHubHTTPError, headers: dict[str, str] | None = None):
    response = httpx2.Response(status, headers=headers,
                               request=httpx2.Request("POST", "https://huggingface.co/api/datasets/x"))
    return cls(f"{status} Client Error", response=response)


class Waits(list):
    """A retry policy's sleep that records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def no_wait(**kwargs) -> RetryPolicy:
    """The default retry policy with recorded waits and no randomness: the wait before retry n is
    half of ``2**(n-1)`` seconds (the low end of the jitter)."""
    return RetryPolicy(sleep=Waits(), jitter=lambda: 0.0, **kwargs)


class FakeHub:
    """What `push` uses of HfApi, in memory: repositories, branches, atomic commits. Binary files
    are stored as LFS (sha256), the others as git blobs, as on the Hub. ``fail_at_commit=N`` makes
    the N-th and every later create_commit call raise (a connection that stays down) without
    committing anything, until it is set to None."""

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
        if self.fail_at_commit is not None and self.commit_calls >= self.fail_at_commit:
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
        push_output(output_copy, "me/demo", api=hub, files_per_commit=3, retry=no_wait())
    assert hub.commit_calls == 2 + 5  # the third commit, tried five times
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


def test_changed_file_is_uploaded_again_and_stale_shards_are_reported(output_copy, caplog):
    hub = FakeHub()
    push_output(output_copy, "me/demo", api=hub)
    tree = hub.repos["me/demo"]["main"]
    tree["shards/old-000009.tar"] = _RepoFile("shards/old-000009.tar", 3, "x", _Lfs(3, "y"))
    tree["protection.json"].blob_id = "0" * 40  # the repository holds another version
    with caplog.at_level(logging.INFO, logger="uge_protect.hub"):
        result = push_output(output_copy, "me/demo", api=hub)
    assert result.uploaded == ["protection.json"]
    assert any("shards/old-000009.tar" in r.getMessage() and r.levelno == logging.WARNING
               and r.name.startswith("uge_protect.hub") for r in caplog.records)


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
        push_output(output_copy, "me/demo", api=FakeHub(error=error), retry=no_wait())
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


class FlakyHub(FakeHub):
    """A FakeHub whose calls fail before they work: ``failures[name]`` lists the errors that the
    next calls of method ``name`` raise, in order; ``calls`` counts every call."""

    def __init__(self, **failures: list[BaseException]):
        super().__init__()
        self.failures = {name: list(errors) for name, errors in failures.items()}
        self.calls: Counter = Counter()

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.failures.get(name):
            raise self.failures[name].pop(0)

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo")
        return super().create_repo(repo_id, **kwargs)

    def list_repo_tree(self, repo_id, **kwargs):
        self._call("list_repo_tree")
        return super().list_repo_tree(repo_id, **kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        self._call("create_commit")
        return super().create_commit(repo_id, operations, **kwargs)


def test_transient_errors_are_retried_with_backoff(output_copy, caplog):
    """429, 5xx and dropped connections are tried again after growing waits; the push completes."""
    hub = FlakyHub(create_repo=[_http_error(503), _http_error(502)],
                   list_repo_tree=[ConnectionError("connection reset by peer")],
                   create_commit=[_http_error(429), httpx2.ReadTimeout("timed out"), _http_error(500)])
    policy = no_wait()
    with caplog.at_level(logging.INFO, logger="uge_protect.hub"):
        result = push_output(output_copy, "me/demo", api=hub, files_per_commit=4, retry=policy)
    assert hub.calls["create_repo"] == 3 and hub.calls["list_repo_tree"] == 2
    assert hub.calls["create_commit"] == len(hub.commits) + 3 and result.commits == len(hub.commits)
    assert policy.sleep == [0.5, 1.0, 0.5, 0.5, 1.0, 2.0]  # per call: 2**(n-1) s, at the low end of the jitter
    reference = FakeHub()
    push_output(output_copy, "me/demo", api=reference, files_per_commit=4)
    assert hub.commits == reference.commits and hub.repos == reference.repos  # the same upload, in the same commits
    retries = [r for r in caplog.records if r.name == "uge_protect.hub.client"]
    assert len(retries) == 6 and all(r.levelno == logging.WARNING and "me/demo" in r.getMessage() for r in retries)
    assert "creating the repository failed for me/demo (HTTP 503); retry 1 of 4 in 0.5 s" in retries[0].getMessage()
    assert "(ReadTimeout); retry 2 of 4 in 1.0 s" in retries[4].getMessage()


def test_retry_after_header_is_honoured(output_copy):
    hub = FlakyHub(create_commit=[_http_error(429, headers={"Retry-After": "7"}),
                                  _http_error(503, headers={"Retry-After": "0"})])
    policy = no_wait()
    push_output(output_copy, "me/demo", api=hub, retry=policy)
    assert policy.sleep == [7.0, 0.0] and hub.calls["create_commit"] == len(hub.commits) + 2


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2026, 10, 21, 7, 27, 30, tzinfo=timezone.utc)
    assert retry_after(_http_error(429, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}), now) == 30.0
    assert retry_after(_http_error(429, headers={"Retry-After": "Wed, 21 Oct 2026 07:00:00 GMT"}), now) == 0.0
    assert retry_after(_http_error(503, headers={"Retry-After": "120"}), now) == 120.0
    assert retry_after(_http_error(503, headers={"Retry-After": "soon"}), now) is None
    assert retry_after(_http_error(503), now) is None and retry_after(ConnectionError("x"), now) is None


@pytest.mark.parametrize("error", [
    _http_error(400), _http_error(401), _http_error(403), _http_error(404, RepositoryNotFoundError),
    _http_error(409), _http_error(422), OfflineModeIsEnabled("offline"),
])
def test_other_errors_are_not_retried(output_copy, error, caplog):
    hub = FlakyHub(create_repo=[error])
    policy = no_wait()
    with pytest.raises(UserError) as info:
        push_output(output_copy, "me/demo", api=hub, retry=policy)
    assert hub.calls["create_repo"] == 1 and policy.sleep == [] and not caplog.records
    assert "gave up" not in str(info.value) and "\n" not in str(info.value)


def test_retries_stop_after_the_cap_with_a_clear_error(output_copy, caplog):
    hub = FlakyHub(create_commit=[_http_error(500)] * 10)
    policy = no_wait()
    with caplog.at_level(logging.WARNING, logger="uge_protect.hub"):
        with pytest.raises(UserError) as info:
            push_output(output_copy, "me/demo", api=hub, retry=policy)
    message = str(info.value)
    assert hub.calls["create_commit"] == 5 and RetryPolicy().attempts == 5
    assert policy.sleep == [0.5, 1.0, 2.0, 4.0] and len(caplog.records) == 4
    assert "the Hub refused committing" in message and "(500)" in message
    assert "gave up on me/demo after 5 attempts" in message and "0 of 2 commits were done" in message
    assert "\n" not in message and hub.commits == []


def test_a_long_retry_after_ends_the_retries_at_once(output_copy):
    hub = FlakyHub(create_repo=[_http_error(429, headers={"Retry-After": "3600"})])
    policy = no_wait()
    with pytest.raises(UserError, match=r"rate-limited creating the repository \(429.*gave up on me/demo after "
                                        r"1 attempt; the Hub asks to wait 3600 s"):
        push_output(output_copy, "me/demo", api=hub, retry=policy)
    assert hub.calls["create_repo"] == 1 and policy.sleep == []


def test_backoff_grows_exponentially_with_jitter_up_to_a_cap():
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    for retry, full in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):
        waits = [policy.delay(retry) for _ in range(200)]
        assert all(full / 2 <= w < full for w in waits) and len(set(waits)) > 1
    assert RetryPolicy(jitter=lambda: 0.5).delay(3) == 3.0  # 4 s scaled by 0.75
    assert policy.delay(2, asked=42.0) == 42.0  # Retry-After wins, even above max_delay
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
