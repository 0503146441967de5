"""The method contract: budget helpers, per-sample seeds, the random control, artifacts, and
what every registered method guarantees the pipeline (round trip of its artifact, the budget
after quantization, batch-size independence, determinism), checked on a tiny real instance
of each."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pytest
import torch

from uge_protect.errors import UserError
from uge_protect.methods.artifact import artifact_fingerprint, load_artifact, save_artifact
from uge_protect.methods.base import ProtectBatch, ProtectionMethod, sample_seed
from uge_protect.methods.budget import apply_perturbation, budget_levels, delta_levels, finite_samples, linf_levels, psnr
from uge_protect.methods.random_noise import RandomNoise
from uge_protect.methods.registry import create_method, method_names

if TYPE_CHECKING:
    from tests.methods.conftest import TinyFit, TinyFits


def test_budget_holds_after_quantization_for_any_delta():
    g = torch.Generator().manual_seed(0)
    original = torch.randint(0, 256, (4, 3, 9, 9), generator=g, dtype=torch.uint8)
    original[0] = 0
    original[1] = 255
    delta = (torch.rand(original.shape, generator=g) - 0.5) * 0.5  # far outside the budget
    out = apply_perturbation(original, delta, 8 / 255)
    diff = (out.int() - original.int()).abs()
    assert out.dtype == torch.uint8 and diff.max() == 8
    assert budget_levels(8 / 255) == 8 and budget_levels(4 / 255) == 4
    small = apply_perturbation(original, torch.full(original.shape, 2 / 255), 8 / 255)
    room = original[2:] <= 253
    assert ((small.int() - original.int())[2:][room] == 2).all()
    assert (small[1] == 255).all()  # clipped at white
    as_levels = apply_perturbation(original, torch.full(original.shape, 2, dtype=torch.int8), 8 / 255)
    assert torch.equal(as_levels, small)
    assert torch.equal(apply_perturbation(original, torch.full(original.shape, 100, dtype=torch.int16), 8 / 255),
                       apply_perturbation(original, torch.full(original.shape, 1.0), 8 / 255))


def test_a_float_delta_gives_what_its_rounded_levels_give_in_any_layout_and_dtype():
    g = torch.Generator().manual_seed(1)
    original = torch.randint(0, 256, (3, 5, 7, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)  # HWC view
    delta = (torch.rand(original.shape, generator=g) - 0.5) * 0.2
    delta[0, 0, 0, :3] = torch.tensor([1.5 / 255, -2.5 / 255, 1e30])  # halves round to even; a huge value clips
    expected = (original.to(torch.int16) + torch.round(delta * 255).clamp(-8, 8).to(torch.int16)).clamp(0, 255)
    for d in (delta, delta.contiguous(memory_format=torch.channels_last), delta.clamp(-1, 1).half()):
        want = expected if d.dtype == torch.float32 else (
            original.to(torch.int16) + delta_levels(d, 8 / 255)).clamp(0, 255)
        assert torch.equal(apply_perturbation(original, d, 8 / 255), want.to(torch.uint8))
    assert int((apply_perturbation(original, delta, 8 / 255).int() - original.int()).abs().max()) == 8


def test_finite_samples_finds_nan_and_inf_and_keeps_huge_finite_values():
    delta = torch.zeros(5, 3, 4, 4)
    delta[1, 2, 3, 3] = float("nan")
    delta[2, 0, 0, 0] = float("inf")
    delta[3, 0, 0, 0], delta[3, 1, 0, 0] = float("inf"), float("-inf")  # their sum is NaN
    delta[4] = 3e38  # finite values whose sum overflows
    assert finite_samples(delta).tolist() == [True, False, False, False, True]
    assert finite_samples(torch.zeros(2, 3, 4, 4, dtype=torch.int8)).tolist() == [True, True]
    with pytest.raises(ValueError, match="non-finite"):
        apply_perturbation(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), delta, 8 / 255)
    zeroed = torch.where(finite_samples(delta).view(-1, 1, 1, 1), delta, torch.zeros_like(delta))
    assert torch.equal(apply_perturbation(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), zeroed, 8 / 255,
                                          checked_finite=True)[1:4], torch.zeros(3, 3, 4, 4, dtype=torch.uint8))
    huge = torch.full((1, 3, 4, 4), 3e38)
    assert int(apply_perturbation(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), huge, 8 / 255).max()) == 8


def test_linf_and_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert linf_levels(a, b) == 0 and psnr(a, b) == float("inf")
    b[0, 0, 0] = 10
    assert linf_levels(a, b) == 10
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / (100 / 48)))


def test_sample_seed_is_stable_and_key_dependent():
    assert sample_seed(0, "a") == sample_seed(0, "a")
    assert len({sample_seed(0, "a"), sample_seed(0, "b"), sample_seed(1, "a")}) == 3
    assert 0 <= sample_seed(123, "x") < 2**63


def _batch(keys, size=8):
    pixels = torch.randint(0, 256, (len(keys), 3, size, size), dtype=torch.uint8)
    return ProtectBatch(pixels, keys, [sample_seed(0, k) for k in keys], [None] * len(keys), [None] * len(keys))


def test_random_noise_is_per_key_uniform_and_within_budget():
    m = RandomNoise(epsilon=8 / 255)
    d1 = m.perturb(_batch(["a", "b", "c"], 32))
    assert not d1.is_floating_point()  # integer δ: uint8 levels
    levels = d1.int()
    assert levels.min() == -8 and levels.max() == 8
    counts = torch.bincount((levels + 8).flatten(), minlength=17).float()
    assert counts.min() > 0.8 * counts.mean()  # roughly uniform over the 17 levels
    assert m.config()["protects"] is False


def test_registry_hides_passthrough_and_rejects_unknown_methods():
    assert "random" in method_names() and "passthrough" not in method_names()
    with pytest.raises(UserError, match="unknown method"):
        create_method("passthrough")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        create_method("nope")
    with pytest.raises(UserError, match="takes no --artifact"):
        create_method("random", artifact="/tmp")
    assert create_method("passthrough", allow_hidden=True).name == "passthrough"


def test_artifact_round_trip_and_fingerprint(tmp_path):
    weights = {"generator": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}}
    save_artifact(tmp_path / "a", {"method": "x", "epsilon": 0.03}, weights)
    config, loaded = load_artifact(tmp_path / "a", expected_method="x")
    assert config["epsilon"] == 0.03 and config["weights"] == ["generator"] and "package_version" in config
    assert torch.equal(loaded["generator"]["w"], weights["generator"]["w"])
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"config.json", "generator.safetensors"}
    fp = artifact_fingerprint(tmp_path / "a")
    weights["generator"]["b"] = torch.zeros(2)
    save_artifact(tmp_path / "a", {"method": "x", "epsilon": 0.03}, weights)
    assert artifact_fingerprint(tmp_path / "a") != fp


def test_bad_artifacts_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_artifact(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_artifact(tmp_path / "empty")
    save_artifact(tmp_path / "a", {"method": "x"}, {"g": {"w": torch.ones(1)}})
    with pytest.raises(UserError, match="made by method 'x', not 'y'"):
        load_artifact(tmp_path / "a", expected_method="y")
    (tmp_path / "a" / "g.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="unreadable"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{bad json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_artifact(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"method": "x", "weights": ["gone"]}))
    with pytest.raises(UserError, match="missing its weights"):
        load_artifact(tmp_path / "a")


# --------------------------------------------------------------------------- every registered method


@dataclass
class Case:
    """One configuration of a registered method: how to build it, and the samples it is applied to."""

    name: str
    #: The tiny fit whose artifact the method is loaded from; None for a method without one.
    fit: "TinyFit | None"
    #: Options given to ``create_method`` with the artifact (e.g. T2UE's class mode).
    options: dict[str, Any] = field(default_factory=dict)
    #: δ is drawn from each sample's seed: another seed gives another δ (else the same δ).
    seeded: bool = False

    def make(self) -> ProtectionMethod:
        """The method as the pipeline builds it: by name, from the artifact directory."""
        artifact = None if self.fit is None else str(self.fit.path)
        return create_method(self.name, artifact, allow_hidden=True, **self.options)

    def batch(self, order: list[int] | range, run_seed: int = 0, size: tuple[int, int] | None = None) -> ProtectBatch:
        """Samples ``order`` of the contract's pool: the first images the method was fitted on
        (random ones without a fit), sample 0 made black and sample 1 white so the budget
        meets the image box; keys ``c0``, ``c1``, ... with seeds from ``run_seed``; resized
        (nearest) to ``size`` when given."""
        if self.fit is None:
            pixels = torch.randint(0, 256, (POOL, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8)
            labels, captions = [i % 2 for i in range(POOL)], [f"caption {i}" for i in range(POOL)]
        else:
            pixels = self.fit.images[:POOL].clone()
            labels, captions = [int(v) for v in self.fit.labels[:POOL]], self.fit.captions[:POOL]
        pixels[0], pixels[1] = 0, 255
        if size is not None:
            pixels = torch.nn.functional.interpolate(pixels.float(), size=size).to(torch.uint8)
        idx = list(order)
        keys = [f"c{i}" for i in idx]
        return ProtectBatch(pixels[idx], keys, [sample_seed(run_seed, k) for k in keys],
                            [captions[i] for i in idx], [labels[i] for i in idx])


#: Samples each case is applied to (batches of 1, 3 and all of them).
POOL = 8
COLOURS = ["red", "green", "blue", "yellow"]

#: The contract's configurations of every registered method, by method name. A newly
#: registered method fails the contract until it has an entry here, built from the
#: cheapest real instance (a tiny fit in ``tests/methods/conftest.py``).
CASES: dict[str, dict[str, Callable[["TinyFits"], Case]]] = {
    "random": {"random": lambda fits: Case("random", None, seeded=True)},
    "passthrough": {"passthrough": lambda fits: Case("passthrough", None)},
    "em": {
        "em-sample": lambda fits: Case("em", fits.em("sample"), seeded=True),
        "em-class": lambda fits: Case("em", fits.em("class")),
        "em-clip": lambda fits: Case("em", fits.em_clip(), seeded=True),
    },
    "t2ue": {
        "t2ue-static": lambda fits: Case("t2ue", fits.t2ue_em("static"), seeded=True),
        "t2ue-static-class": lambda fits: Case("t2ue", fits.t2ue_em("static"),
                                               {"mode": "class", "class_names": COLOURS}),
        "t2ue-contextual": lambda fits: Case("t2ue", fits.t2ue_em("contextual"), seeded=True),
        "t2ue-infonce-ssa": lambda fits: Case("t2ue", fits.t2ue_infonce("ssa"), seeded=True),
        "t2ue-infonce-unet": lambda fits: Case("t2ue", fits.t2ue_infonce("unet"), seeded=True),
    },
    "uge": {"uge": lambda fits: Case("uge", fits.uge())},
}

CASE_IDS = [(name, case) for name in method_names(include_hidden=True) for case in CASES.get(name) or [None]]


@pytest.fixture(scope="session")
def _built_cases() -> dict[str, Case]:
    """The cases built so far this session, by case id (each built on first use)."""
    return {}


@pytest.fixture(params=CASE_IDS, ids=lambda p: p[1] or f"{p[0]}-without-a-case")
def case(request: pytest.FixtureRequest, tiny_fits: "TinyFits", _built_cases: dict[str, Case]) -> Case:
    """The contract case of a registered method; a method without one fails here."""
    name, case_id = request.param
    if case_id is None:
        pytest.fail(f"method {name!r} is registered but the method contract does not cover it: add a case for it "
                    "to CASES in tests/methods/test_contract.py, built from a tiny fit in tests/methods/conftest.py")
    if case_id not in _built_cases:
        _built_cases[case_id] = CASES[name][case_id](tiny_fits)
    return _built_cases[case_id]


def test_every_registered_method_has_a_contract_case_and_no_case_is_stale():
    registered = set(method_names(include_hidden=True))
    missing = sorted(registered - set(CASES))
    assert not missing, f"no contract case for {missing}: add one to CASES in tests/methods/test_contract.py"
    assert set(CASES) <= registered, f"CASES names unregistered methods: {sorted(set(CASES) - registered)}"
    for name, cases in CASES.items():
        assert cases, f"CASES has no case for {name!r}"


def test_round_trip_of_the_artifact_gives_the_same_delta(case, tmp_path):
    method = case.make()
    batch = case.batch(range(POOL))
    if case.fit is None:  # a method without an artifact: its name and options are all of it
        with pytest.raises(UserError, match="takes no --artifact"):
            create_method(case.name, str(tmp_path), allow_hidden=True)
        assert torch.equal(case.make().perturb(batch), method.perturb(batch))
        assert method.fingerprint() is None
        return
    config, weights = load_artifact(case.fit.path, expected_method=case.name)
    assert json.loads(json.dumps(case.fit.config)).items() <= config.items()
    assert set(weights) == set(case.fit.weights)
    for group, tensors in case.fit.weights.items():
        assert set(weights[group]) == set(tensors), group
        for k, v in tensors.items():
            assert weights[group][k].dtype == v.dtype and torch.equal(weights[group][k], v), (group, k)
    direct = type(method)(case.fit.config, case.fit.weights, **case.options)  # the fit's output, never saved
    assert torch.equal(method.perturb(batch), direct.perturb(batch))
    assert method.fingerprint() == artifact_fingerprint(case.fit.path)


@pytest.mark.parametrize("size", [None, (24, 20)], ids=["fit-size", "24x20"])
def test_budget_holds_after_quantization(case, size):
    method = case.make()
    batch = case.batch(range(POOL), size=size)
    delta = method.perturb(batch)
    assert delta.shape == batch.pixels.shape
    out = apply_perturbation(batch.pixels, delta, method.epsilon)
    assert out.dtype == torch.uint8 and out.shape == batch.pixels.shape
    diff = (out.int() - batch.pixels.int()).abs().flatten(1)
    assert int(diff.max()) <= budget_levels(method.epsilon)
    if method.perturbs:  # the pipeline refuses to write a sample that comes back unchanged
        assert bool((diff.amax(1) > 0).all()), f"unchanged samples: {(diff.amax(1) == 0).nonzero().flatten().tolist()}"
    else:
        assert int(diff.max()) == 0


def test_delta_is_independent_of_the_batch_a_sample_is_in(case):
    method = case.make()
    full = method.perturb(case.batch(range(POOL)))
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    for size in (1, 3):
        for start in range(0, POOL, size):
            part = order[start:start + size]
            assert torch.equal(method.perturb(case.batch(part)), full[part]), (size, part)


def test_delta_is_deterministic_and_seeded_only_where_random(case):
    method = case.make()
    batch = case.batch(range(POOL))
    first = method.perturb(batch)
    assert torch.equal(method.perturb(batch), first)
    assert torch.equal(case.make().perturb(case.batch(range(POOL))), first)  # another instance, a fresh batch
    reseeded = method.perturb(case.batch(range(POOL), run_seed=1))
    changed = [not torch.equal(reseeded[i], first[i]) for i in range(POOL)]
    if case.seeded:
        assert all(changed), f"another seed left samples {[i for i, c in enumerate(changed) if not c]} unchanged"
    else:
        assert not any(changed), "δ depends on the seed although the case says it does not"


def test_a_text_only_method_never_reads_the_pixels(case):
    """``text_only`` (noise made without the image, ``uge-protect noise``): δ is the same for any pixels."""
    method = case.make()
    if not method.text_only:
        return
    batch = case.batch(range(POOL))
    inverted = ProtectBatch(255 - batch.pixels, batch.keys, batch.seeds, batch.captions, batch.labels)
    assert torch.equal(method.perturb(inverted), method.perturb(batch))
