"""Shared test fixtures: tiny shards made on the fly, and an isolated HF_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import simple_samples, write_shard


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def make_shards(tmp_path):
    """Factory: make_shards(n_shards, per_shard) → list of shard paths in tmp_path/in."""

    def make(n_shards: int = 2, per_shard: int = 10, size: tuple[int, int] = (24, 24)) -> list[Path]:
        d = tmp_path / "in"
        d.mkdir(exist_ok=True)
        return [
            write_shard(d / f"data-{s:06d}.tar", simple_samples(f"s{s}", per_shard, seed=s, size=size))
            for s in range(n_shards)
        ]

    return make
