"""Orchestration of ``uge-protect shard`` under Accelerate.

Each rank takes ``sorted(shards)[rank::world_size]``, skips the ones already complete,
reads and decodes them in DataLoader workers, protects batches on its device, encodes in
a thread pool, and writes its own shards. The main process owns the directory (lock,
configuration check) and merges the stats at the end. No WebDataset loader is ever handed
to ``accelerator.prepare``: that would make every rank read every sample.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from uge_protect.errors import RunFailed, UserError
from uge_protect.logs import event, json_log
from uge_protect.pipeline.config import PNG_STRATEGIES, ShardJobConfig, config_fingerprint
from uge_protect.pipeline.encode import EncodedImage, EncodeSettings, encode_protected
from uge_protect.pipeline.lifecycle import (
    follow_launcher, init_worker, interruptible, lower_priority, reader_processes, sigterm_stops_the_run,
    stop_point,
)
from uge_protect.pipeline.merge import merge_outputs
from uge_protect.pipeline.progress import Progress
from uge_protect.pipeline.records import SampleRecord, ShardBatch
from uge_protect.pipeline.resume import UNREADABLE, claim_output, discard_shard_outputs, is_complete
from uge_protect.pipeline.source import DecodeSettings, ShardSource
from uge_protect.pipeline.stages import StageClock, stage_report
from uge_protect.pipeline.writer import ShardWriter, reason_code
from uge_protect.shards.discover import check_output_apart, expand_inputs, shard_name
from uge_protect.shards.layout import OutputLayout
from uge_protect.methods.base import ProtectBatch, ProtectionMethod, sample_seed
from uge_protect.methods.budget import apply_perturbation, budget_levels, finite_samples

log = logging.getLogger(__name__)


def _identity(batch: ShardBatch) -> ShardBatch:
    return batch


def _load_malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (called after each written batch, so the many
    short-lived image buffers do not pile up as heap fragmentation)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


#: Pixel bytes written between two hand-backs of freed memory (and at the end of every shard).
RELEASE_EVERY_BYTES = 64 << 20

#: Reasons of samples a method did not perturb: never written.
NO_PERTURBATION = "no_perturbation"
NON_FINITE = "non_finite_perturbation"


def protect_records(
    records: list[SampleRecord],
    method: ProtectionMethod,
    seed: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> list[np.ndarray | None]:
    """Protect the decoded images of ``records`` in batched passes (one per image size).

    ``autocast`` makes a fresh mixed-precision context per pass (a context is single-use).

    A sample whose δ holds NaN or Inf fails with ``non_finite_perturbation``; for a method
    that perturbs (``method.perturbs``), a sample that comes back identical to its original
    fails with ``no_perturbation``: nothing a method left unprotected is written. When no
    sample of the batch came back perturbed, the run stops (:class:`UserError`): the method
    is broken (a diverged artifact, a zero budget), not the data.

    Returns, per record, the protected HxWx3 uint8 array, or None for failed records.
    """
    out: list[np.ndarray | None] = [None] * len(records)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, rec in enumerate(records):
        if rec.ok and rec.pixels is not None:
            groups.setdefault(tuple(rec.pixels.shape), []).append(i)
    sent = kept = 0
    for idxs in groups.values():
        recs = [records[i] for i in idxs]
        hwc = stacked_pixels([r.pixels for r in recs])
        u8 = hwc.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W) view
        batch = ProtectBatch(
            pixels=u8,
            keys=[r.key for r in recs],
            seeds=[sample_seed(seed, r.key) for r in recs],
            captions=[r.caption for r in recs],
            labels=[r.label for r in recs],
        )
        with torch.no_grad(), (autocast() if autocast is not None else contextlib.nullcontext()):
            delta = method.perturb(batch)
        if delta.shape != u8.shape:
            raise RuntimeError(f"method {method.name} returned shape {tuple(delta.shape)}, expected {tuple(u8.shape)}")
        finite = finite_samples(delta)
        if not bool(finite.all()):
            delta = torch.where(finite.view(-1, 1, 1, 1), delta, torch.zeros_like(delta))
        protected_u8 = apply_perturbation(u8, delta, method.epsilon, checked_finite=True)  # non-finite δ is zeroed
        changed = (protected_u8 != u8).any(dim=(1, 2, 3))
        protected = protected_u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        for j, (i, ok, moved) in enumerate(zip(idxs, finite.tolist(), changed.tolist())):
            if not ok:
                records[i].fail(NON_FINITE)
            elif method.perturbs and not moved:
                records[i].fail(NO_PERTURBATION)
            else:
                out[i] = protected[j]
                kept += 1
        sent += len(idxs)
    if method.perturbs and sent and not kept:
        raise UserError(
            f"method {method.name!r} left all {sent} images of a batch unprotected (unchanged or NaN noise): "
            "the method is broken, not the data (a diverged artifact, a budget under one level?); "
            "nothing of this batch was written: refit the artifact or check --epsilon")
    return out


def stacked_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """The (B, H, W, 3) batch of same-shaped images: a view when they lie back to back in one
    buffer (a batch from a reader process, see ``ShardBatch.__getstate__``), else a copy."""
    first = pixels[0]
    n = first.numel()
    storage = first.untyped_storage()
    if all(
        p.is_contiguous() and p.untyped_storage().data_ptr() == storage.data_ptr()
        and p.storage_offset() == first.storage_offset() + i * n
        for i, p in enumerate(pixels)
    ):
        return torch.empty(0, dtype=torch.uint8).set_(storage, first.storage_offset(), (len(pixels), *first.shape))
    # numpy's stack is much faster than torch.stack for uint8 on the CPU.
    return torch.from_numpy(np.stack([p.numpy() for p in pixels]))


def encode_batch(
    records: list[SampleRecord], protected: list[np.ndarray | None], settings: EncodeSettings
) -> tuple[list[EncodedImage | None], dict[str, float]]:
    """Encode every protected image of a batch (runs in the encoder thread pool); returns the
    encoded images and the seconds of the ``encode``, ``measure`` and ``hash`` stages."""
    clock = StageClock()
    encoded = [
        encode_protected(rec.pixels.numpy(), arr, settings, clock) if arr is not None else None
        for rec, arr in zip(records, protected)
    ]
    return encoded, clock.take()


def build_run_config(cfg: ShardJobConfig, method: ProtectionMethod) -> dict[str, Any]:
    """The configuration recorded in ``run.json``; its fingerprint guards the directory."""
    method_config = method.config()
    settings = {**cfg.output_settings(), "method": method_config, "artifact": method.fingerprint()}
    return {
        "fingerprint": config_fingerprint(settings),
        "method": {**method_config, "artifact_fingerprint": method.fingerprint()},
        "settings": cfg.output_settings(),
        "budget_levels": budget_levels(method.epsilon),
    }


def _make_accelerator():
    from accelerate import Accelerator

    # Mixed precision is applied by our own autocast (see ``_autocast``), not by Accelerate:
    # its state is a per-process singleton, so a second job in the same process with another
    # precision would be refused.
    return Accelerator()


def _autocast(mixed_precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager] | None:
    """A factory of fresh autocast contexts for the method's pass, or None for full precision."""
    if mixed_precision == "no":
        return None
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _broadcast_error(accelerator, error: str | None) -> str | None:
    if accelerator.num_processes == 1:
        return error
    from accelerate.utils import broadcast_object_list

    box = [error]
    broadcast_object_list(box, from_process=0)
    return box[0]


