"""Outputs that overlap the inputs, temp names, shards that cannot be read, and runs where
most samples fail."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import simple_samples, write_shard
from tests.pipeline.test_shard_run import output_bytes, run
from uge_protect.atomic import temp_owner, temp_path
from uge_protect.cli.app import app
from uge_protect.errors import RunFailed, UserError
from uge_protect.pipeline import ShardJobConfig, run_shard_job
from uge_protect.pipeline.inspect import inspect_output
from uge_protect.pipeline.resume import is_complete
from uge_protect.shards.layout import OutputLayout, read_json
from uge_protect.shards.manifest import read_manifest
from uge_protect.shards.tario import TarReadError, iter_tar_samples
from uge_protect.methods.registry import create_method

runner = CliRunner()


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


# --- item 2: an output that overlaps the inputs ---------------------------------------------------


def test_output_that_contains_an_input_is_refused_before_anything_is_written(tmp_path):
    x = tmp_path / "x"
    (x / "shards").mkdir(parents=True)
    shard = write_shard(x / "shards" / "a.tar", simple_samples("a", 3))
    before = _tree(x)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"contains the input shard .*a\.tar.*outside the inputs"):
            run([shard], x, overwrite=overwrite)
        assert _tree(x) == before  # the original is intact, nothing was added (no run.json, no lock)


def test_output_inside_an_input_directory_is_refused_and_not_created(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_shard(inputs / "a.tar", simple_samples("a", 2))
    for out in (inputs / "protected", inputs):
        with pytest.raises(UserError, match="lies inside the input directory|contains the input shard"):
            run([inputs], out)
    assert sorted(p.name for p in inputs.iterdir()) == ["a.tar"]


def test_overlap_is_seen_through_symlinks(tmp_path):
    x = tmp_path / "x"
    (x / "shards").mkdir(parents=True)
    write_shard(x / "shards" / "a.tar", simple_samples("a", 2))
    (tmp_path / "link-to-x").symlink_to(x)
    (tmp_path / "link-to-shards").symlink_to(x / "shards")
    before = _tree(x)
    with pytest.raises(UserError, match="contains the input shard"):
        run([x / "shards" / "a.tar"], tmp_path / "link-to-x")  # the output is a symlink to X
    with pytest.raises(UserError, match="contains the input shard"):
        run([tmp_path / "link-to-shards" / "a.tar"], x)  # the input is reached through one
    assert _tree(x) == before


def test_a_hard_link_of_an_input_under_the_output_is_an_overlap(tmp_path):
    shard = write_shard(tmp_path / "a.tar", simple_samples("a", 2))
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    os.link(shard, out / "shards" / "a.tar")
    with pytest.raises(UserError, match="hard link of the input shard"):
        run([shard], out, overwrite=True)
    assert (out / "shards" / "a.tar").read_bytes() == shard.read_bytes()


def test_an_output_beside_the_inputs_is_fine(tmp_path):
    shard = write_shard(tmp_path / "a.tar", simple_samples("a", 2))
    original = shard.read_bytes()
    run([shard], tmp_path / "out")  # a sibling of the input file, not inside an input directory
    assert shard.read_bytes() == original
    assert inspect_output(tmp_path / "out")["problems"] == []


def test_cli_overlap_gives_one_error_line(tmp_path):
    x = tmp_path / "x"
    (x / "shards").mkdir(parents=True)
    shard = write_shard(x / "shards" / "a.tar", simple_samples("a", 2))
    result = runner.invoke(app, ["shard", str(shard), "-o", str(x), "-m", "random", "--workers", "0"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: output directory") and "a.tar" in lines[0]
    assert not (x / "run.json").exists()


# --- item 7: temp names that cannot be confused with outputs ---------------------------------------


TRICKY = [".x.tmp-1.tar", "a.tar.tmp-1.tar", ".a.tar.tmp-99.tar", "b.tmp-2.tar"]


def test_temp_names_never_match_an_output_name(tmp_path):
    layout = OutputLayout(tmp_path)
    for name in TRICKY + ["data-000001.tar"]:
        finals = [layout.shard(name), layout.manifest(name), layout.stats(name)]
        for path in finals:
            assert temp_owner(path.name) is None, path.name
            assert temp_owner(temp_path(path, pid=4242).name) == 4242
    for path in (layout.run_file, layout.protection_file, layout.sizes_file, layout.lock_file):
        assert temp_owner(path.name) is None


def test_shards_named_like_temp_files_survive_reruns(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shards = [write_shard(src / name, simple_samples(f"k{i}", 3, seed=i)) for i, name in enumerate(TRICKY)]
    out = tmp_path / "out"
    run(shards, out)
    first = output_bytes(out)
    layout = OutputLayout(out)
    assert layout.temp_files() == []
    (layout.shards_dir / f".{TRICKY[0]}.tmp-123").write_bytes(b"a real leftover")
    summary = run(shards, out)
    assert summary["timings"]["shards_skipped"] == len(TRICKY)
    assert summary["counts"]["written"] == 3 * len(TRICKY)
    assert output_bytes(out) == first
    assert sorted(json.loads(layout.sizes_file.read_text())) == sorted(TRICKY)
    assert layout.temp_files() == []  # only the real leftover was removed
    assert inspect_output(out)["problems"] == []


# --- item 8: shards that cannot be read are retried, not marked complete --------------------------


class _Server:
    """A local HTTP server for one directory; ``mode`` is ok, 404, cut (half the body, then
    the connection closes), html (an error page with status 200) or stall (1,000 bytes, then
    nothing until the test ends)."""

    def __init__(self, root: Path):
        self.root = root
        self.mode = "ok"
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = server.root / self.path.lstrip("/")
                if server.mode == "404" or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if server.mode == "html":
                    data = b"<html><body>Please log in to the network</body></html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if server.mode == "stall":
                    self.wfile.write(data[:1000])
                    self.wfile.flush()
                    server.release.wait(30)
                    return
                self.wfile.write(data if server.mode in ("ok", "html") else data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    with _Server(root) as s:
        yield s


@pytest.mark.parametrize("mode", ["404", "cut"])
def test_unreadable_shard_gets_no_marker_fails_the_run_and_is_retried(tmp_path, server, mode):
    good = write_shard(tmp_path / "good.tar", simple_samples("g", 4, seed=1))
    write_shard(server.root / "remote.tar", simple_samples("r", 12, seed=2))
    url = f"{server.url}/remote.tar"
    out = tmp_path / "out"
    layout = OutputLayout(out)
    server.mode = mode
    with pytest.raises(RunFailed, match=r"1 input shard could not be read \(remote\.tar.*rerun the same command") as info:
        run([good, url], out, batch_size=2)
    summary = info.value.summary
    assert list(summary["unreadable_shards"]) == ["remote.tar"]
    reason = summary["unreadable_shards"]["remote.tar"]
    assert reason == "HTTP Error 404: Not Found" if mode == "404" else reason.startswith("the download was cut short ("), reason
    assert summary["missing_shards"] == ["remote.tar"]
    assert summary["counts"]["written"] == 4 and summary["failures"] == {}
    for path in (layout.shard("remote.tar"), layout.manifest("remote.tar"), layout.stats("remote.tar")):
        assert not path.exists()
    assert json.loads(layout.sizes_file.read_text()) == {"good.tar": 4}
    assert read_json(layout.protection_file)["unreadable_shards"] == summary["unreadable_shards"]
    assert layout.temp_files() == []

    server.mode = "ok"
    summary = run([good, url], out, batch_size=2)
    assert summary["timings"]["shards_skipped"] == 1 and summary["timings"]["shards_processed"] == 1
    assert summary["unreadable_shards"] == {} and summary["missing_shards"] == []
    assert summary["counts"]["written"] == 16
    assert [r["status"] for r in read_manifest(layout.manifest("remote.tar")).to_pylist()] == ["ok"] * 12
    run([good, url], tmp_path / "ref", batch_size=2)
    assert output_bytes(out) == output_bytes(tmp_path / "ref")
    assert inspect_output(out)["problems"] == []


def test_cli_unreadable_shard_exits_1_naming_it(tmp_path, server):
    server.mode = "404"
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", f"{server.url}/gone-000.tar", "-o", str(out), "-m", "random",
                                 "--workers", "0", "-q"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 1 input shard could not be read (gone-000.tar")
    assert "Traceback" not in result.output


class _FailingStream:
    """A stream that raises a connection reset after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int):
        self.data, self.limit, self.pos = data, limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.limit:
            raise ConnectionResetError(104, "Connection reset by peer")
        n = len(self.data) - self.pos if n is None or n < 0 else n
        chunk = self.data[self.pos : min(self.pos + n, self.limit)]
        self.pos += len(chunk)
        return chunk


