"""The models a UGE artifact adds to an evaluation (its registry hooks).

* ``ARCH+key``: the authorized network the owner trains (key-initialised, behind the key's
  colour projection when the artifact uses it, with the artifact's confidence gate when it
  has one: it acts at inference and leaves every prediction as it is);
* ``ARCH+key:N`` for every other key N: the same architecture with another key (a hacker
  who knows the architecture but not the key);
* ``STUDENT<-ARCH+key`` for every student: a student distilled (no labels) from the
  authorized network trained on the same training set.

Labels name keys only by their role; tags carry the key's id, never the key.
"""

from __future__ import annotations

from torch import nn

from uge_protect.errors import UserError
from uge_protect.methods.artifact import loading
from uge_protect.methods.base import AuthorizedModel
from uge_protect.methods.uge.gate import gate_from_artifact
from uge_protect.methods.uge.key import Key, build_authorized, key_id, state_fingerprint
from uge_protect.methods.uge.method import load_uge_artifact
from uge_protect.methods.uge.texture_key import TextureProjection
from uge_protect.models.classifiers import ARCHITECTURES

#: What the authorized models read of a UGE artifact's config.
AUTHORIZED_FIELDS = ("authorized", "key_seed", "key_projection", "key_fingerprint", "epsilon")


def _keyed(label: str, arch: str, key: Key, projection: bool, gate: nn.Module | None = None,
           scheme: str = "colour", num_classes: int = 0, **roles: bool) -> AuthorizedModel:
    """``arch`` behind ``key`` (the gate, buffers only, is shared by every model built)."""
    def build(n: int) -> nn.Module:
        return build_authorized(arch, n, key, projection, gate, scheme=scheme)

    # the gate changes no training run and no prediction: it counts only where the model teaches
    teach = f"gate-{state_fingerprint(gate.state_dict())}:onehot{gate.scale:g}" if gate is not None else ""
    if scheme == "texture":  # the projection works on whole images, before the crops
        return AuthorizedModel(label, arch, build, tag=key_id(key) + ":texture-projection", teach_tag=teach,
                               transform=TextureProjection(key, num_classes), **roles)
    tag = key_id(key) + (":lattice-projection" if projection else "")
    return AuthorizedModel(label, arch, build, tag=tag, teach_tag=teach, **roles)


def authorized_models(artifact: str, other_keys: list[int], distill: list[str], gate: bool = True
                      ) -> list[AuthorizedModel]:
    """The owner's network, the ``other_keys`` networks and the ``distill`` students of a UGE
    artifact; the owner carries the artifact's confidence gate unless ``gate`` is False."""
    config, weights = load_uge_artifact(artifact, AUTHORIZED_FIELDS)
    arch, key, projection = config["authorized"], config["key_seed"], config["key_projection"]
    scheme, num_classes = config.get("key_scheme") or "colour", int(config.get("num_classes") or 0)
    if arch not in ARCHITECTURES:
        raise UserError(f"UGE artifact {artifact} names an unknown architecture {arch!r}")
    with loading(artifact, "UGE"):
        owner_gate = gate_from_artifact(config, weights) if gate else None
    owner = _keyed(f"{arch}+key", arch, key, projection, owner_gate, scheme, num_classes, owner=True)
    models = [owner]
    for other in other_keys:
        if str(other) == key:
            raise UserError("--other-key must differ from the artifact's key")
        models.append(_keyed(f"{arch}+key:{other}", arch, other, projection, None, scheme, num_classes,
                             other_key=True))
    for student in distill:
        if student not in ARCHITECTURES:
            raise UserError(f"unknown --distill architecture {student!r}; choose {', '.join(ARCHITECTURES)}")
        models.append(AuthorizedModel(f"{student}<-{arch}+key", student, teacher=owner))
    return models


def authorized_summary(artifact: str, gate: bool = True) -> dict[str, str | bool]:
    """What a report says of the authorized network: architecture, key fingerprint, and
    whether it carried the confidence gate."""
    config, _ = load_uge_artifact(artifact, AUTHORIZED_FIELDS)
    return {"arch": config["authorized"], "key_fingerprint": config["key_fingerprint"],
            "key_projection": config["key_projection"], "confidence_gate": gate and bool(config.get("confidence_gate"))}