def run_shard_job(cfg: ShardJobConfig, method: ProtectionMethod, accelerator=None) -> dict[str, Any]:
    """Protect every input shard into ``cfg.output``; returns the merged summary (main process)
    or this rank's counts (other ranks).

    Raises :class:`UserError` for bad input (before anything is written), :class:`RunFailed`
    (main process, after writing) when shards could not be read or more samples failed than
    ``cfg.max_failure_rate``, :class:`~uge_protect.errors.Terminated` on SIGTERM, SIGINT or
    SIGHUP (also when one arrives during the merge, which is finished first), and
    :class:`~uge_protect.errors.ReaderDied` when a reading worker process dies.
    """
    try:
        cfg.validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    inputs = expand_inputs(cfg.inputs)
    check_output_apart(cfg.inputs, inputs, cfg.output)
    with sigterm_stops_the_run():
        follow_launcher()
        own_accelerator = accelerator is None
        accelerator = accelerator or _make_accelerator()
        ok = False
        try:
            with json_log(cfg.log_json, accelerator.process_index):
                if accelerator.is_main_process:
                    event(log, "run_start", inputs=len(inputs), output=cfg.output, method=method.name,
                          processes=accelerator.num_processes)
                result = _run(cfg, method, accelerator, inputs)
                if "counts" in result:
                    event(log, "run_end", **result["counts"], failures=result["failures"],
                          seconds=result["timings"]["seconds"])
            ok = True
        finally:
            if own_accelerator and accelerator.num_processes > 1:
                _leave_process_group(accelerator, barrier=ok)
        stop_point()  # a signal during the merge: it was finished (atomic), the run still reports the stop
    if "counts" in result:  # the main process: judge the merged output
        check_outcome(result, cfg.max_failure_rate)
    return result


