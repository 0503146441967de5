"""`apply-noise` and `noise` treat their inputs as untrusted: a noise file that protects
nothing, lies about its budget, is malformed, is not a PNG or is a decompression bomb, an
image the noise leaves unchanged, and oversized `noise` requests are each one error line,
exit 2, and nothing written."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image
from tests.methods.test_t2ue import TINY_CLIP
from tests.methods.test_uge import stripes
from uge_protect.cli.app import app
from uge_protect.pipeline.zero_contact import MAX_NOISE_PIXELS, MAX_TEXT_CHARS, META_KEY, read_noise
from uge_protect.methods.artifact import save_artifact
from uge_protect.methods.t2ue.fit import fit_t2ue
from uge_protect.methods.t2ue.config import T2UEConfig

runner = CliRunner()
OK_META = {"method": "t2ue", "epsilon": 8 / 255, "budget_levels": 8}
PLUS4 = np.full((16, 16, 3), 4, np.int16)


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def _refused(result, *, match: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = _errors(result)
    assert len(errors) == 1 and match in errors[0], result.output


def noise_png(levels: np.ndarray | None = None, meta_text: str | None = json.dumps(OK_META), mode: str = "RGB",
              fmt: str = "PNG") -> bytes:
    """A noise file as `uge-protect noise` writes it (pixels 128 + δ, settings in an iTXt chunk)."""
    lv = np.zeros((16, 16, 3), np.int16) if levels is None else levels
    info = PngImagePlugin.PngInfo()
    if meta_text is not None:
        info.add_itxt(META_KEY, meta_text)
    img = Image.fromarray((lv + 128).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"pnginfo": info} if fmt == "PNG" else {}))
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` × ``height`` (what a bomb looks like before decoding)."""
    data = bytearray(noise_png())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def _meta(**changes) -> str:
    return json.dumps({**OK_META, **changes})


