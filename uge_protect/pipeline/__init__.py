"""The streaming protection pipeline (read → decode → batch → protect → encode → write)."""

from uge_protect.pipeline.config import ShardJobConfig
from uge_protect.pipeline.run import run_shard_job

__all__ = ["ShardJobConfig", "run_shard_job"]