def test_a_stream_error_is_not_reported_as_a_corrupt_tar(tmp_path):
    data = write_shard(tmp_path / "a.tar", simple_samples("a", 6)).read_bytes()
    with pytest.raises(ConnectionResetError):
        list(iter_tar_samples(_FailingStream(data, len(data) // 2)))
    with pytest.raises(TarReadError):  # a stream that just ends is damage in the data
        list(iter_tar_samples(_FailingStream(data[: len(data) // 2], len(data))))


def test_markers_of_unreadable_shards_from_older_versions_are_not_complete(tmp_path):
    shard = write_shard(tmp_path / "a.tar", simple_samples("a", 2))
    out = tmp_path / "out"
    run([shard], out)
    layout = OutputLayout(out)
    fingerprint = read_json(layout.run_file)["fingerprint"]
    assert is_complete(layout, "a.tar", fingerprint)
    stats = read_json(layout.stats("a.tar"))
    layout.stats("a.tar").write_text(json.dumps({**stats, "tar_error": "unreadable_shard: 404"}))
    assert not is_complete(layout, "a.tar", fingerprint)


# --- item 9: a run where most samples fail ---------------------------------------------------------


def _caption_method():
    method = create_method("random", allow_hidden=True)
    method.requires_caption = True
    return method


def _run_captions(shards, out, **kw):
    cfg = ShardJobConfig(inputs=[str(p) for p in shards], output=str(out), quiet=True, num_workers=0, **kw)
    return run_shard_job(cfg, _caption_method())


def test_a_caption_field_typo_fails_the_run_after_writing(make_shards, tmp_path):
    shards = make_shards(n_shards=2, per_shard=6)
    out = tmp_path / "out"
    with pytest.raises(RunFailed) as info:
        _run_captions(shards, out, caption_field="captoin")
    message = str(info.value)
    assert message == (
        "12 of 12 samples failed (100%, above --max-failure-rate 0.5); most common reason: missing_caption (12)"
        " (check --caption-field, or that the samples have a txt field); the manifests list every sample's reason"
    )
    layout = OutputLayout(out)
    assert read_json(layout.protection_file)["failures"] == {"missing_caption": 12}  # written all the same
    assert inspect_output(out)["problems"] == []
    # The limit is not part of the configuration: the same directory accepts it, and 1 allows all.
    summary = _run_captions(shards, out, caption_field="captoin", max_failure_rate=1.0)
    assert summary["timings"]["shards_skipped"] == 2
    summary = _run_captions(shards, tmp_path / "ok", caption_field="caption")
    assert summary["counts"]["failed"] == 0


def test_failures_at_or_below_the_limit_pass(tmp_path):
    from tests.helpers import png_bytes, random_image
    import numpy as np

    rng = np.random.default_rng(0)
    samples = [(f"k{i}", {"png": png_bytes(random_image(rng)), **({"txt": b"a cat"} if i % 2 else {})})
               for i in range(4)]
    shard = write_shard(tmp_path / "half.tar", samples)
    summary = _run_captions([shard], tmp_path / "out")  # 2 of 4 fail: 50% is not above 0.5
    assert summary["counts"]["failed"] == 2
    with pytest.raises(RunFailed, match="2 of 4 samples failed .50%, above --max-failure-rate 0.4"):
        _run_captions([shard], tmp_path / "out", max_failure_rate=0.4)


def test_cli_failure_rate_exit_1_with_one_line(make_shards, tmp_path, monkeypatch):
    import uge_protect.methods.registry as registry

    monkeypatch.setattr(registry, "create_method", lambda *a, **k: _caption_method())
    shards = make_shards(n_shards=1, per_shard=5)
    args = ["shard", str(shards[0]), "-o", str(tmp_path / "out"), "-m", "random", "--workers", "0",
            "--caption-field", "captoin"]
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: 5 of 5 samples failed (100%")
    assert "missing_caption (5)" in lines[0]
    result = runner.invoke(app, [*args, "--max-failure-rate", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "--max-failure-rate", "1.5"])
    assert result.exit_code == 2 and "--max-failure-rate must be between 0 and 1" in result.stderr


@pytest.mark.parametrize("mode", ["html", "stall"])
def test_a_download_that_is_no_tar_or_stalls_is_retried_not_recorded_as_damage(tmp_path, server, mode, monkeypatch):
    """A captive portal's page or a server that stops sending: not damage in the data, and
    never a run that hangs (reads time out)."""
    from uge_protect.shards import discover

    monkeypatch.setattr(discover, "HTTP_TIMEOUT", 1.0)
    write_shard(server.root / "remote.tar", simple_samples("r", 12, seed=2))
    out = tmp_path / "out"
    server.mode = mode
    with pytest.raises(RunFailed, match="could not be read") as info:
        run([f"{server.url}/remote.tar"], out)
    reason = info.value.summary["unreadable_shards"]["remote.tar"]
    assert ("not a whole tar" in reason) if mode == "html" else ("timed out" in reason), reason
    assert not OutputLayout(out).stats("remote.tar").exists()