#: name → (noise file bytes, what the error line says)
HOSTILE_NOISE = {
    "zero noise": (noise_png(), "holds no noise"),
    "epsilon 0": (noise_png(PLUS4, _meta(epsilon=0)), "'epsilon'"),
    "epsilon NaN": (noise_png(PLUS4, _meta(epsilon=float("nan"))), "'epsilon'"),
    "epsilon of another budget": (noise_png(PLUS4, _meta(epsilon=16 / 255)), "'epsilon'"),
    "epsilon a string": (noise_png(PLUS4, _meta(epsilon="0.03")), "'epsilon'"),
    "settings a JSON list": (noise_png(PLUS4, "[1, 2]"), "not a JSON object"),
    "settings not JSON": (noise_png(PLUS4, "{nope"), "not valid JSON"),
    "settings deeply nested": (noise_png(PLUS4, "[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "no epsilon": (noise_png(PLUS4, json.dumps({"budget_levels": 8})), "lack 'epsilon'"),
    "budget 1e400": (noise_png(PLUS4, '{"budget_levels": 1e400, "epsilon": 0.03}'), "'budget_levels'"),
    "budget 0": (noise_png(PLUS4, _meta(budget_levels=0, epsilon=0.001)), "'budget_levels'"),
    "budget 256": (noise_png(PLUS4, _meta(budget_levels=256, epsilon=1.0)), "'budget_levels'"),
    "budget true": (noise_png(PLUS4, _meta(budget_levels=True, epsilon=1 / 255)), "'budget_levels'"),
    "size of another image": (noise_png(PLUS4, _meta(size=[8, 8])), "'size'"),
    "noise over its budget": (noise_png(np.full((16, 16, 3), 9, np.int16)), "exceeds its own budget"),
    "no settings": (noise_png(PLUS4, None), "not a noise file"),
    "bomb 20000x10000": (png_claiming(20000, 10000), "decompression bomb"),
    "over the pixel limit": (png_claiming(9000, 8000), "pixel limit"),
    "EPS": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n", "not a PNG"),
    "JPEG": (noise_png(PLUS4, None, fmt="JPEG"), "not a PNG"),
    "grayscale PNG": (noise_png(PLUS4, mode="L"), "not the RGB one"),
}


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes(random_image(np.random.default_rng(3), 16, 16)))
    return path


def test_a_good_noise_file_is_applied(image, tmp_path):
    noise = tmp_path / "n.png"
    noise.write_bytes(noise_png(PLUS4))
    out = tmp_path / "out.png"
    result = runner.invoke(app, ["apply-noise", str(image), str(noise), "-o", str(out)])
    assert result.exit_code == 0, result.output
    diff = np.asarray(Image.open(out)).astype(int) - np.asarray(Image.open(image).convert("RGB")).astype(int)
    assert diff.any() and np.abs(diff).max() <= 4


@pytest.mark.parametrize("case", list(HOSTILE_NOISE))
def test_apply_noise_refuses_a_hostile_noise_file(case, image, tmp_path):
    data, match = HOSTILE_NOISE[case]
    noise = tmp_path / "noise.png"
    noise.write_bytes(data)
    out = tmp_path / "out.png"
    _refused(runner.invoke(app, ["apply-noise", str(image), str(noise), "-o", str(out)]), match=match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "noise.png"]  # no output, no temporary


def test_read_noise_never_hands_a_file_to_another_decoder(tmp_path, monkeypatch):
    """Only Pillow's PNG plugin is asked to open a noise file."""
    asked = []
    original = Image.open

    def spy(fp, mode="r", formats=None):
        asked.append(formats)
        return original(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    noise = tmp_path / "n.png"
    noise.write_bytes(noise_png(PLUS4))
    read_noise(noise)
    assert asked == [["PNG"]]


def test_apply_noise_refuses_a_result_identical_to_the_image(tmp_path):
    white = tmp_path / "white.png"
    white.write_bytes(png_bytes(np.full((16, 16, 3), 255, np.uint8)))
    noise = tmp_path / "n.png"
    noise.write_bytes(noise_png(PLUS4))  # +4 everywhere: clipped away on a white image
    out = tmp_path / "out.png"
    _refused(runner.invoke(app, ["apply-noise", str(white), str(noise), "-o", str(out)]), match="no_perturbation")
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("which", ["noise", "image"])
def test_apply_noise_refuses_a_fifo_instead_of_blocking(which, image, tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    noise = tmp_path / "n.png"
    noise.write_bytes(noise_png(PLUS4))
    args = [str(image), str(fifo)] if which == "noise" else [str(fifo), str(noise)]
    out = tmp_path / "out.png"
    _refused(runner.invoke(app, ["apply-noise", *args, "-o", str(out)]), match="not a regular file")
    assert not out.exists()


@pytest.mark.parametrize("case", ["EPS", "bomb"])
def test_apply_noise_decodes_the_image_as_shard_does(case, tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n" if case == "EPS"
                      else png_claiming(20000, 10000))
    noise = tmp_path / "n.png"
    noise.write_bytes(noise_png(PLUS4))
    out = tmp_path / "out.png"
    _refused(runner.invoke(app, ["apply-noise", str(image), str(noise), "-o", str(out)]), match="cannot decode image")
    assert not out.exists()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    images, _ = stripes(8)
    config, weights = fit_t2ue(images, [f"caption {i}" for i in range(8)], T2UEConfig(
        objective="infonce", surrogate=TINY_CLIP, noise_size=16, width=8, z_dim=8, steps=1, warmup_steps=1, batch_size=8, device="cpu"))
    return save_artifact(tmp_path_factory.mktemp("zc") / "art", config, weights)


@pytest.mark.parametrize("args, match", [
    (["--text", "x" * (MAX_TEXT_CHARS + 1)], "--text is"),
    (["--text", "hi", "--key", "k" * (MAX_TEXT_CHARS + 1)], "--key is"),
    (["--text", "hi", "--size", "100000", "100000"], "exceeds the"),
    (["--text", "hi", "--size", str(MAX_NOISE_PIXELS), "2"], "exceeds the"),
    (["--text", "hi", "--size", "0", "16"], "must be positive"),
    (["--text", "\udcff"], "not valid UTF-8"),
])
def test_noise_bounds_its_inputs(artifact, args, match, tmp_path):
    out = tmp_path / "n.png"
    _refused(runner.invoke(app, ["noise", "--artifact", str(artifact), *args, "-o", str(out)]), match=match)
    assert not out.exists()


def test_noise_refuses_to_write_a_zero_noise(artifact, tmp_path):
    zeroed = tmp_path / "art"
    shutil.copytree(artifact, zeroed)
    state = {k: torch.zeros_like(v) for k, v in load_file(str(zeroed / "generator.safetensors")).items()}
    save_file(state, str(zeroed / "generator.safetensors"))
    out = tmp_path / "n.png"
    _refused(runner.invoke(app, ["noise", "--artifact", str(zeroed), "--text", "hi", "--size", "16", "16",
                                 "-o", str(out)]), match="no_perturbation")
    assert not out.exists()
    result = runner.invoke(app, ["noise", "--artifact", str(artifact), "--text", "hi", "--size", "16", "16",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    levels, meta = read_noise(out)
    assert levels.any() and meta["size"] == [16, 16]
