"""``uge-protect push``: stage an output directory and upload it, or only stage it (dry run)."""

from __future__ import annotations

from pathlib import Path

from uge_protect.hub.client import HubClient, RetryPolicy, default_client, resolve_token, validate_repo_id
from uge_protect.hub.layout import UploadPlan
from uge_protect.hub.staging import ReadLock, plan_upload, write_staging
from uge_protect.hub.upload import DEFAULT_BYTES_PER_COMMIT, DEFAULT_FILES_PER_COMMIT, PushResult, upload_plan


def stage_output(
    directory: str | Path,
    repo_id: str,
    staging_dir: str | Path,
    *,
    license: str = "unknown",
    include_manifests: bool = True,
    report_dir: str | Path | None = None,
) -> UploadPlan:
    """Write into ``staging_dir`` exactly the folder ``push_output`` would upload; upload nothing."""
    validate_repo_id(repo_id)
    with ReadLock(Path(directory)):
        plan = plan_upload(directory, include_manifests=include_manifests, report_dir=report_dir,
                           card_options={"repo_id": repo_id, "license": license})
        write_staging(plan, staging_dir)
    return plan


def push_output(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    license: str = "unknown",
    include_manifests: bool = True,
    report_dir: str | Path | None = None,
    token: str | None = None,
    api: HubClient | None = None,
    endpoint: str | None = None,
    files_per_commit: int = DEFAULT_FILES_PER_COMMIT,
    bytes_per_commit: int = DEFAULT_BYTES_PER_COMMIT,
    retry: RetryPolicy | None = None,
) -> PushResult:
    """Upload an output directory of ``uge-protect shard`` to the dataset repository ``repo_id``.

    The token comes from ``token``, ``HF_TOKEN`` or the login cache; ``api`` replaces the
    :class:`huggingface_hub.HfApi` client (tests inject a fake); ``endpoint`` points the default
    client at another Hub (default: ``HF_ENDPOINT`` or huggingface.co); ``retry`` says how failed Hub
    calls are retried (:class:`~uge_protect.hub.client.RetryPolicy`). Progress and warnings are
    logged (logger ``uge_protect.hub``). Rerunning after an interruption uploads only what is missing."""
    validate_repo_id(repo_id)
    with ReadLock(Path(directory)):
        plan = plan_upload(directory, include_manifests=include_manifests, report_dir=report_dir,
                           card_options={"repo_id": repo_id, "license": license})
        if api is None:
            api = default_client(resolve_token(token), endpoint)
        return upload_plan(plan, repo_id, api=api, private=private, revision=revision,
                           files_per_commit=files_per_commit, bytes_per_commit=bytes_per_commit, retry=retry)
