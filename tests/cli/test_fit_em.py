"""`uge-protect fit em` then `shard --method em --artifact` end to end on tiny shards."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from tests.helpers import png_bytes, random_image, write_shard
from uge_protect.cli.app import app
from uge_protect.pipeline.inspect import inspect_output

runner = CliRunner()
TINY = ["--surrogate-width", "4", "--train-batches", "2", "--max-rounds", "1", "--pgd-steps", "2",
        "--batch-size", "8", "--quiet"]


def _errors(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_fit_em_then_shard(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=8, size=(16, 16))
    art = tmp_path / "art"
    result = runner.invoke(app, ["fit", "em", str(shards[0].parent / "*.tar"), "--output", str(art), *TINY])
    assert result.exit_code == 0, result.output
    config = json.loads((art / "config.json").read_text())
    assert config["method"] == "em" and config["mode"] == "sample" and config["num_classes"] == 8
    assert (art / "surrogate.safetensors").is_file()

    # a sample without a label is recorded, never written unprotected
    import numpy as np
    rng = np.random.default_rng(5)
    extra = write_shard(tmp_path / "nolabel.tar", [
        ("u-0", {"png": png_bytes(random_image(rng, 16, 16)), "cls": b"3"}),
        ("u-1", {"png": png_bytes(random_image(rng, 16, 16)), "txt": b"no label"}),
    ])
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(shards[0]), str(extra), "-o", str(out), "-m", "em",
                                 "--artifact", str(art), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = inspect_output(out)
    assert report["problems"] == []
    assert report["counts"]["written"] == 9 and report["failures"] == {"missing_label": 1}
    rows = pq.read_table(out / "manifests" / "nolabel.parquet").to_pylist()
    assert [(r["key"], r["status"], r["reason"]) for r in rows] == [
        ("u-0", "ok", None), ("u-1", "failed", "missing_label")]
    assert all(r["linf"] is None or r["linf"] <= 8 for r in rows)
    protection = json.loads((out / "protection.json").read_text())
    assert protection["method"]["method"] == "em"

    # class mode: the same flow
    art_c = tmp_path / "art_c"
    result = runner.invoke(app, ["fit", "em", str(shards[0]), "-o", str(art_c), "--mode", "class", *TINY])
    assert result.exit_code == 0, result.output
    out_c = tmp_path / "out_c"
    result = runner.invoke(app, ["shard", str(shards[0]), "-o", str(out_c), "-m", "em",
                                 "--artifact", str(art_c), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert inspect_output(out_c)["problems"] == []


def test_fit_em_errors(make_shards, tmp_path):
    shards = make_shards(n_shards=1, per_shard=4, size=(16, 16))
    result = runner.invoke(app, ["shard", str(shards[0]), "-o", str(tmp_path / "o"), "-m", "em"])
    assert result.exit_code == 2
    assert _errors(result) == ["error: method 'em' needs --artifact DIR (made by `uge-protect fit em`)"]
    result = runner.invoke(app, ["shard", str(shards[0]), "-o", str(tmp_path / "o"), "-m", "em",
                                 "--artifact", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "artifact directory not found" in _errors(result)[0]
    result = runner.invoke(app, ["fit", "em", str(shards[0]), "-o", str(tmp_path / "a"), "--mode", "pixel", *TINY])
    assert result.exit_code == 2 and "mode" in _errors(result)[0]
    result = runner.invoke(app, ["fit", "em", str(tmp_path / "none.tar"), "-o", str(tmp_path / "a"), *TINY])
    assert result.exit_code == 2 and len(_errors(result)) == 1
    rng = __import__("numpy").random.default_rng(0)
    unlabelled = write_shard(tmp_path / "u.tar", [(f"u{i}", {"png": png_bytes(random_image(rng, 8, 8))}) for i in range(3)])
    result = runner.invoke(app, ["fit", "em", str(unlabelled), "-o", str(tmp_path / "a"), *TINY])
    assert result.exit_code == 2 and "class label" in _errors(result)[0]
    result = runner.invoke(app, ["fit", "--help"])
    assert result.exit_code == 0 and "em" in result.output
