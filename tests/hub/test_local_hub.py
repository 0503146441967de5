"""The real huggingface_hub client against a local HTTP stand-in for the Hub: repository,
branch, tree listing, regular and LFS commits, an interrupted upload and its resume."""

from __future__ import annotations

import logging

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from tests.hub.local_hub import LocalHub
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.hub.client import RetryPolicy
from uge_protect.hub.push import push_output, stage_output
from uge_protect.hub.staging import iter_staged_tree

TOKEN = "hf_local_test_token_0123456789"

# huggingface_hub's LFS transfer hands raw bytes to httpx2 in a form it deprecates (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def local_hub(monkeypatch):
    # the stand-in is on 127.0.0.1; the legacy LFS transfer (no Xet) is what it speaks
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub() as hub:
        yield hub


def test_push_resume_with_the_real_client(output_copy, tmp_path, local_hub):
    local_hub.fail_commit_at = 2
    waits: list[float] = []
    with pytest.raises(UserError, match=r"\(500\).*1 of \d+ commits were done: rerun the same command to resume"):
        push_output(output_copy, "me/demo", token=TOKEN, endpoint=local_hub.endpoint, private=True,
                    files_per_commit=4, retry=RetryPolicy(sleep=waits.append))
    assert local_hub.commit_calls == 1 + 5 and len(waits) == 4  # the second commit, tried five times
    local_hub.fail_commit_at = None
    first_commit = set(local_hub.commits[0])
    assert len(first_commit) == 4 and "README.md" not in local_hub.repos["me/demo"]["main"]
    uploads_before = len(local_hub.lfs_uploads)
    result = push_output(output_copy, "me/demo", token=TOKEN, endpoint=local_hub.endpoint, files_per_commit=4)
    assert first_commit <= set(result.skipped) and not first_commit & set(result.uploaded)
    assert local_hub.commits[-1] == ["README.md"] and local_hub.validated_cards == 1
    # LFS objects sent before the failed commit were not sent again (the Hub already had them)
    assert len(local_hub.lfs_uploads) == len(set(local_hub.lfs_uploads))
    assert len(local_hub.lfs_uploads) >= uploads_before
    stage = tmp_path / "stage"
    stage_output(output_copy, "me/demo", stage)
    tree = local_hub.repos["me/demo"]["main"]
    for path in iter_staged_tree(stage):
        data, is_lfs = tree[path]
        assert data == (stage / path).read_bytes(), path
        assert is_lfs == path.endswith((".tar", ".parquet", ".png"))
    assert local_hub.private["me/demo"] is True
    assert set(local_hub.tokens) == {f"Bearer {TOKEN}"}
    # everything there: the next push commits nothing
    again = push_output(output_copy, "me/demo", token=TOKEN, endpoint=local_hub.endpoint)
    assert again.commits == 0 and again.uploaded == []


def test_branch_and_forbidden_namespace(output_copy, local_hub):
    push_output(output_copy, "me/demo", token=TOKEN, endpoint=local_hub.endpoint, revision="protected-v1")
    assert "README.md" in local_hub.repos["me/demo"]["protected-v1"]
    assert "README.md" not in local_hub.repos["me/demo"]["main"]
    local_hub.status_for_create = 403
    with pytest.raises(UserError, match=r"may not write to other/demo \(403 forbidden\)"):
        push_output(output_copy, "other/demo", token=TOKEN, endpoint=local_hub.endpoint)


def test_cli_push_with_token_from_env(output_copy, local_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.endpoint)
    (output_copy / "shards" / "other.tar").write_bytes(b"x" * 512)  # not part of the run: a warning
    result = CliRunner().invoke(app, ["push", str(output_copy), "me/demo", "--license", "cc-by-4.0"])
    assert result.exit_code == 0, result.output
    assert "uploaded" in result.output and "README.md" in local_hub.repos["me/demo"]["main"]
    assert f"Bearer {TOKEN}" in local_hub.tokens
    lines = result.output.splitlines()  # what the upload logs, as the command's lines
    assert any(line.startswith("warning: ") and "other.tar" in line for line in lines), result.output
    assert any(line.startswith("commit 1/") for line in lines), result.output
    result = CliRunner().invoke(app, ["push", str(output_copy), "me/demo", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("warning: ") and "other.tar" in line for line in lines), result.output
    assert not any(line.startswith(("commit ", "nothing to upload")) for line in lines), result.output
    assert logging.getLogger("uge_protect.hub").handlers == []  # the command's own handler is gone
