"""Loading an artifact never fetches anything and never reads files outside it because of what
its config names: CLIP configs that point at the Hub, a local directory, a path or a URL, or
that would make transformers / timm download, are one error line; the Hub is kept offline
while a method is built from an artifact, and any error from building is one UserError."""

from __future__ import annotations

import copy
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, write_shard
from tests.methods.test_t2ue import TINY_CLIP
from tests.methods.test_uge import _tiny as tiny_uge
from tests.methods.test_uge import stripes
from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.methods.artifact import loading, save_artifact
from uge_protect.models.clip import external_model_reference, recorded_model_config
from uge_protect.methods.em.clip import fit_em_clip
from uge_protect.methods.em.config import EMClipConfig
from uge_protect.methods.registry import create_method
from uge_protect.methods.t2ue.fit import fit_t2ue
from uge_protect.methods.t2ue.config import T2UEConfig
from uge_protect.methods.uge.fit import fit_uge

runner = CliRunner()
REFUSAL = "names a remote or external model"


def _with_text(**extra) -> dict:
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["text_cfg"].update(extra)
    return cfg


def _with_vision(**extra) -> dict:
    cfg = copy.deepcopy(TINY_CLIP)
    cfg["vision_cfg"].update(extra)
    return cfg


def hostile_models(local_dir: Path) -> dict[str, object]:
    """What an untrusted artifact may name as its CLIP, each of which would fetch or read outside it."""
    return {
        "hf-hub name": "hf-hub:attacker/evil",
        "local-dir name": f"local-dir:{local_dir}",
        "path": str(local_dir / "open_clip_config.json"),
        "url": "https://attacker.example/evil.json",
        "hf text tower": _with_text(hf_model_name="attacker/evil-text", hf_tokenizer_name="attacker/evil-tok",
                                    hf_proj_type="linear", hf_pooler_type="mean_pooler"),
        "hf tokenizer": _with_text(hf_tokenizer_name="attacker/evil-tok"),
        "timm hub tower": _with_vision(timm_model_name="hf-hub:attacker/evil"),
        "timm pretrained": _with_vision(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=True),
        "built-in name with a Hub tokenizer": "ViT-B-16-SigLIP",
        "nested url": _with_text(tokenizer_kwargs={"url": "https://attacker.example/vocab"}),
    }


@pytest.fixture
def no_network(monkeypatch):
    """Every connection or name lookup is recorded and refused; the Hub is online as far as
    huggingface_hub knows, so only what the code does keeps it from fetching."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return attempts


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny T2UE and clip-mode EM artifact, a shard of captioned images, a local model directory."""
    root = tmp_path_factory.mktemp("nofetch")
    images, labels = stripes(8)
    captions = [f"a {'red' if int(y) else 'blue'} thing number {i}" for i, y in enumerate(labels.tolist())]
    t2ue = save_artifact(root / "t2ue", *fit_t2ue(images, captions, T2UEConfig(
        objective="infonce", surrogate=TINY_CLIP, noise_size=16, width=8, z_dim=8, steps=1, warmup_steps=1, batch_size=8, device="cpu")))
    em = save_artifact(root / "em", *fit_em_clip(images, captions, EMClipConfig(
        clip_model=TINY_CLIP, train_batches=1, max_rounds=1, pgd_steps=1, batch_size=8, bank_size=4, device="cpu")))
    local = root / "local-model"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    shard = write_shard(root / "in.tar", [
        (f"s{i}", {"png": png_bytes(random_image(np.random.default_rng(i), 16, 16)),
                   "txt": captions[i].encode()}) for i in range(2)])
    return {"t2ue": t2ue, "em": em, "local": local, "shard": shard}


