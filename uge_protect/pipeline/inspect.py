"""``uge-protect inspect``: summarise an output directory and verify it.

An output directory is untrusted input: published outputs are downloaded and inspected by
strangers. Nothing named inside it is executed or fetched, every file in it is validated
before use, and anything malformed is a problem line, never a traceback. A source recorded
in a stats file is re-read only when it is a plain absolute local path to a regular file
(opened with ``open``); any other source comes from the user (``sources``, ``--sources``).

Verification checks that every shard matches its completion marker (size, sha256) and every
tar in ``shards/`` has one; that manifests, stats, ``sizes.json`` and ``protection.json``
agree (keys, order, hashes, counts, no ghost entries); that each written sample holds
exactly one image — the protected one the manifest records — and that image is within the
budget and, for a method that promises noise, perturbed (L∞ > 0). When a source shard is
compared, each written image is re-measured against its re-decoded original, every
non-image field must be byte-identical to the input, every source sample must have a
manifest row, and the member accounting (input = written + failed + skipped) must hold.

Reading the directory is bounded: files are size-checked before they are parsed (a shard's
size against its marker before it is hashed, a manifest's row count against its stats before
its rows are read), files that are symlinks to paths outside the directory are problems and
are not read, and sources are re-decoded only when ``run.json`` passed its checks and its
decode settings stay within the inspecting user's ``max_pixels``: ``run.json`` is written by
whoever published the directory, and its fingerprint (an unkeyed hash) does not stop them.

Lossy output (jpeg, lossy webp) carries no budget guarantee: its L∞ is reported against the
budget as a warning, not a problem (the user asked for it with ``--allow-lossy``, and
``run.json`` and the manifests record it).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from itertools import zip_longest
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from uge_protect.errors import UserError
from uge_protect.pipeline.records import SampleRecord
from uge_protect.pipeline.source import DecodeSettings, decode_samples
from uge_protect.pipeline.untrusted import (
    MAX_STATS_BYTES, ManifestRow, RunInfo, decode_rgb, image_format_of, is_count_map, is_regular_file,
    load_json, load_rows, load_run, local_path, outside_link, outside_problem, short_error, stats_error,
)
from uge_protect.pipeline.writer import output_image_field, reason_code
from uge_protect.shards.decode import DEFAULT_MAX_PIXELS
from uge_protect.shards.discover import expand_inputs, open_shard, shard_name
from uge_protect.shards.layout import OutputLayout, file_sha256
from uge_protect.shards.manifest import STATUS_OK
from uge_protect.shards.members import IMAGE, OPAQUE, member_kind
from uge_protect.shards.tario import MemberCounts, RawSample, TarReadError, iter_tar_samples
from uge_protect.methods.budget import linf_levels

MAX_LISTED_PROBLEMS = 50
#: Pillow format names of the output formats.
_PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}

NOT_LOCAL = "recorded source is not a local path; pass --sources"
NOT_FOUND = "recorded source is not a local file here; pass --sources"
NO_MATCH = "no --sources path has this shard's name"
NO_SOURCES = "--no-sources"
RUN_UNCHECKED = "run.json failed its checks (see the problems); sources are not decoded with its settings"


def inspect_output(
    root: str | Path, *, check_sources: bool = True, sources: list[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Summarise and verify the output directory ``root``; ``problems`` lists mismatches.

    ``sources``: paths, globs or brace patterns (or URLs) of the source shards, matched to the
    output shards by base name; they replace the sources recorded in the directory. Without
    them, a recorded source is compared only when it is a local file. ``max_pixels``: the most
    pixels a source image may be decoded to (before and after the run's resize); sources of a
    run that decodes larger images are not compared (a warning says so). Raises
    :class:`UserError` for bad ``sources`` or ``max_pixels``.
    """
    if sources and not check_sources:
        raise UserError("--sources and --no-sources cannot be combined; drop one")
    if max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, not {max_pixels}")
    user_sources = {shard_name(s): s for s in expand_inputs(list(sources))} if sources else None
    layout = OutputLayout(Path(root))
    if os.path.lexists(layout.run_file) and outside_link(layout.root, layout.run_file):
        return {"problems": [outside_problem("run.json", layout.run_file)]}
    if not is_regular_file(layout.run_file):
        return {"problems": [f"{root} is not a uge-protect output directory (no run.json)"]}
    run, error = load_run(layout)
    if run is None:
        return {"problems": [error]}
    return _Inspector(layout, run, check_sources, user_sources, max_pixels).report()