#: What to check first when most samples fail for one reason.
_HINTS = {
    "missing_caption": " (check --caption-field, or that the samples have a txt field)",
    "missing_label": " (check --label-field, or that the samples have a cls field)",
}


def check_outcome(summary: dict[str, Any], max_failure_rate: float) -> None:
    """Raise :class:`RunFailed` when shards could not be read or the merged share of failed
    samples is above ``max_failure_rate``; the message is one line."""
    problems = []
    unreadable = summary.get("unreadable_shards") or {}
    if unreadable:
        names = sorted(unreadable)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        problems.append(
            f"{len(names)} input shard{'s' if len(names) > 1 else ''} could not be read ({shown}:"
            f" {unreadable[names[0]]}); nothing was written for {'them' if len(names) > 1 else 'it'},"
            " rerun the same command to retry"
        )
    counts = summary["counts"]
    samples, failed = counts["samples"], counts["failed"]
    if samples and failed / samples > max_failure_rate:
        reason, n = max(summary["failures"].items(), key=lambda kv: (kv[1], kv[0]), default=("unknown", failed))
        problems.append(
            f"{failed} of {samples} samples failed ({100 * failed / samples:.3g}%, above --max-failure-rate"
            f" {max_failure_rate:g}); most common reason: {reason} ({n}){_HINTS.get(reason, '')};"
            " the manifests list every sample's reason"
        )
    if problems:
        raise RunFailed("; ".join(problems), summary)


def _leave_process_group(accelerator, barrier: bool) -> None:
    """Leave together and tear the process group down, so no rank exits while another still
    talks to it (gloo aborts a process that exits mid-group)."""
    import torch.distributed as dist

    if barrier:
        accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()


def _run(cfg: ShardJobConfig, method: ProtectionMethod, accelerator, inputs: list[str]) -> dict[str, Any]:
    rank, world = accelerator.process_index, accelerator.num_processes
    layout = OutputLayout(Path(cfg.output))
    run_config = build_run_config(cfg, method)
    fingerprint = run_config["fingerprint"]

    lock = None
    error = None
    if accelerator.is_main_process:
        try:
            lock = claim_output(layout, run_config, cfg.overwrite)
        except UserError as exc:
            error = str(exc)
    error = _broadcast_error(accelerator, error)
    if error:
        raise UserError(error)

    try:
        started = time.perf_counter()
        mine = inputs[rank::world]
        pending = [s for s in mine if not is_complete(layout, shard_name(s), fingerprint)]
        try:
            counts = _protect_shards(cfg, method, accelerator, layout, pending, fingerprint, rank)
        except BaseException:
            for tmp in layout.temp_files(pid=os.getpid()):  # anything an interrupted write left
                tmp.unlink(missing_ok=True)
            raise
        counts.update(shards_skipped=len(mine) - len(pending), seconds=time.perf_counter() - started)
        accelerator.wait_for_everyone()
        all_counts = _gather(accelerator, counts)
        if not accelerator.is_main_process:
            return counts
        seconds = max(c["seconds"] for c in all_counts)
        processed = sum(c["samples"] for c in all_counts)
        timings = {
            "seconds": round(seconds, 3),
            "samples_processed": processed,
            "images_per_second": round(processed / seconds, 2) if seconds > 0 else None,
            "world_size": world,
            "shards_processed": sum(c["shards"] for c in all_counts),
            "shards_skipped": sum(c["shards_skipped"] for c in all_counts),
            "stages": stage_report(_summed(c["stages"] for c in all_counts)),
        }
        unreadable = {k: v for c in all_counts for k, v in c["unreadable"].items()}
        stop_point()
        return merge_outputs(
            layout, run_config, input_names=[shard_name(s) for s in inputs], timings=timings,
            unreadable=unreadable,
        )
    finally:
        if lock is not None:
            lock.release()


