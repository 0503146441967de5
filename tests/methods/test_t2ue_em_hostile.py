"""The em objective's caption encoder against hostile artifacts and model files: an artifact is
self-contained (it never makes loading read a path or a Hub name it records), a model
directory's config cannot pick a model class that fetches or allocate beyond its file, and a
generator's config cannot allocate beyond its weights."""

from __future__ import annotations

import json
import shutil
import socket
import zipfile

import pytest
import torch

from tests.methods.test_uge import stripes
from uge_protect.errors import UserError
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.t2ue.fit import fit_t2ue
from uge_protect.methods.t2ue.method import TextToUnlearnable
from uge_protect.methods.t2ue.config import T2UEConfig
from uge_protect.models.text_encoders import MINILM_SHA256, CachedEncoder, load_text_encoder, minilm_zip

TEXTS = ["a red thing", "a blue thing"]


@pytest.fixture
def no_network(monkeypatch):
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """MiniLM's files as a local sentence-transformers directory."""
    root = tmp_path_factory.mktemp("local-minilm")
    with zipfile.ZipFile(minilm_zip()) as zf:
        zf.extractall(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def local_fit(tmp_path_factory, local_model):
    """A tiny em artifact fitted with a local encoder directory run as such at apply
    (``contextual``; then the directory is moved away), and its noise."""
    root = tmp_path_factory.mktemp("em-local")
    model = root / "model"
    shutil.copytree(local_model, model)
    images, labels = stripes(16)
    captions = [f"a {'red' if int(y) else 'blue'} thing {i}" for i, y in enumerate(labels.tolist())]
    art = save_artifact(root / "art", *fit_t2ue(images, captions, T2UEConfig(
        text_encoder=str(model), text_encoding="contextual", steps=5, em_rounds=1, noise_size=16, width=2, z_dim=4, device="cpu"),
        labels=labels))
    z = torch.zeros((2, 4))
    before = TextToUnlearnable.from_artifact(str(art)).noise(TEXTS, z)
    shutil.rmtree(model)
    return art, z, before


def _edited(src, dest, change):
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    change(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_an_em_artifact_carries_its_encoder_and_loads_without_the_fit_s_directory(local_fit):
    art, z, before = local_fit
    assert (art / "text_encoder.safetensors").is_file()
    assert torch.equal(TextToUnlearnable.from_artifact(str(art)).noise(TEXTS, z), before)


@pytest.mark.parametrize("name", ["attacker/evil", "~", "."])
def test_loading_never_reads_a_path_or_hub_name_the_artifact_records(local_fit, tmp_path, name, no_network):
    art, _, _ = local_fit
    hostile = _edited(art, tmp_path / "art", lambda c: (c["text_encoder_identity"].update(name=name),
                                                        c.update(weights=["concepts", "generator"])))
    with pytest.raises(UserError, match="does not carry its files"):
        TextToUnlearnable.from_artifact(str(hostile))
    assert no_network == []


def _model_dir(local_model, dest, **config):
    shutil.copytree(local_model, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def test_a_model_config_cannot_pick_a_model_class_that_loads_a_backbone(local_model, tmp_path, no_network):
    bad = _model_dir(local_model, tmp_path / "detr", model_type="detr", use_timm_backbone=False,
                     use_pretrained_backbone=True, backbone="attacker/evil-backbone")
    with pytest.raises(UserError, match="model_type 'detr' is not a text encoder"):
        load_text_encoder(str(bad))
    assert no_network == []


def test_a_model_config_cannot_allocate_beyond_its_weights_file(local_model, tmp_path):
    huge = _model_dir(local_model, tmp_path / "huge", vocab_size=10 ** 9)
    with pytest.raises(UserError, match="word_embeddings.weight has the wrong shape"):
        load_text_encoder(str(huge))
    deep = _model_dir(local_model, tmp_path / "deep", num_hidden_layers=10 ** 6)
    with pytest.raises(UserError, match="num_hidden_layers does not fit"):
        load_text_encoder(str(deep))


@pytest.mark.parametrize("field, value", [("width", 10 ** 7), ("noise_size", 10 ** 5), ("z_dim", 10 ** 9)])
def test_a_generator_config_cannot_allocate_beyond_its_weights(local_fit, tmp_path, field, value):
    art, _, _ = local_fit
    hostile = _edited(art, tmp_path / "art", lambda c: c.update({field: value}))
    with pytest.raises(UserError, match="weights do not fit its config") as err:
        TextToUnlearnable.from_artifact(str(hostile))
    assert "allocate" not in str(err.value)


def test_cached_rows_do_not_keep_their_batch_alive(local_model):
    cached = CachedEncoder(load_text_encoder(str(local_model), expected_sha256=MINILM_SHA256))
    cached.encode([f"caption {i}" for i in range(32)])
    row = cached._cache["caption 5"]
    assert row.untyped_storage().nbytes() == row.numel() * row.element_size()
