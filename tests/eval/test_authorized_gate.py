"""`eval --authorized`: the owner's network carries the artifact's confidence gate; the gate
counts in the run cache only where the owner teaches a distilled student."""

from __future__ import annotations

import torch

from tests.methods.test_uge import EPS, KEY, _patterned
from uge_protect.eval.authorized import authorized_entries, authorized_summary
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.uge.key import key_fingerprint


def _artifact(path, gate: bool, patterns: torch.Tensor):
    config = {"method": "uge", "authorized": "small_cnn", "key_seed": KEY, "key_projection": True,
              "key_fingerprint": key_fingerprint(KEY), "label_conditioned": True, "confidence_gate": gate,
              "gate_scale": 30.0, "epsilon": EPS}
    save_artifact(path, config, {"generator": {"patterns": patterns}})
    return str(path)


def test_owner_carries_the_gate_and_only_students_cache_on_it(tmp_path):
    clean, protected, patterns, _ = _patterned(8)
    gated = _artifact(tmp_path / "gated", True, patterns)
    owner, other, student = authorized_entries(gated, [7], ["vgg11"])
    assert (owner.label, other.label, student.label) == ("small_cnn+key", "small_cnn+key:7", "vgg11<-small_cnn+key")
    net = owner.factory(4)().eval()
    assert net.gate is not None and other.factory(4)().gate is None
    with torch.no_grad():
        bare = net.net(net.projection(protected.float() / 255))
        assert torch.equal(net(protected.float() / 255), 30.0 * torch.nn.functional.one_hot(bare.argmax(1), 4))
        assert torch.allclose(net(clean.float() / 255), net.net(net.projection(clean.float() / 255)))
    # the gate changes no training run and no prediction of the owner: same cache entry as without it
    plain = _artifact(tmp_path / "plain", False, patterns)
    p_owner, _, p_student = authorized_entries(plain, [7], ["vgg11"])
    assert p_owner.factory(4)().gate is None
    assert owner.cache_tag() == p_owner.cache_tag() and "gate" not in other.cache_tag()
    assert "gate" in student.cache_tag() and student.cache_tag() != p_student.cache_tag()
    assert str(KEY) not in student.cache_tag()
    assert authorized_summary(gated)["confidence_gate"] is True
    assert authorized_summary(gated, gate=False)["confidence_gate"] is False
    bare_owner, _, bare_student = authorized_entries(gated, [7], ["vgg11"], gate=False)  # eval --no-gate
    assert bare_owner.factory(4)().gate is None and bare_student.cache_tag() == p_student.cache_tag()
    assert authorized_summary(plain)["confidence_gate"] is False