def _summed(clocks) -> dict[str, float]:
    total = StageClock()
    for seconds in clocks:
        total.merge(seconds)
    return total.take()


@contextlib.contextmanager
def _workers_as_asked():
    """Without torch's warning that more reader processes than CPUs may run slowly: their
    number is the user's (``--workers``), and on one core two readers still overlap reading
    with decoding."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


class _InlineExecutor(contextlib.AbstractContextManager):
    """Runs submitted work at once in the calling thread (``--encode-threads 0``)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def __exit__(self, *exc) -> None:
        return None


def _gather(accelerator, counts: dict[str, Any]) -> list[dict[str, Any]]:
    if accelerator.num_processes == 1:
        return [counts]
    from accelerate.utils import gather_object

    return gather_object([counts])


class _Outputs:
    """The output shards this process is writing: encoded batches in, finished shards out."""

    def __init__(self, layout: OutputLayout, encode: EncodeSettings, fingerprint: str, progress: Progress,
                 clock: StageClock):
        self.layout, self.encode, self.fingerprint, self.progress = layout, encode, fingerprint, progress
        self.clock = clock
        self.writers: dict[str, ShardWriter] = {}
        self.counts: dict[str, Any] = {"samples": 0, "written": 0, "failed": 0, "shards": 0}
        self.unreadable: dict[str, str] = {}
        self._released = 0  # pixel bytes written since freed memory was last handed back

    def add(self, batch: ShardBatch, encoded: list[EncodedImage | None]) -> None:
        """Write a batch to its shard, finishing the shard at its last batch."""
        if batch.last and reason_code(batch.tar_error or "") == UNREADABLE:
            # A read failure, not damage in the data: no output and no completion marker,
            # so a rerun retries the shard.
            writer = self.writers.pop(batch.shard_name, None)
            if writer is not None:
                writer.abort()
            discard_shard_outputs(self.layout, batch.shard_name)
            self.unreadable[batch.shard_name] = batch.tar_error.partition(":")[2].strip() or UNREADABLE
            self.progress.event("shard_unreadable", shard=batch.shard_name, error=self.unreadable[batch.shard_name])
            return
        writer = self.writers.get(batch.shard_name)
        if writer is None:
            writer = self.writers[batch.shard_name] = ShardWriter(self.layout, batch.shard, batch.shard_name,
                                                                  self.encode, self.fingerprint)
        with self.clock.timed("write"):
            writer.add_batch(batch, encoded)
        written = sum(e is not None for e in encoded)
        failed = len(batch.records) - written
        self.counts["samples"] += len(batch.records)
        self.counts["written"] += written
        self.counts["failed"] += failed
        self.progress.samples_done(written, failed)
        if batch.last:
            with self.clock.timed("manifest"):
                stats = self.writers.pop(batch.shard_name).finish(batch.tar_error)
            self.counts["shards"] += 1
            self.progress.shard_done(stats)
        self._released += sum(r.pixels.numel() for r in batch.records if r.pixels is not None)
        if batch.last or self._released >= RELEASE_EVERY_BYTES:
            release_freed_memory()
            self._released = 0

    def abort(self) -> None:
        """Drop every shard not finished yet."""
        for writer in self.writers.values():
            writer.abort()


