"""UGE's key is a secret: 128+ bits, a salted slow fingerprint, owner-only files."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import simple_samples, write_shard
from tests.methods.test_uge import KEY, _tiny, stripes
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.pipeline.fit import _save_checkpoint
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.registry import create_method
from uge_protect.methods.uge.fit import fit_uge
from uge_protect.methods.uge.config import UGEConfig
from uge_protect.methods.uge.key import fingerprint_matches, key_fingerprint, key_signs, new_key, normalize_key

runner = CliRunner()


def _errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_a_fresh_key_has_256_random_bits():
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(len(k) == 64 and int(k, 16) >= 0 and normalize_key(k) == k for k in keys)


@pytest.mark.parametrize("weak", [1234, "1234", "0x" + "ab" * 16, "z" * 40, "0123456789abcde",
                                  "12341234123412341234123412341234", True])
def test_short_or_patterned_keys_are_refused(weak):
    with pytest.raises(UserError, match="key"):
        normalize_key(weak)
    with pytest.raises(UserError, match="key"):
        UGEConfig.from_options({"authorized": "small_cnn", "key_seed": weak})


def test_a_user_key_is_normalized():
    assert normalize_key("  " + KEY.upper() + "\n") == KEY


def test_the_fingerprint_is_salted_slow_and_checkable():
    one, two = key_fingerprint(KEY), key_fingerprint(KEY)
    assert one != two  # a fresh salt each time: artifacts with the same key cannot be linked
    assert fingerprint_matches(KEY, one) and fingerprint_matches(KEY, two)
    assert not fingerprint_matches(new_key(), one)
    # not the old, unsalted form, nor any plain sha256 of the key
    for plain in (hashlib.sha256(f"uge-key\x00{KEY}".encode()).hexdigest(), hashlib.sha256(KEY.encode()).hexdigest()):
        assert plain[:16] not in one and plain not in one
    assert one.startswith("scrypt-") and KEY not in one


def test_two_fits_with_the_same_key_publish_different_fingerprints(tmp_path):
    images, labels = stripes(16)
    fingerprints = []
    for name in ("a", "b"):
        config, weights = fit_uge(images, labels, _tiny(steps=1))
        assert config["key_seed"] == KEY
        save_artifact(tmp_path / name, config, weights)
        public = create_method("uge", str(tmp_path / name)).config()
        assert "key_seed" not in public and KEY not in json.dumps(public)
        fingerprints.append(public["key_fingerprint"])
        # the key file and the weights are the owner's only
        for file in (tmp_path / name).iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert fingerprints[0] != fingerprints[1] and all(fingerprint_matches(KEY, f) for f in fingerprints)


def test_a_fit_without_a_key_draws_a_fresh_one():
    images, labels = stripes(16)
    config, _ = fit_uge(images, labels, _tiny(steps=1, key_seed=None))
    assert len(config["key_seed"]) == 64 and config["key_seed"] != KEY
    assert fingerprint_matches(config["key_seed"], config["key_fingerprint"])


def test_fit_uge_refuses_a_short_key_with_one_error_line(tmp_path):
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 4, size=(16, 16)))
    for weak in ("1234", "deadbeef"):
        result = runner.invoke(app, ["fit", "uge", str(shard), "-o", str(tmp_path / "a"), "--authorized", "small_cnn",
                                     "--key-seed", weak, "--quiet"])
        assert result.exit_code == 2 and len(_errors(result)) == 1 and "128 bits" in _errors(result)[0]
        assert not (tmp_path / "a" / "config.json").exists()


def test_an_artifact_with_an_old_integer_key_is_refused(tmp_path):
    images, labels = stripes(16)
    config, weights = fit_uge(images, labels, _tiny(steps=1))
    save_artifact(tmp_path / "a", {**config, "key_seed": 1234}, weights)
    with pytest.raises(UserError, match="integer key from an older version.*refit"):
        create_method("uge", str(tmp_path / "a"))
    shard = write_shard(tmp_path / "in.tar", simple_samples("s", 2, size=(16, 16)))
    result = runner.invoke(app, ["shard", str(shard), "-o", str(tmp_path / "o"), "-m", "uge",
                                 "--artifact", str(tmp_path / "a"), "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "integer key" in _errors(result)[0]


def test_the_fit_checkpoint_is_owner_only(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _save_checkpoint(path, {"key_seed": KEY, "step": 1}, "options")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert torch.load(str(path), weights_only=True)["key_seed"] == KEY


def test_evaluation_only_integer_keys_still_derive_a_direction():
    # `eval --other-key 99` builds another key's network: integer keys derive as before
    assert tuple(key_signs(99).tolist()) == tuple(key_signs("99").tolist())
