"""Models beyond the plain architectures: those an artifact's owner is authorized to train.

``eval --authorized DIR`` asks the registry entry of the artifact's method (see
:func:`uge_protect.methods.registry.authorized_models`) for its extra rows: for UGE the
owner's network, the same architecture behind every ``--other-key``, and a student distilled
from the owner's network for every ``--distill``. Evaluation trains them as it trains any
row; it never looks inside the method.
"""

from __future__ import annotations

from uge_protect.errors import UserError
from uge_protect.methods.base import AuthorizedModel
from uge_protect.methods.registry import authorized_models, authorized_summary as method_summary

#: One model row of an evaluation: what to build, and whether it is distilled from a teacher.
ModelEntry = AuthorizedModel


def authorized_entries(artifact: str | None, other_keys: list[int], distill: list[str],
                       gate: bool = True) -> list[ModelEntry]:
    """The extra model rows of ``--authorized``, ``--other-key`` and ``--distill``; the owner
    carries the artifact's confidence gate unless ``gate`` is False."""
    if artifact is None:
        if other_keys or distill:
            raise UserError("--other-key and --distill need --authorized DIR (a UGE artifact)")
        return []
    return authorized_models(artifact, other_keys, distill, gate)


def authorized_summary(artifact: str | None, gate: bool = True) -> dict[str, str | bool] | None:
    """What the report says of the authorized network (None without ``--authorized``)."""
    return None if artifact is None else method_summary(artifact, gate)
