"""T2UE's caption encoders: the MiniLM package offline, local directories, hostile model files."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from uge_protect.errors import UserError
from uge_protect.models.text_encoders import MINILM_SHA256, CachedEncoder, load_text_encoder, minilm_zip


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()


def test_minilm_loads_offline_from_the_installed_package_with_its_hash(minilm):
    assert minilm.identity == {"name": "minilm", "sha256": MINILM_SHA256, "dim": 384, "pooling": "mean"}
    e = minilm.encode(["a photo of a circle", "a photo of a square", "a picture of a circle"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    sims = e @ e.T
    # the published sentence-transformers output for these sentences
    assert abs(float(sims[0, 1]) - 0.656) < 0.01 and abs(float(sims[0, 2]) - 0.955) < 0.01


def test_a_wrong_hash_is_one_user_error():
    with pytest.raises(UserError, match="not the one recorded"):
        load_text_encoder("minilm", expected_sha256="0" * 64)


def test_embeddings_do_not_depend_on_what_they_are_batched_with(minilm):
    text = "a small red heart in the top left corner on a striped blue background"
    alone = minilm.encode([text])
    crowd = [f"caption {'with many words ' * (i % 9)} {i}" for i in range(150)]
    mixed = minilm.encode(crowd[:70] + [text] + crowd[70:])
    assert torch.equal(mixed[70], alone[0])
    cached = CachedEncoder(minilm, capacity=4)
    first = cached.encode([text, crowd[0], text])
    assert torch.equal(first[0], alone[0]) and torch.equal(first[2], alone[0])
    cached.encode(crowd[:10])  # evicts past the capacity
    assert len(cached._cache) == 4 and torch.equal(cached.encode([text])[0], alone[0])


def test_a_local_sentence_transformers_directory_matches_the_package(minilm, tmp_path):
    with zipfile.ZipFile(minilm_zip()) as zf:
        zf.extractall(tmp_path / "model")
    local = load_text_encoder(str(tmp_path / "model"), expected_sha256=MINILM_SHA256)
    assert local.identity["name"] == str((tmp_path / "model").resolve())
    texts = ["a dune under a grey sky", "a yellow flower"]
    assert torch.equal(local.encode(texts), minilm.encode(texts))


def test_hostile_or_broken_model_directories_are_user_errors(tmp_path):
    bad = tmp_path / "pickle-only"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    (bad / "config.json").write_text("{}")
    with pytest.raises(UserError, match="lacks model.safetensors, tokenizer.json"):
        load_text_encoder(str(bad))
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (junk / name).write_bytes(b"not what it says")
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        load_text_encoder(str(junk))
    (junk / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UserError, match="cannot build the caption encoder"):
        load_text_encoder(str(junk))
    with pytest.raises(UserError, match="unknown caption encoder"):
        load_text_encoder(str(tmp_path / "absent" / "dir"))
