"""Models beyond the plain architectures: UGE's authorized network, other keys, distilled students.

``eval --authorized DIR`` reads a UGE artifact's authorized architecture and key and adds:

* ``ARCH+key``: the authorized network the owner trains (key-initialised, behind the key's
  colour projection when the artifact uses it, with the artifact's confidence gate when it
  has one: it acts at inference and leaves every prediction as it is);
* ``ARCH+key:N`` for every ``--other-key N``: the same architecture with another key (a
  hacker who knows the architecture but not the key);
* ``STUDENT<-ARCH+key`` for every ``--distill STUDENT``: a student distilled (no labels) from
  the authorized network trained on the same training set.

Labels name keys only by their role; the report records the key's fingerprint, never the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from uge_protect.errors import UserError
from uge_protect.methods.artifact import loading
from uge_protect.models.classifiers import ARCHITECTURES
from uge_protect.methods.uge.method import load_uge_artifact
from uge_protect.methods.uge.gate import ConfidenceGate, gate_from_artifact
from uge_protect.methods.uge.key import Key, build_authorized, key_id, state_fingerprint

#: What ``--authorized`` reads of a UGE artifact's config.
AUTHORIZED_FIELDS = ("authorized", "key_seed", "key_projection", "key_fingerprint", "epsilon")


@dataclass(frozen=True)
class ModelEntry:
    """One model row of an evaluation: what to build, and whether it is distilled from a teacher."""

    label: str
    arch: str
    #: The artifact's key (a hex string), or an evaluation-only ``--other-key`` integer.
    key: Key | None = None
    projection: bool = False
    teacher: "ModelEntry | None" = None
    #: The authorized network trained with the artifact's own key (the owner's row).
    owner: bool = False
    #: The authorized architecture behind another key (``--other-key``).
    other_key: bool = False
    #: The artifact's confidence gate the network carries (None: no gate); buffers only, so
    #: every model built shares it.
    gate: ConfidenceGate | None = field(default=None, compare=False)

    def factory(self, num_classes: int) -> Callable[[], torch.nn.Module] | None:
        """What builds the model (None: the plain architecture, seeded by the run)."""
        if self.key is None:
            return None
        key, arch, projection, gate = self.key, self.arch, self.projection, self.gate
        return lambda: build_authorized(arch, num_classes, key, projection, gate)

    def gate_tag(self) -> str:
        """What identifies the gate (its patterns and scale; no secret), or "" without one."""
        return f"{state_fingerprint(self.gate.state_dict())}:onehot{self.gate.scale:g}" if self.gate else ""

    def cache_tag(self) -> str:
        """What identifies the model beyond its label, for the run cache (no secret). The gate
        changes no training run and no prediction, so it counts only where the model teaches."""
        tag = key_id(self.key) + (":lattice-projection" if self.projection else "") if self.key is not None else ""
        if self.teacher is not None:
            gate = f":gate-{self.teacher.gate_tag()}" if self.teacher.gate is not None else ""
            tag += f"<-{self.teacher.cache_tag()}{gate}"
        return tag


def authorized_entries(artifact: str | None, other_keys: list[int], distill: list[str],
                       gate: bool = True) -> list[ModelEntry]:
    """The extra model rows of ``--authorized``, ``--other-key`` and ``--distill``; the owner
    carries the artifact's confidence gate unless ``gate`` is False."""
    if artifact is None:
        if other_keys or distill:
            raise UserError("--other-key and --distill need --authorized DIR (a UGE artifact)")
        return []
    config, weights = load_uge_artifact(artifact, AUTHORIZED_FIELDS)
    arch, key, projection = config["authorized"], config["key_seed"], config["key_projection"]
    if arch not in ARCHITECTURES:
        raise UserError(f"UGE artifact {artifact} names an unknown architecture {arch!r}")
    with loading(artifact, "UGE"):
        owner_gate = gate_from_artifact(config, weights) if gate else None
    owner = ModelEntry(f"{arch}+key", arch, key, projection, gate=owner_gate, owner=True)
    entries = [owner]
    for other in other_keys:
        if str(other) == key:
            raise UserError("--other-key must differ from the artifact's key")
        entries.append(ModelEntry(f"{arch}+key:{other}", arch, other, projection, other_key=True))
    for student in distill:
        if student not in ARCHITECTURES:
            raise UserError(f"unknown --distill architecture {student!r}; choose {', '.join(ARCHITECTURES)}")
        entries.append(ModelEntry(f"{student}<-{arch}+key", student, teacher=owner))
    return entries


def authorized_summary(artifact: str | None, gate: bool = True) -> dict[str, str | bool] | None:
    """What the report says of the authorized network: architecture, key fingerprint, and
    whether it carried the confidence gate."""
    if artifact is None:
        return None
    config, _ = load_uge_artifact(artifact, AUTHORIZED_FIELDS)
    return {"arch": config["authorized"], "key_fingerprint": config["key_fingerprint"],
            "key_projection": config["key_projection"], "confidence_gate": gate and bool(config.get("confidence_gate"))}
