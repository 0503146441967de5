"""Staging: exactly the publishable files, the dataset card, refusals; `push --dry-run`."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from uge_protect.cli.app import app
from uge_protect.errors import UserError
from uge_protect.hub import staging
from uge_protect.hub.card import shard_pattern, size_category
from uge_protect.hub.push import stage_output
from uge_protect.hub.staging import iter_staged_tree, plan_upload
from uge_protect.shards.layout import OutputLayout, read_json

runner = CliRunner()

SHARDS = ("demo-train-000000", "demo-train-000001")


def _card_meta(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_dry_run_stages_exactly_the_public_files(output_copy, tmp_path):
    # leftovers that must never be staged: a temp file, a tar of no run, the lock, the sha cache
    (output_copy / "shards" / ".demo-train-000000.tar.tmp-123").write_bytes(b"partial")
    (output_copy / "shards" / "other.tar").write_bytes(b"x" * 512)
    (output_copy / "notes.txt").write_text("private")
    stage = tmp_path / "stage"
    result = runner.invoke(app, ["push", str(output_copy), "me/demo", "--dry-run", str(stage), "--license", "cc-by-4.0"])
    assert result.exit_code == 0, result.output
    assert "nothing was uploaded" in result.output and "other.tar" in result.output  # warned
    expected = {"README.md", "run.json", "protection.json", "shards/sizes.json",
                "eval/report.json", "eval/report.md", "eval/headline.png", "eval/accuracy_per_epoch.png",
                "eval/clean_vs_protected.png", "eval/samples_grid.png"}
    for s in SHARDS:
        expected |= {f"shards/{s}.tar", f"manifests/{s}.parquet", f"stats/{s}.json"}
    assert set(iter_staged_tree(stage)) == expected
    for s in SHARDS:
        assert (stage / "shards" / f"{s}.tar").read_bytes() == (output_copy / "shards" / f"{s}.tar").read_bytes()
    card = (stage / "README.md").read_text(encoding="utf-8")
    meta = _card_meta(card)
    assert meta["configs"] == [
        {"config_name": "default", "default": True, "data_files": [{"split": "train", "path": "shards/*.tar"}]},
        {"config_name": "manifests", "data_files": [{"split": "train", "path": "manifests/*.parquet"}]},
    ]
    assert meta["license"] == "cc-by-4.0" and "webdataset" in meta["tags"] and "random" in meta["tags"]
    assert meta["size_categories"] == ["n<1K"] and "image-classification" in meta["task_categories"]
    protection = read_json(output_copy / "protection.json")
    assert f"`{protection['config_fingerprint']}`" in card
    assert "does not protect anything" in card  # the random control says so
    assert "| written (protected) samples | 64 |" in card
    assert "data/shards/demo-train-{000000..000001}.tar" in card  # open_clip and PyTorch recipes
    assert 'load_dataset("me/demo", split="train")' in card
    # the evaluation: its main table and a figure, linked relatively
    assert "| none | small_cnn | held out" in card and "](eval/headline.png)" in card
    from uge_protect.eval.protocol import headline_text

    assert f"**{headline_text(read_json(output_copy / 'eval' / 'report.json'))}**" in card
    # a staged copy verifies on its own
    result = runner.invoke(app, ["inspect", str(stage), "--no-sources"])
    assert result.exit_code == 0, result.output


def test_no_manifests_leaves_them_and_their_config_out(output_copy, tmp_path):
    plan = stage_output(output_copy, "me/demo", tmp_path / "s", include_manifests=False)
    assert not any(p.startswith("manifests/") for p in plan.paths())
    assert not (tmp_path / "s" / "manifests").exists()
    meta = _card_meta((tmp_path / "s" / "README.md").read_text(encoding="utf-8"))
    assert [c["config_name"] for c in meta["configs"]] == ["default"]


def test_report_in_another_folder_and_without_report(output_copy, tmp_path):
    report = tmp_path / "elsewhere"
    (output_copy / "eval").rename(report)
    plan = plan_upload(output_copy)
    assert plan.report is None and not any(p.startswith("eval/") for p in plan.paths())
    assert "## Evaluation" not in plan.files[-1].data.decode()
    plan = plan_upload(output_copy, report_dir=report)
    assert "eval/report.json" in plan.paths() and "## Evaluation" in plan.files[-1].data.decode()
    # any one report directory inside DIR is found too
    report.rename(output_copy / "report")
    assert plan_upload(output_copy).report.directory == output_copy / "report"


def test_refusals(output_copy, tmp_path):
    layout = OutputLayout(output_copy)
    # a report of another protection
    rep = read_json(output_copy / "eval" / "report.json")
    rep["protection"]["method"] = {"method": "em"}
    (output_copy / "eval" / "report.json").write_text(json.dumps(rep))
    with pytest.raises(UserError, match="evaluates another protection"):
        plan_upload(output_copy)
    (output_copy / "eval" / "report.json").unlink()
    # a secret in a published file
    prot = read_json(layout.protection_file)
    prot["method"]["key_seed"] = 1234
    layout.protection_file.write_text(json.dumps(prot))
    with pytest.raises(UserError, match=r"secret fields \(method.key_seed\)"):
        plan_upload(output_copy)
    prot["method"].pop("key_seed")
    layout.protection_file.write_text(json.dumps(prot))
    # an incomplete shard (no completion marker)
    stats = layout.stats(f"{SHARDS[1]}.tar")
    stats.rename(tmp_path / "stats.json")
    with pytest.raises(UserError, match="not complete"):
        plan_upload(output_copy)
    (tmp_path / "stats.json").rename(stats)
    # an unfinished run
    layout.sizes_file.rename(tmp_path / "sizes.json")
    with pytest.raises(UserError, match="has not finished"):
        plan_upload(output_copy)
    (tmp_path / "sizes.json").rename(layout.sizes_file)
    # not an output directory, a non-empty staging folder, a bad license
    with pytest.raises(UserError, match="not a uge-protect output directory"):
        plan_upload(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        stage_output(output_copy, "me/demo", tmp_path / "full")
    with pytest.raises(UserError, match="not a Hub license"):
        plan_upload(output_copy, card_options={"license": "CC BY 4.0"})
    assert plan_upload(output_copy).files  # the directory is still publishable


def test_hub_limits(output_copy, monkeypatch):
    monkeypatch.setattr(staging, "MAX_ENTRIES_PER_FOLDER", 2)
    with pytest.raises(UserError, match="would hold 3 files, above the Hub.s 2 per folder"):
        plan_upload(output_copy)
    monkeypatch.setattr(staging, "MAX_ENTRIES_PER_FOLDER", 10_000)
    monkeypatch.setattr(staging, "RECOMMENDED_FILE_BYTES", 1000)
    assert any("recommends files under 20 GB" in w for w in plan_upload(output_copy).warnings)
    monkeypatch.setattr(staging, "MAX_FILE_BYTES", 1000)
    with pytest.raises(UserError, match="above the Hub's 50 GB per file"):
        plan_upload(output_copy)


def test_cli_errors_are_one_line(output_copy, tmp_path):
    for args, needle in (
        ([str(tmp_path / "nope"), "me/demo", "--dry-run", str(tmp_path / "s")], "output directory not found"),
        ([str(output_copy), "bad repo id!", "--dry-run", str(tmp_path / "s")], "invalid repository id"),
        ([str(output_copy), "me/demo", "--dry-run", str(output_copy)], "not empty"),
    ):
        result = runner.invoke(app, ["push", *args])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
        assert "Traceback" not in result.output


def test_shard_pattern_and_size_category():
    assert shard_pattern(["a-000002.tar", "a-000000.tar", "a-000001.tar"]) == "a-{000000..000002}.tar"
    assert shard_pattern(["x.tar"]) == "x.tar"
    assert shard_pattern(["a-000000.tar", "a-000002.tar"]) == "a-000000.tar::a-000002.tar"
    assert shard_pattern(["a-0.tar", "b-1.tar"]) == "a-0.tar::b-1.tar"
    assert size_category(999) == "n<1K" and size_category(5000) == "1K<n<10K" and size_category(2_000_000) == "1M<n<10M"


def test_push_is_a_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "push" in result.output
    result = runner.invoke(app, ["push", "--help"])
    assert result.exit_code == 0
    for option in ("--private", "--revision", "--license", "--dry-run", "--no-manifests", "--report"):
        assert option in result.output


def test_push_waits_for_a_running_shard_job(output_copy):
    """The lock a `shard` run holds, taken by another process, stops a push; and a push's lock
    stops a `shard` run from claiming the directory."""
    import subprocess
    import sys

    lock_path = OutputLayout(output_copy).lock_file
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from uge_protect.shards.lock import DirectoryLock;"
         "DirectoryLock(Path(sys.argv[1])).acquire(); print('held', flush=True); sys.stdin.read()",
         str(lock_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="a uge-protect run is writing to"):
            stage_output(output_copy, "me/demo", output_copy.parent / "s")
    finally:
        holder.communicate("")
    stage_output(output_copy, "me/demo", output_copy.parent / "s")
    from uge_protect.shards.lock import DirectoryLock, read_lock

    with read_lock(output_copy, "push"):
        with pytest.raises(UserError, match="another uge-protect run is writing"):
            DirectoryLock(lock_path).acquire()
    with DirectoryLock(lock_path):
        pass


def test_a_file_that_links_outside_the_directory_is_not_published(output_copy, tmp_path):
    """inspect refuses to read such a link; push refuses to publish its target."""
    layout = OutputLayout(output_copy)
    shard = sorted(layout.shards_dir.glob("*.tar"))[0]
    outside = tmp_path / "elsewhere.tar"
    shutil.move(shard, outside)
    shard.symlink_to(outside)  # same bytes, same size: only the link is wrong
    with pytest.raises(UserError, match="links to a path outside"):
        stage_output(output_copy, "me/demo", tmp_path / "s")
