"""Publishing an output directory to the Hugging Face Hub: staging, the dataset card, the upload.

``hub`` reads what the pipeline wrote; it knows nothing about methods."""

from uge_protect.hub.card import render_dataset_card, shard_pattern
from uge_protect.hub.client import RetryPolicy
from uge_protect.hub.layout import StagedFile, UploadPlan
from uge_protect.hub.push import push_output, stage_output
from uge_protect.hub.recipes import pytorch_recipe
from uge_protect.hub.staging import plan_upload, write_staging
from uge_protect.hub.upload import PushResult, upload_plan

__all__ = [
    "PushResult", "RetryPolicy", "StagedFile", "UploadPlan", "plan_upload", "push_output", "pytorch_recipe",
    "render_dataset_card", "shard_pattern", "stage_output", "upload_plan", "write_staging",
]