# --- sources ----------------------------------------------------------------------------------


def _raw_samples(opener: Callable[[], BinaryIO], counts: MemberCounts) -> Iterator[RawSample | str]:
    """Like :func:`~uge_protect.pipeline.source.read_samples`, from an opener inspect chose."""
    try:
        with opener() as stream:
            yield from iter_tar_samples(stream, counts)
    except TarReadError as exc:
        yield f"corrupt_tar: {exc}"
    except OSError as exc:
        yield f"unreadable_shard: {exc}"


class _OutputCursor:
    """Streams an output shard's samples by their position (the written rows' order)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._samples = iter_tar_samples(self._file)
        self._pos, self._current = -1, None

    def at(self, position: int) -> RawSample | None:
        if position < self._pos:
            return None
        while self._pos < position:
            try:
                self._current = next(self._samples)
            except (StopIteration, TarReadError):
                self._pos = 1 << 62
                return None
            self._pos += 1
        return self._current

    def close(self) -> None:
        self._file.close()


def _decoded_pixels(decode: DecodeSettings) -> int:
    """The most pixels one source image may take when decoded with ``decode``: its
    ``max_pixels``, or the resized size when larger (``image_size``² for a centre crop; with
    ``keep_ratio`` the shorter side is ``image_size``)."""
    resized = decode.image_size**2 if decode.image_size is not None and decode.resize_mode != "none" else 0
    return max(decode.max_pixels, resized)


def _too_large(pixels: int, limit: int) -> str:
    return f"run.json's settings decode images of up to {pixels:,} pixels, above --max-pixels {limit:,}"


# --- the inspection -------------------------------------------------------------------------


class _Inspector:
    """One inspection of an output directory: checks in order, accumulating problems,
    warnings and the counts of the report."""

    def __init__(
        self, layout: OutputLayout, run: RunInfo, check_sources: bool, user_sources: dict[str, str] | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.layout, self.run = layout, run
        self.check_sources, self.user_sources, self.max_pixels = check_sources, user_sources, max_pixels
        self.problems: list[str] = list(run.problems)
        self.warnings: list[str] = []
        self.counts: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.linf_hist: Counter[int] = Counter()
        self.psnrs: list[float] = []
        self.not_compared: dict[str, str] = {}
        self.measured_max: int | None = None
        #: Shards whose markers belong to another configuration (flagged, not verified).
        self.other_config: set[str] = set()
        #: Written rows per verified manifest (what sizes.json must say).
        self.written_rows: dict[str, int] = {}
        #: Failure reasons of the rows of manifests without a marker and without a written
        #: sample: shards with no protected sample, which ``push`` leaves out of a published
        #: copy (tar and marker).
        self.left_out: dict[str, Counter[str]] = {}
        #: Shards whose sources the run's decode settings keep from being compared.
        self.too_large_to_decode = 0

    # -- the directory

    def report(self) -> dict[str, Any]:
        layout = self.layout
        stats = self._load_stats()
        self._check_unmarked(stats)
        for name in sorted(stats):
            try:
                shard_problems = self._verify_shard(stats[name])
            except Exception as exc:  # hostile input we did not foresee: a problem, not a traceback
                shard_problems = [f"{name}: could not be verified ({type(exc).__name__}: {short_error(exc)})"]
            if len(shard_problems) > MAX_LISTED_PROBLEMS:
                shard_problems = shard_problems[:MAX_LISTED_PROBLEMS] + [f"{name}: … and more problems"]
            self.problems.extend(shard_problems)
        self._check_sizes(stats)
        self._check_protection(stats)
        for tmp in layout.temp_files():
            self.problems.append(f"leftover temporary file {tmp.name} (an interrupted run; rerun to finish)")
        if self.user_sources is not None:
            unused = sorted(set(self.user_sources) - set(stats))
            if unused:
                self.warnings.append(f"{len(unused)} --sources shards match no output shard (e.g. {unused[0]})")
        if self.too_large_to_decode:
            pixels = _decoded_pixels(self.run.decode)
            self.warnings.append(
                f"sources of {self.too_large_to_decode} shards not compared: {_too_large(pixels, self.max_pixels)}; "
                f"pass --max-pixels {pixels} to compare them"
            )
        lossy = self._lossy_summary()
        return {
            "directory": str(layout.root),
            "method": self.run.method,
            "settings": self.run.settings,
            "budget_levels": self.run.levels,
            "counts": {**self.counts, "skipped_members": sum(self.skipped.values())},
            "failures": dict(sorted(self.failures.items())),
            "skipped_members": dict(sorted(self.skipped.items())),
            "linf_histogram": {str(k): v for k, v in sorted(self.linf_hist.items())},
            "psnr": self._psnr_summary(),
            "lossy": lossy,
            "sources_checked": self.counts.pop("sources_checked", 0),
            "sources_not_compared": dict(sorted(self.not_compared.items())),
            "warnings": self.warnings,
            "problems": self.problems,
        }

    def _outside(self, path: Path) -> str | None:
        """The problem line when ``path`` links outside the directory, else None."""
        if outside_link(self.layout.root, path):
            label = path.relative_to(self.layout.root).as_posix() + ("/" if path.is_dir() else "")
            return outside_problem(label, path)
        return None

    def _listing(self, folder: Path, pattern: str) -> list[Path]:
        """The entries of one of the directory's folders, sorted; none (and a problem) when
        the folder is a symlink to a path outside the directory."""
        if not folder.is_dir():
            return []
        problem = self._outside(folder)
        if problem:
            self.problems.append(problem)
            return []
        return sorted(folder.glob(pattern))

    def _load_stats(self) -> dict[str, dict[str, Any]]:
        """Valid completion markers of this configuration, by shard name."""
        out: dict[str, dict[str, Any]] = {}
        for path in self._listing(self.layout.stats_dir, "*.json"):
            label = f"stats/{path.name}"
            if (problem := self._outside(path)) is not None:
                self.problems.append(problem)
                continue
            stats, error = load_json(path, label, MAX_STATS_BYTES)
            error = error or (f"{label} {e}" if (e := stats_error(stats)) else None)
            if error:
                self.problems.append(f"{error}; its shard is not verified")
                continue
            name = stats["shard"]
            if self.layout.stats(name) != path or name in out:
                self.problems.append(f"{label} names shard {name}, whose marker is stats/{self.layout.stats(name).name}")
            elif stats.get("config_fingerprint") != self.run.fingerprint:
                self.problems.append(f"{name}: completed under another configuration")
                self.other_config.add(name)
            else:
                out[name] = stats
        return out

    def _check_unmarked(self, stats: dict[str, dict[str, Any]]) -> None:
        """Every tar in shards/ and manifest in manifests/ needs a valid completion marker."""
        known = set(stats) | self.other_config
        for tar in self._listing(self.layout.shards_dir, "*.tar"):
            if tar.name not in known:
                self.problems.append(f"shards/{tar.name} has no valid completion marker in stats/; it is not verified")
        stems = {self.layout.manifest(n).name for n in known}
        for manifest in self._listing(self.layout.manifests_dir, "*.parquet"):
            if manifest.name in stems:
                continue
            if (problem := self._outside(manifest)) is not None:
                self.problems.append(problem)
                continue
            rows, _ = load_rows(manifest)
            if rows is not None and not any(r["status"] == STATUS_OK for r in rows):
                # an empty shard left out of a published copy: only its failure reasons are kept
                self.left_out[manifest.name] = Counter(reason_code(r["reason"] or "") for r in rows)
            else:
                self.problems.append(f"manifests/{manifest.name} has no valid completion marker in stats/")

    def _load_summary(self, path: Path, label: str) -> tuple[Any, bool]:
        """One of the run's summary files: its JSON and True, or None and False with the problem
        noted (a link outside the directory; missing, i.e. the run did not finish; unreadable)."""
        if (problem := self._outside(path)) is not None:
            self.problems.append(problem)
            return None, False
        data, error = load_json(path, label)
        if error:
            self.problems.append(f"{error} (the run did not finish)" if error.endswith("missing") else error)
            return None, False
        return data, True

    def _check_sizes(self, stats: dict[str, dict[str, Any]]) -> None:
        sizes, loaded = self._load_summary(self.layout.sizes_file, "shards/sizes.json")
        if not loaded:
            return
        if not is_count_map(sizes):
            self.problems.append("shards/sizes.json is not a JSON object of {shard name: written samples}")
            return
        for name in sorted(set(sizes) - set(stats)):
            self.problems.append(f"shards/sizes.json lists {name}, which is no verified shard of this output")
        for name, s in sorted(stats.items()):
            if name not in sizes:
                self.problems.append(f"{name}: missing from shards/sizes.json")
            elif sizes[name] != self.written_rows.get(name, s["written"]):
                written = self.written_rows.get(name, s["written"])
                self.problems.append(f"{name}: sizes.json says {sizes[name]}, manifest has {written} written")

    def _check_protection(self, stats: dict[str, dict[str, Any]]) -> None:
        summary, loaded = self._load_summary(self.layout.protection_file, "protection.json")
        if not loaded:
            return
        if not isinstance(summary, dict) or not isinstance(summary.get("counts"), dict):
            self.problems.append("protection.json is not a JSON object with counts")
            return
        if summary.get("config_fingerprint") != self.run.fingerprint:
            self.problems.append("protection.json belongs to another configuration")
        values = list(stats.values())
        failures: Counter[str] = Counter()
        for reasons in self.left_out.values():
            failures.update(reasons)
        left_out = sum(failures.values())
        expected = {
            "shards": len(values) + len(self.left_out),
            "samples": sum(s["samples"] for s in values) + left_out,
            "written": sum(s["written"] for s in values),
            "failed": sum(s["failed"] for s in values) + left_out,
            "skipped_members": sum(sum(s.get("skipped_members", {}).values()) for s in values),
        }
        counts = summary["counts"]
        for key, value in expected.items():
            if key == "skipped_members" and (self.left_out or (key not in counts and value == 0)):
                continue  # left-out shards' markers are not here / written before members were counted
            if counts.get(key) != value:
                self.problems.append(f"protection.json counts {key} {counts.get(key)!r}, the stats add up to {value}")
        for s in values:
            failures.update(s["failures"])
        if summary.get("failures") != dict(sorted(failures.items())):
            self.problems.append("protection.json failures differ from the stats' failures")
        missing = summary.get("missing_shards")
        if isinstance(missing, list) and missing:
            self.warnings.append(f"{len(missing)} input shards have no output (protection.json missing_shards)")

    # -- one shard

    def _verify_shard(self, stats: dict[str, Any]) -> list[str]:
        """Problems of one shard; counts its rows."""
        name = stats["shard"]
        shard_path, manifest_path = self.layout.shard(name), self.layout.manifest(name)
        outside = self._outside(shard_path) or self._outside(manifest_path)
        if outside:
            self.not_compared[name] = "shard or manifest unusable"
            return [f"{name}: {outside}"]
        rows, error = load_rows(manifest_path, stats["samples"])
        if not is_regular_file(shard_path) or rows is None:
            self.not_compared[name] = "shard or manifest unusable"
            return [f"{name}: {error or 'shard missing'}"]
        size = shard_path.stat().st_size
        if size != stats["bytes"]:  # checked first: hashing reads the whole file
            self.not_compared[name] = "shard unusable"
            return [f"{name}: the output shard is damaged or was replaced ({size:,} bytes, its completion marker "
                    f"says {stats['bytes']:,}); it is not read"]
        self.counts["shards"] += 1
        problems: list[str] = []
        if file_sha256(shard_path) != stats["sha256"]:
            problems.append(f"{name}: shard bytes differ from the completion marker (sha256)")
        ok_rows = [r for r in rows if r["status"] == STATUS_OK]
        self.written_rows[name] = len(ok_rows)
        self._count_rows(rows)
        self.skipped.update(stats.get("skipped_members", {}))
        problems.extend(self._check_stats(name, stats, rows, ok_rows))
        written_members, in_order = self._check_output(name, shard_path, ok_rows, problems)
        members = stats.get("members")
        if in_order and members is not None and members["written"] != written_members:
            problems.append(f"{name}: the shard holds {written_members} members, stats record {members['written']}")
        opener, label = self._source_for(stats)
        if opener is None:
            self.not_compared[name] = label
        else:
            self.counts["sources_checked"] += 1
            problems.extend(self._compare_source(name, stats, rows, opener, label, shard_path if in_order else None))
        return problems

    def _count_rows(self, rows: list[ManifestRow]) -> None:
        for row in rows:
            self.counts["samples"] += 1
            if row["status"] == STATUS_OK:
                self.counts["written"] += 1
                self.linf_hist[row["linf"]] += 1
                if isinstance(row["psnr"], float) and np.isfinite(row["psnr"]):
                    self.psnrs.append(row["psnr"])
            else:
                self.counts["failed"] += 1
                self.failures[reason_code(row["reason"] or "")] += 1

    def _check_stats(self, name: str, stats: dict[str, Any], rows: list, ok_rows: list) -> list[str]:
        problems = []
        if len(rows) != stats["samples"] or len(ok_rows) != stats["written"] or stats["failed"] != len(rows) - len(ok_rows):
            problems.append(
                f"{name}: manifest has {len(rows)} rows / {len(ok_rows)} written, stats say {stats['samples']} / {stats['written']}"
            )
        reasons = Counter(reason_code(r["reason"] or "") for r in rows if r["status"] != STATUS_OK)
        if dict(reasons) != {k: v for k, v in stats["failures"].items() if v}:
            problems.append(f"{name}: failure reasons in the manifest differ from the stats")
        if any(r["output_shard"] != name for r in ok_rows):
            problems.append(f"{name}: written manifest rows name another output shard")
        members = stats.get("members")
        if members is not None:
            skipped = sum(stats.get("skipped_members", {}).values())
            if members["skipped"] != skipped or (
                members["input"] is not None
                and members["input"] != members["written"] + members["failed"] + members["skipped"]
            ):
                problems.append(f"{name}: member counts do not add up (input = written + failed + skipped): {members}")
        return problems

    def _check_output(self, name: str, path: Path, ok_rows: list, problems: list[str]) -> tuple[int, bool]:
        """Check the output samples, streamed, against the written rows; returns the number of
        members read and whether the shard matched the rows in order."""
        counts, in_order = MemberCounts(), True
        with open(path, "rb") as f:
            try:
                for sample, row in zip_longest(iter_tar_samples(f, counts), ok_rows):
                    if sample is None or row is None or sample.key != row["key"]:
                        problems.append(f"{name}: keys in the shard differ from the manifest's written rows")
                        in_order = False
                        break
                    problems.extend(self._check_written(f"{name}/{row['key']}", sample, row))
            except TarReadError as exc:
                problems.append(f"{name}: the output shard is damaged ({exc})")
                in_order = False
        if counts.skipped:
            problems.append(f"{name}: the output shard holds members that are no files ({dict(counts.skipped)})")
        return counts.files, in_order

    def _check_written(self, tag: str, sample: RawSample, row: ManifestRow) -> list[str]:
        """One written sample, without its source: one image, the protected one, perturbed."""
        problems = []
        run = self.run
        out_ext = output_image_field(row["image_field"], row["image_format"])
        for ext, data in sample.fields.items():
            if ext == out_ext:
                continue
            kind = member_kind(ext, data)
            if kind == IMAGE:
                problems.append(f"{tag}: member {ext!r} is an image but not the protected one (an unprotected copy?)")
            elif kind == OPAQUE:
                problems.append(f"{tag}: member {ext!r} is an array, tensor, pickle, video or large compressed"
                                " member, which can carry the picture unprotected")
        data = sample.fields.get(out_ext)
        if data is None:
            return problems + [f"{tag}: no image in the output sample"]
        if hashlib.sha256(data).hexdigest() != row["sha256_protected"]:
            problems.append(f"{tag}: image bytes differ from the manifest hash")
        if row["sha256_protected"] == row["sha256_original"]:
            problems.append(f"{tag}: the written image is the original's bytes (not protected)")
        if row["image_format"] != run.settings.get("image_format") or bool(row["lossy"]) != run.lossy:
            problems.append(f"{tag}: manifest format {row['image_format']} (lossy {row['lossy']}) differs from run.json")
        if image_format_of(data) != _PIL_FORMAT[row["image_format"]]:
            problems.append(f"{tag}: the written image is not {row['image_format']} as the manifest says")
        if not run.lossy and row["linf"] > run.levels:
            problems.append(f"{tag}: L∞ {row['linf']} exceeds the budget {run.levels}")
        if run.promises_noise and (row["linf"] == 0 or row["psnr"] == float("inf")):
            problems.append(f"{tag}: L∞ 0, the written image is unchanged although the method promises noise")
        return problems

    # -- sources

    def _source_for(self, stats: dict[str, Any]) -> tuple[Callable[[], BinaryIO] | None, str]:
        """How to open the shard's source, or None and why it is not compared. A string read
        from the directory is only ever opened with ``open``, never through an URL opener."""
        name = stats["shard"]
        if not self.check_sources:
            return None, NO_SOURCES
        if self.run.decode is None:
            return None, "run.json settings are malformed"
        if self.run.problems:
            return None, RUN_UNCHECKED
        if self.user_sources is not None:
            spec = self.user_sources.get(name)
            if spec is None:
                return None, NO_MATCH
            opener, label = (lambda: open_shard(spec)), spec  # the user typed it
        else:
            path = local_path(stats["source"])
            if path is None:
                return None, NOT_LOCAL
            if not is_regular_file(path):
                return None, NOT_FOUND
            opener, label = (lambda: open(path, "rb", buffering=1 << 20)), str(path)
        pixels = _decoded_pixels(self.run.decode)
        if pixels > self.max_pixels:
            self.too_large_to_decode += 1
            return None, _too_large(pixels, self.max_pixels)
        return opener, label

    def _compare_source(
        self, name: str, stats: dict[str, Any], rows: list, opener: Callable[[], BinaryIO], label: str,
        shard_path: Path | None,
    ) -> list[str]:
        """Walk the re-decoded source next to the manifest rows and the written samples."""
        problems: list[str] = []
        position: dict[tuple[str, int], int] = {}
        seen_keys: Counter[str] = Counter()
        for i, row in enumerate(rows):
            position[(row["key"], seen_keys[row["key"]])] = i
            seen_keys[row["key"]] += 1
        ok_position = {i: j for j, i in enumerate(i for i, r in enumerate(rows) if r["status"] == STATUS_OK)}
        counts = MemberCounts()
        cursor = _OutputCursor(shard_path) if shard_path is not None else None
        matched: set[int] = set()
        source_keys: Counter[str] = Counter()
        last, tar_error = -1, None
        try:
            for rec in decode_samples(_raw_samples(opener, counts), self.run.decode):
                if isinstance(rec, str):
                    tar_error = rec
                    break
                i = position.get((rec.key, source_keys[rec.key]))
                source_keys[rec.key] += 1
                if i is None or i in matched:
                    problems.append(f"{name}/{rec.key}: a source sample with no row in the manifest")
                    continue
                if i < last:
                    problems.append(f"{name}/{rec.key}: the manifest rows are not in the source's order")
                matched.add(i)
                last = max(last, i)
                if i in ok_position and cursor is not None:
                    sample = cursor.at(ok_position[i])
                    if sample is not None:
                        problems.extend(self._compare_sample(f"{name}/{rec.key}", rec, rows[i], sample))
        finally:
            if cursor is not None:
                cursor.close()
        if tar_error and tar_error.startswith("unreadable_shard"):
            return [f"{name}: cannot read the source {label} ({tar_error.split(': ', 1)[-1]})"]
        if tar_error and not stats["tar_error"]:
            problems.append(f"{name}: the source is damaged ({tar_error}) but the run recorded no damage")
        for i, row in enumerate(rows):
            if i not in matched:
                problems.append(f"{name}/{row['key']}: a manifest row with no sample in the source shard")
        problems.extend(self._check_source_members(name, stats, counts))
        return problems

    def _check_source_members(self, name: str, stats: dict[str, Any], counts: MemberCounts) -> list[str]:
        """The source's members against the recorded accounting."""
        problems = []
        recorded = stats.get("skipped_members", {})
        if dict(counts.skipped) != {k: v for k, v in recorded.items() if v}:
            problems.append(f"{name}: the source has non-file members {dict(counts.skipped)}, stats record {recorded}")
        members = stats.get("members")
        if members is not None and members["input"] is not None and members["input"] != counts.total:
            problems.append(f"{name}: the source has {counts.total} members, stats record {members['input']} input members")
        return problems

    def _compare_sample(self, tag: str, rec: SampleRecord, row: ManifestRow, sample: RawSample) -> list[str]:
        """One written sample against its re-decoded source sample."""
        if not rec.ok:
            return [f"{tag}: written, but the source sample cannot be protected ({rec.reason})"]
        problems = []
        if rec.image_field != row["image_field"] or rec.sha256_original != row["sha256_original"]:
            problems.append(f"{tag}: the source image differs from the one the manifest records")
        out_ext = output_image_field(row["image_field"], row["image_format"])
        for ext, data in rec.fields.items():
            if ext != rec.image_field and sample.fields.get(ext) != data:
                problems.append(f"{tag}: field {ext!r} differs from the input")
        extra = sorted(set(sample.fields) - set(rec.fields) - {out_ext})
        if extra:
            problems.append(f"{tag}: members {extra} are not in the input sample")
        data = sample.fields.get(out_ext)
        if data is None:
            return problems
        pixels = rec.pixels.numpy()
        protected = decode_rgb(data, (pixels.shape[1], pixels.shape[0]))
        if protected is None:
            return problems + [f"{tag}: the written image does not decode to the source's size {pixels.shape[1]}x{pixels.shape[0]}"]
        measured = linf_levels(pixels, protected)
        self.measured_max = max(self.measured_max or 0, measured)
        if measured != row["linf"]:
            problems.append(f"{tag}: measured L∞ {measured} but manifest says {row['linf']}")
        if not self.run.lossy and measured > self.run.levels:
            problems.append(f"{tag}: L∞ {measured} against the source exceeds the budget {self.run.levels}")
        if self.run.promises_noise and measured == 0:
            problems.append(f"{tag}: measured L∞ 0 against the source, the image is unchanged although the method promises noise")
        return problems

    # -- summaries

    def _psnr_summary(self) -> dict[str, float] | None:
        if not self.psnrs:
            return None
        arr = np.asarray(self.psnrs)
        return {
            "min": float(arr.min()), "p5": float(np.percentile(arr, 5)),
            "median": float(np.median(arr)), "mean": float(arr.mean()), "max": float(arr.max()),
        }

    def _lossy_summary(self) -> dict[str, Any] | None:
        """For lossy output: the L∞ reached against the budget, and a warning saying plainly
        that the budget does not hold."""
        if not self.run.lossy:
            return None
        recorded = max((int(k) for k in self.linf_hist), default=0)
        worst = max(recorded, self.measured_max or 0)
        levels = self.run.levels
        if worst > levels:
            self.warnings.append(
                f"the budget does not hold for lossy output (measured L∞ up to {worst} levels against a budget of {levels})"
            )
        else:
            self.warnings.append(
                f"lossy output: L∞ up to {worst} levels, within the budget of {levels} here, but lossy encoding does not guarantee it"
            )
        return {"linf_max": worst, "linf_max_recorded": recorded, "linf_max_measured": self.measured_max,
                "budget_levels": levels, "within_budget": worst <= levels}