def _settings(cfg: ShardJobConfig, method: ProtectionMethod) -> tuple[DecodeSettings, EncodeSettings]:
    decode = DecodeSettings(
        max_pixels=cfg.max_pixels,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        caption_field=cfg.caption_field,
        label_field=cfg.label_field,
        requires_caption=method.requires_caption,
        requires_label=method.requires_label,
        max_batch_pixels=cfg.max_batch_pixels,
        max_sample_bytes=cfg.max_sample_bytes,
    )
    encode = EncodeSettings(
        cfg.image_format, cfg.lossy, cfg.quality, cfg.png_compress_level, PNG_STRATEGIES[cfg.png_strategy]
    )
    return decode, encode


def _protect_shards(
    cfg: ShardJobConfig,
    method: ProtectionMethod,
    accelerator,
    layout: OutputLayout,
    shards: list[str],
    fingerprint: str,
    rank: int,
) -> dict[str, Any]:
    device = accelerator.device
    method.to(device)
    decode, encode = _settings(cfg, method)
    workers = min(cfg.num_workers, len(shards))
    with _workers_as_asked():
        loader = DataLoader(
            ShardSource(shards, decode, cfg.batch_size),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            worker_init_fn=functools.partial(init_worker, os.getpid()),
            pin_memory=device.type == "cuda",
            prefetch_factor=2 if workers > 0 else None,
        )
    progress = Progress(len(shards), show=not cfg.quiet and accelerator.is_local_main_process, rank=rank)
    clock = StageClock()
    outputs = _Outputs(layout, encode, fingerprint, progress, clock)
    inflight: deque[tuple[ShardBatch, Future]] = deque()
    max_inflight = cfg.encode_threads + 1  # one batch per encoder and one waiting
    autocast = _autocast(cfg.mixed_precision, device)

    def drain_one() -> None:
        batch, future = inflight.popleft()
        with clock.timed("wait_encoders"):
            encoded, seconds = future.result()
        clock.merge(seconds)
        outputs.add(batch, encoded)

    try:
        pool_cm = (
            ThreadPoolExecutor(max_workers=cfg.encode_threads, thread_name_prefix="encode",
                               initializer=lower_priority)
            if cfg.encode_threads > 0
            else _InlineExecutor()
        )
        if workers > 0:
            # Keep the collector away from objects that forked workers share with us: its
            # bookkeeping writes would copy those pages into every worker over time.
            gc.freeze()
        with pool_cm as pool, _workers_as_asked(), reader_processes(loader) as batches:
            while True:
                # A stop signal stops the run here, between batches (see lifecycle).
                wall, cpu = time.perf_counter(), time.thread_time()
                with interruptible(allowed=workers > 0):
                    batch = next(batches, None)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                if batch is None:
                    break
                clock.merge(batch.stage_seconds)  # the reading stages (in this process with --workers 0)
                if workers == 0:  # the wait was the reading itself
                    wall -= sum(w for w, _ in batch.stage_seconds.values())
                    cpu -= sum(c for _, c in batch.stage_seconds.values())
                clock.add("wait_readers", max(wall, 0.0), max(cpu, 0.0))
                with clock.timed("method"):
                    protected = protect_records(batch.records, method, cfg.seed, device, autocast)
                inflight.append((batch, pool.submit(encode_batch, batch.records, protected, encode)))
                while len(inflight) > max_inflight or (inflight and inflight[0][1].done()):
                    drain_one()
            while inflight:
                stop_point()
                drain_one()
    except BaseException:
        outputs.abort()
        raise
    finally:
        progress.event("rank_done", **outputs.counts, unreadable=len(outputs.unreadable),
                       stages=stage_report(clock.seconds))
        progress.close()
    return {**outputs.counts, "unreadable": outputs.unreadable, "stages": clock.take()}
