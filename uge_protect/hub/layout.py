"""How a pushed dataset repository is laid out, and the plan of one push.

Staging (:mod:`uge_protect.hub.staging`) makes an :class:`UploadPlan`, the dataset card
(:mod:`uge_protect.hub.card`) describes it and the upload (:mod:`uge_protect.hub.upload`) sends
it; all three read the names and types here, which import nothing of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where a report is staged in the repository, and where ``push`` looks for one in DIR.
EVAL_DIR = "eval"
#: The dataset card, committed last.
CARD_NAME = "README.md"
#: What the card's ``default`` and ``manifests`` configs read.
SHARDS_GLOB = "shards/*.tar"
MANIFESTS_GLOB = "manifests/*.parquet"


@dataclass(frozen=True)
class StagedFile:
    """One file of the upload: its path in the repository and where its bytes come from."""

    path_in_repo: str
    source: Path | None = None  # a file on disk ...
    data: bytes | None = None  # ... or bytes made here (the dataset card)

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return len(self.data) if self.data is not None else self.source.stat().st_size

    def read_bytes(self) -> bytes:
        """The file's content."""
        return self.data if self.data is not None else self.source.read_bytes()


@dataclass
class EvalReport:
    """An evaluation report found for the directory."""

    directory: Path
    report: dict[str, Any]
    figures: list[str]


@dataclass
class UploadPlan:
    """Everything one push uploads, in upload order (the card last), and what the card says."""

    root: Path
    files: list[StagedFile]
    protection: dict[str, Any]
    sizes: dict[str, int]
    report: EvalReport | None = None
    include_manifests: bool = True
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The size of the whole upload in bytes."""
        return sum(f.size for f in self.files)

    def paths(self) -> list[str]:
        """Repository paths of the files, in upload order."""
        return [f.path_in_repo for f in self.files]