def _hostile_copy(src: Path, dest: Path, field: str, value: object) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, field: value}))
    return dest


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def _one_refusal(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = _errors(result)
    assert len(errors) == 1 and REFUSAL in errors[0] and "refit" in errors[0], result.output


@pytest.mark.parametrize("case", list(hostile_models(Path("/x"))))
def test_noise_and_shard_refuse_a_t2ue_artifact_naming_an_external_model(fitted, case, tmp_path, no_network):
    art = _hostile_copy(fitted["t2ue"], tmp_path / "art", "surrogate", hostile_models(fitted["local"])[case])
    noise = tmp_path / "n.png"
    _one_refusal(runner.invoke(app, ["noise", "--artifact", str(art), "--text", "hi", "--size", "16", "16",
                                     "-o", str(noise)]))
    assert not noise.exists()
    out = tmp_path / "out"
    _one_refusal(runner.invoke(app, ["shard", str(fitted["shard"]), "-o", str(out), "-m", "t2ue", "--artifact",
                                     str(art), "--workers", "0", "--quiet"]))
    assert not list(out.glob("shards/*.tar"))
    assert no_network == []


@pytest.mark.parametrize("case", ["hf-hub name", "local-dir name", "hf text tower", "timm pretrained"])
def test_shard_refuses_a_clip_mode_em_artifact_naming_an_external_model(fitted, case, tmp_path, no_network):
    art = _hostile_copy(fitted["em"], tmp_path / "art", "clip_model", hostile_models(fitted["local"])[case])
    out = tmp_path / "out"
    _one_refusal(runner.invoke(app, ["shard", str(fitted["shard"]), "-o", str(out), "-m", "em", "--artifact",
                                     str(art), "--workers", "0", "--quiet"]))
    assert not list(out.glob("shards/*.tar"))
    assert no_network == []


def test_the_fitted_artifacts_still_load_offline(fitted, no_network):
    for method in ("t2ue", "em"):
        create_method(method, str(fitted[method]))
    assert no_network == []


def test_a_uge_artifact_never_builds_its_feature_model_when_loaded(tmp_path, no_network):
    """UGE's apply and eval read the generator and the key only: a hostile feature_model is never fetched."""
    images, labels = stripes(16)
    art = save_artifact(tmp_path / "uge", *fit_uge(images, labels, tiny_uge(steps=1)))
    config = json.loads((art / "config.json").read_text())
    (art / "config.json").write_text(json.dumps({**config, "feature_model": "hf-hub:attacker/evil"}))
    create_method("uge", str(art))
    assert no_network == []


def test_only_self_contained_model_configs_count_as_local(fitted):
    for local in (TINY_CLIP, "ViT-B-32", "RN50", _with_vision(timm_model_name="vit_tiny_patch16_224")):
        assert external_model_reference(local) is None, local
    for case, value in hostile_models(fitted["local"]).items():
        assert external_model_reference(value) is not None, case
    for value in (None, 3, ["ViT-B-32"], "no-such-model", "roberta-ViT-B-32"):
        assert external_model_reference(value) is not None, value


def test_a_fit_records_a_local_dir_model_inline_and_refuses_a_hub_text_tower_before_building(fitted, no_network):
    recorded = recorded_model_config(f"local-dir:{fitted['local']}", "the surrogate")
    assert recorded == TINY_CLIP
    with pytest.raises(UserError, match="needs files from outside the artifact"):
        recorded_model_config(hostile_models(fitted["local"])["hf text tower"], "the CLIP model")
    images, labels = stripes(8)
    with pytest.raises(UserError, match="needs files from outside the artifact"):
        fit_em_clip(images, [f"c{i}" for i in range(8)], EMClipConfig(
            clip_model=hostile_models(fitted["local"])["hf tokenizer"], max_rounds=1, device="cpu"))
    assert no_network == []


def test_a_t2ue_fit_on_a_local_dir_surrogate_loads_from_its_own_files(fitted, tmp_path):
    local = tmp_path / "model"
    shutil.copytree(fitted["local"], local)
    images, _ = stripes(8)
    config, weights = fit_t2ue(images, [f"caption {i}" for i in range(8)], T2UEConfig(
        objective="infonce", surrogate=f"local-dir:{local}", noise_size=16, width=8, z_dim=8, steps=1, warmup_steps=1,
        batch_size=8, device="cpu"))
    assert isinstance(config["surrogate"], dict) and config["surrogate"]["text_cfg"] == TINY_CLIP["text_cfg"]
    art = save_artifact(tmp_path / "art", config, weights)
    shutil.rmtree(local)  # the artifact needs nothing outside itself
    create_method("t2ue", str(art))


def test_loading_keeps_the_hub_offline_and_turns_any_error_into_one_user_error(tmp_path, no_network):
    from huggingface_hub import constants, hf_hub_download

    with pytest.raises(UserError, match="does not load"):
        with loading(tmp_path, "T2UE"):
            hf_hub_download("attacker/evil", "open_clip_config.json", cache_dir=str(tmp_path / "cache"))
    assert no_network == [] and constants.HF_HUB_OFFLINE is False  # restored
    with pytest.raises(UserError, match=r"OSError: boom"):
        with loading(tmp_path, "T2UE"):
            raise OSError("boom\nsecond line")


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        self.requests.append(f"GET {self.path}")
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_noise_with_a_hostile_artifact_sends_no_request_to_the_hub(fitted, tmp_path):
    """End to end, in a fresh process with the Hub online at a local recording server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    try:
        for case in ("hf-hub name", "hf text tower"):
            art = _hostile_copy(fitted["t2ue"], tmp_path / case.replace(" ", "-"), "surrogate",
                                hostile_models(fitted["local"])[case])
            result = subprocess.run([sys.executable, "-m", "uge_protect.cli.app", "noise", "--artifact", str(art),
                                     "--text", "hi", "-o", str(tmp_path / "n.png")],
                                    env=env, capture_output=True, text=True, timeout=300)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and REFUSAL in lines[0], result.stderr
            assert _Recorder.requests == []
    finally:
        server.shutdown()
