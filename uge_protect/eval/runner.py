"""``uge-protect eval``: train on protected and on clean shards, compare on clean test shards.

For every defense × architecture × repeat, one model is trained on the protected training
set and one on the clean training set, with the same defense, the same seed (same initial
weights, same batch order) and the same settings; both are tested on the clean test set.

Every such training run is independent: under ``accelerate launch`` (or ``torchrun``) with
several processes the runs are spread over the processes (:mod:`.parallel`) and the main
process writes the report; with ``cache_dir`` finished runs are reused (:mod:`.cache`).
"""

from __future__ import annotations

import glob
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from uge_protect.errors import UserError
from uge_protect.eval.authorized import ModelEntry, authorized_summary
from uge_protect.eval.cache import RunCache, dataset_digest, run_key
from uge_protect.eval.attacker import attacker_set, mark_picks
from uge_protect.eval.classify import TrainSettings, evaluate, fit_classifier
from uge_protect.eval.config import EvalConfig
from uge_protect.eval.defenses import Defense, apply_data_defense, partial_protection
from uge_protect.eval.metrics import accuracy_from_confusion, summarize
from uge_protect.eval.parallel import Workers, run_spread, start_workers
from uge_protect.eval.protocol import (classifier_headline, clip_headline, covers_every_row, fit_architectures,
    mark_classifier_rows, role)
from uge_protect.shards.dataset import InMemoryDataset, load_shards
from uge_protect.methods.base import clip_arch_id
from uge_protect.methods.registry import attacker_models
from uge_protect.models.classifiers import MIN_SIDE

log = logging.getLogger(__name__)

def _protected_shards(directory: str) -> tuple[str, dict[str, Any] | None]:
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"protected directory not found: {directory}")
    pattern = str(d / "shards" / "*.tar")
    if not glob.glob(pattern):
        raise UserError(f"no shards in {d / 'shards'} (expected the output directory of `uge-protect shard`)")
    info = None
    pj = d / "protection.json"
    if pj.is_file():
        try:
            info = json.loads(pj.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = None
    if not isinstance(info, dict):
        return pattern, None
    if not isinstance(info.get("method"), dict):  # read as data: a malformed record is no record
        info = {k: v for k, v in info.items() if k != "method"}
    return pattern, info


def _load(patterns: list[str], what: str, image_size: int | None) -> InMemoryDataset:
    try:
        ds = load_shards(patterns, image_size=image_size)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: cannot read {' '.join(patterns)}: {exc}") from None
    return ds


def _class_names(test_patterns: list[str], num_classes: int) -> list[str] | None:
    """``classes.json`` (a list of names) next to the test shards or one folder up, as demo-data writes."""
    for pattern in test_patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        base = Path(matches[0]).parent
        for cand in (base / "classes.json", base.parent / "classes.json"):
            try:
                names = json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(names, list) and len(names) >= num_classes and all(isinstance(n, str) for n in names):
                return names
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _versions() -> dict[str, str]:
    import torchvision

    from uge_protect import __version__ as ver  # type: ignore[attr-defined]

    return {"uge_protect": ver, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def run_evaluation(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``, write report.json / report.md / figures, return the report.

    Progress goes to this module's logger at INFO (nothing when ``cfg.quiet``), warnings at WARNING."""
    defenses = cfg.validate()
    models = {m.label: m for m in cfg.models()}
    workers = start_workers(cfg.device)
    prefix = f"[rank {workers.rank}] " if workers.world > 1 else ""

    def say(msg: str) -> None:
        if not cfg.quiet:
            log.info(prefix + msg)

    started = time.perf_counter()
    protected_pattern, protection = _protected_shards(cfg.protected)
    out, cache, clip_mod = _prepare(cfg)
    say(f"loading protected {protected_pattern}, clean {' '.join(cfg.clean_train)}, test {' '.join(cfg.test)}")
    data = _load_data(cfg, protected_pattern, models)
    method = (protection or {}).get("method", {}) or {}
    if cfg.method_aware:
        data.attacker = attacker_set(data.clean, cfg.attacker_fraction, cfg.seed, data.num_classes)
        models.update((m.label, m) for m in attacker_models(
            method, list(cfg.archs), data.prot_train.images, data.prot_train.labels, data.attacker.images,
            data.attacker.labels))
    report = _new_report(cfg, data, protection, defenses, workers)
    fit = fit_architectures(method)
    for warning in _protocol_notes(report, method, fit, models):
        log.warning(prefix + warning)

    class_names = _class_names(cfg.test, data.num_classes) if clip_mod is not None else None
    jobs = _jobs(cfg, defenses, models, data, clip_mod is not None)
    runner = _JobRunner(cfg, data.sets(), data.test, data.num_classes, class_names, workers.device, say, clip_mod,
                        total=0, models=models)
    results, cached = _run_jobs(jobs, runner, cache, workers, say)
    if cfg.task in ("classify", "both"):
        runs = [r for job, r in zip(jobs, results) if job.task == "classify"]
        summary = _classify_summary(list(models), defenses, runs)
        roles = {label: role(m.arch, fit, owner=m.owner, other_key=m.other_key or m.attacker)
                 for label, m in models.items()}
        mark_classifier_rows(summary, roles, data.num_classes)
        mark_picks(summary, {label: m.group for label, m in models.items() if m.group})
        report["tasks"]["classify"] = {"runs": runs, "summary": summary}
        report["headline"]["classify"] = classifier_headline(summary)
    if clip_mod is not None:
        pairs = [(job, r) for job, r in zip(jobs, results) if job.task == "clip"]
        clip = _clip_report(cfg, clip_mod, defenses, pairs, data.prot_train, data.clean, data.test,
                            class_names, workers.device)
        clip["arch"] = clip_arch_id(clip["runs"][0]["settings"]["model_config"]) if clip["runs"] else "clip"
        report["tasks"]["clip"] = clip
        report["headline"]["clip"] = clip_headline(clip["runs"], clip["arch"], fit)
    report["cached_runs"] = cached
    report["runtime_seconds"] = time.perf_counter() - started
    if workers.is_main:
        from uge_protect.eval.report import write_report

        report["files"] = write_report(report, out, samples=_sample_grid(data), figures=cfg.figures)
        say(f"report: {out / 'report.md'} ({report['runtime_seconds']:.0f} s)")
    workers.barrier()
    return report


def _prepare(cfg: EvalConfig) -> tuple[Path, RunCache, Any]:
    """The report directory (created), the run cache and the CLIP evaluation module (None for
    ``--task classify``)."""
    if not cfg.clean_train:
        raise UserError("--clean-train is required")
    if not cfg.test:
        raise UserError("--test is required")
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        cache = RunCache(cfg.cache_dir)
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    clip_mod = None
    if cfg.task in ("clip", "both"):
        try:
            import uge_protect.eval.clip as clip_mod
        except ImportError as exc:
            raise UserError(f"--task {cfg.task} needs the CLIP evaluation (uge_protect.eval.clip), "
                            f"which is not available in this build: {exc}") from None
    return out, cache, clip_mod


@dataclass
class _Data:
    """The loaded shards; ``prot_train`` is the protected set trained on (``--clean-fraction`` of
    it replaced by the clean samples of the same keys, marked in ``clean_mask``)."""

    pattern: str
    prot: InMemoryDataset
    clean: InMemoryDataset
    test: InMemoryDataset
    prot_train: InMemoryDataset
    clean_mask: torch.Tensor
    num_classes: int
    #: The method-aware attacker's clean labelled set (``--method-aware``), else None.
    attacker: InMemoryDataset | None = None

    def sets(self) -> dict[str, InMemoryDataset]:
        """The two training sets, by the name jobs use (and the attacker's clean set)."""
        sets = {"protected": self.prot_train, "clean": self.clean}
        return sets if self.attacker is None else {**sets, "attacker": self.attacker}


def _named(prot: InMemoryDataset, clean: InMemoryDataset, test: InMemoryDataset) -> list[tuple[str, InMemoryDataset]]:
    """The loaded sets as error messages name them."""
    return [("protected training", prot), ("clean training", clean), ("test", test)]


def _load_data(cfg: EvalConfig, protected_pattern: str, models: dict[str, ModelEntry]) -> _Data:
    """Load the three shard sets and check that every model can train on them."""
    prot = _load([protected_pattern], "protected training shards", cfg.image_size)
    clean = _load(list(cfg.clean_train), "clean training shards", cfg.image_size)
    test = _load(list(cfg.test), "test shards", cfg.image_size)
    if prot.images.shape[1:] != clean.images.shape[1:] or prot.images.shape[1:] != test.images.shape[1:]:
        raise UserError(
            f"image sizes differ: protected {tuple(prot.images.shape[2:])}, clean {tuple(clean.images.shape[2:])}, "
            f"test {tuple(test.images.shape[2:])}; pass --image-size N"
        )
    if cfg.task in ("classify", "both"):
        for name, ds in _named(prot, clean, test):
            missing = int((ds.labels < 0).sum())
            if missing:
                raise UserError(f"{missing} of {len(ds)} {name} samples have no class label (cls field); "
                                "classification needs one per sample (use --task clip for caption-only data)")
    side = min(prot.images.shape[-2:])
    for entry in models.values():
        if side < MIN_SIDE.get(entry.arch, 1):
            raise UserError(f"{entry.arch} needs images of at least {MIN_SIDE[entry.arch]} pixels, these are {side}; "
                            "pass --image-size or leave it out")
    # Partial protection: a seeded fraction of the protected samples replaced by their clean versions.
    mixed_images, clean_mask = partial_protection(prot.images, prot.keys, clean.images, clean.keys,
                                                  cfg.clean_fraction, cfg.seed)
    prot_train = InMemoryDataset(mixed_images, prot.labels, prot.captions, prot.keys, prot.skipped)
    return _Data(protected_pattern, prot, clean, test, prot_train, clean_mask,
                 max(prot.num_classes, clean.num_classes, test.num_classes))


def _new_report(cfg: EvalConfig, data: _Data, protection: dict[str, Any] | None, defenses: list[Defense],
                workers: Workers) -> dict[str, Any]:
    """The report before any training: settings, versions, protection, data and the standing notes."""
    prot, clean, test, clean_mask = data.prot, data.clean, data.test, data.clean_mask
    return {
        "kind": "uge-protect evaluation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {**asdict(cfg), "device": workers.device, "defenses": [d.spec for d in defenses],
                     "processes": workers.world},
        "versions": _versions(),
        "protection": {
            "directory": str(cfg.protected),
            "method": (protection or {}).get("method"),
            "budget": (protection or {}).get("budget"),
            "authorized": authorized_summary(cfg.authorized, cfg.gate),
        },
        "data": {
            "protected_train": {"n": len(prot), "skipped": prot.skipped, "shards": data.pattern},
            "clean_train": {"n": len(clean), "skipped": clean.skipped, "shards": list(cfg.clean_train)},
            "test": {"n": len(test), "skipped": test.skipped, "shards": list(cfg.test)},
            "num_classes": data.num_classes,
            "image_shape": list(prot.images.shape[1:]),
            "partial_protection": {
                "clean_fraction_requested": cfg.clean_fraction,
                "clean_fraction_actual": float(clean_mask.float().mean()) if len(clean_mask) else 0.0,
                "n_replaced_by_clean": int(clean_mask.sum()),
                "paired_by": "key",
                "seed": cfg.seed,
            },
        },
        "notes": [
            "Accuracies are fractions in [0, 1] on the clean test set.",
            "'protected' = trained on the protected shards (with --clean-fraction of them replaced by their "
            "clean versions); 'clean' = trained on the clean shards; both with the same defense and seed.",
            "Data-level defenses (grayscale, jpeg:Q) preprocess training and test images alike; class-mean, "
            "which needs labels, the training images only; training-time "
            "defenses (cutout, mixup, strong-aug, adv-train) act on training batches only.",
            f"Training runs spread over {workers.world} process(es); each run is seeded on its own, so the "
            "results do not depend on the number of processes.",
        ],
        "tasks": {},
    }


def _protocol_notes(report: dict[str, Any], method: dict[str, Any], fit: list[str] | None,
                    models: dict[str, ModelEntry]) -> list[str]:
    """Record which networks the fit saw and what that means for the headline; returns the
    notes that are also warnings."""
    report["protection"]["fit_architectures"] = fit
    report["headline"] = {}
    warnings = []
    if fit is None:
        report["notes"].append("protection.json does not record the networks the fit used: every row counts "
                               "in the headline (none is known to be held out).")
    hackers = [m.arch for m in models.values() if not m.owner and not m.other_key]
    if covers_every_row(fit, hackers):
        warnings.append(f"protection.json names every evaluated architecture ({', '.join(sorted(set(hackers)))}) "
                        "as seen in the fit, so no row judges the protection; evaluate architectures it does not name.")
        report["notes"].append(warnings[-1])
    if method.get("protects") is False:
        report["notes"].append(f"The protection method {method.get('method')!r} is a non-protecting control.")
    return warnings


def _jobs(cfg: EvalConfig, defenses: list[Defense], models: dict[str, ModelEntry], data: _Data,
          clip: bool) -> list[_Job]:
    """Every training run of the evaluation, classifiers first."""
    jobs: list[_Job] = []
    if cfg.task in ("classify", "both"):
        jobs += _classify_jobs(cfg, defenses, list(models))
    if clip:
        for name, ds in _named(data.prot, data.clean, data.test):
            if not any(c for c in ds.captions):
                raise UserError(f"--task clip needs captions (txt field); the {name} shards have none")
        jobs += _clip_jobs(cfg, defenses)
    return jobs


def _run_jobs(jobs: list[_Job], runner: "_JobRunner", cache: RunCache, workers: Workers,
              say: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """Every job's result in job order (from the cache, or run here or on another process) and
    how many came from the cache."""
    cfg = runner.cfg
    digests = {name: dataset_digest(ds) for name, ds in (*runner.sets.items(), ("test", runner.test))}
    keys = [_job_key(job, cfg, runner.device, digests, runner.num_classes, runner.models) for job in jobs]
    cached = {i: hit for i, k in enumerate(keys)
              if (hit := cache.get(k, jobs[i].task, _job_meta(jobs[i]),
                                   cfg.epochs if jobs[i].task == "classify" else None)) is not None}
    workers.barrier()  # every process has read the cache before any process writes to it
    pending = [i for i in range(len(jobs)) if i not in cached]
    if cached:
        say(f"reusing {len(cached)} of {len(jobs)} training runs from the cache {cfg.cache_dir}")
    if workers.world > 1 and workers.is_main:
        say(f"{len(pending)} training runs spread over {workers.world} processes")
    runner.total = len(pending)

    def work(i: int) -> dict[str, Any]:
        result = runner.run(jobs[i])
        cache.put(keys[i], result)
        return result

    fresh = dict(zip(pending, run_spread(workers, pending, work)))
    results = [{**cached[i], "cached": True} if i in cached else {**fresh[i], "cached": False}
               for i in range(len(jobs))]
    for r in results:
        r.pop("key", None)
    return results, len(cached)


def _sample_grid(data: _Data) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first (up to 8) protected samples paired by key with their clean originals."""
    index = {k: i for i, k in enumerate(data.clean.keys)}
    pairs = [(i, index[k]) for i, k in enumerate(data.prot.keys) if k in index][:8]
    if not pairs:
        return None
    pi = torch.tensor([p for p, _ in pairs])
    ci = torch.tensor([c for _, c in pairs])
    return data.clean.images[ci], data.prot.images[pi]


@dataclass(frozen=True)
class _Job:
    """One training run: a model trained on one training set under one defense and seed."""

    task: str      # classify | clip
    defense: Defense
    arch: str | None
    repeat: int
    seed: int
    which: str     # protected | clean


def _classify_jobs(cfg: EvalConfig, defenses: list[Defense], labels: list[str]) -> list[_Job]:
    return [_Job("classify", d, label, rep, cfg.seed + rep, which)
            for d in defenses for label in labels for rep in range(cfg.repeats)
            for which in ("protected", "clean")]


def _clip_jobs(cfg: EvalConfig, defenses: list[Defense]) -> list[_Job]:
    # training-time defenses belong to the classifier's training loop
    return [_Job("clip", d, None, rep, cfg.seed + rep, which)
            for d in defenses if not d.train_time for rep in range(cfg.repeats)
            for which in ("protected", "clean")]


def _train_settings(cfg: EvalConfig, arch: str, seed: int, device: str) -> TrainSettings:
    return TrainSettings(
        arch=arch, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr,
        weight_decay=cfg.weight_decay, schedule=cfg.schedule, crop_padding=cfg.crop_padding, flip=cfg.flip,
        adv_epsilon=cfg.adv_epsilon, adv_step=cfg.adv_step, adv_steps=cfg.adv_steps, seed=seed, device=device,
    )


def _clip_kwargs(cfg: EvalConfig, seed: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"seed": seed, "model_config": cfg.clip_model_config, "batch_size": cfg.batch_size}
    if cfg.clip_epochs is not None:
        kw["epochs"] = cfg.clip_epochs
    return kw


def _job_meta(job: _Job) -> dict[str, Any]:
    """What a job's result records of the job (a cached result must agree)."""
    meta = {"defense": job.defense.spec, "repeat": job.repeat, "seed": job.seed, "train_data": job.which}
    return {**meta, "arch": job.arch} if job.task == "classify" else meta


def _job_key(job: _Job, cfg: EvalConfig, device: str, digests: dict[str, str], num_classes: int,
             models: dict[str, ModelEntry]) -> str:
    from uge_protect import __version__

    if job.task == "classify":
        entry = models[job.arch or ""]
        settings: dict[str, Any] = asdict(_train_settings(cfg, entry.arch, job.seed, device))
        settings.pop("device")
        if (entry.build is not None or entry.teacher is not None or entry.front is not None
                or entry.transform is not None):  # plain ones keep their keys
            settings["model"] = entry.label + "|" + entry.cache_tag()
    else:
        settings = _clip_kwargs(cfg, job.seed)
    return run_key(task=job.task, defense=job.defense.spec, settings=settings, train=digests[job.which],
                   test=digests["test"], num_classes=num_classes, device=device.split(":")[0],
                   version=__version__)


class _JobRunner:
    """Runs jobs in one process, keeping the current defense's preprocessed images."""

    def __init__(self, cfg: EvalConfig, sets: dict[str, InMemoryDataset], test: InMemoryDataset,
                 num_classes: int, class_names: list[str] | None, device: str, say: Callable[[str], None],
                 clip_mod: Any, total: int, models: dict[str, ModelEntry]):
        self.cfg, self.sets, self.test, self.num_classes = cfg, sets, test, num_classes
        self.models = models
        self.class_names, self.device, self.say, self.clip_mod = class_names, device, say, clip_mod
        self.total, self.done = total, 0
        self._defense: str | None = None
        self._data: dict[str, InMemoryDataset] = {}

    def _with_defense(self, defense: Defense) -> dict[str, InMemoryDataset]:
        if self._defense != defense.spec:
            t0 = time.perf_counter()
            self._data = {name: InMemoryDataset(apply_data_defense(defense, ds.images, None if name == "test" else ds.labels),
                                                ds.labels, ds.captions, ds.keys, ds.skipped)
                          for name, ds in (*self.sets.items(), ("test", self.test))}
            self._defense = defense.spec
            if defense.data_level:
                which = "train images" if defense.name == "class-mean" else "train and test images"
                self.say(f"[{defense.spec}] preprocessed {which} ({time.perf_counter() - t0:.1f} s)")
        return self._data

    def run(self, job: _Job) -> dict[str, Any]:
        data = self._with_defense(job.defense)
        self.done += 1
        train, test = data[job.which], data["test"]
        meta = {"defense": job.defense.spec, "repeat": job.repeat, "seed": job.seed, "train_data": job.which}
        if job.task == "clip":
            self.say(f"[clip] {job.defense.spec} {job.which} seed {job.seed}: training CLIP")
            result = self.clip_mod.train_and_score_clip(
                train, test, class_names=self.class_names, label=job.which, device=self.device,
                progress=not self.cfg.quiet, **_clip_kwargs(self.cfg, job.seed))
            return {**meta, **result}
        assert job.arch is not None
        tag = f"[{self.done}/{self.total}] {job.defense.spec} {job.arch} {job.which} seed {job.seed}"
        epochs = self.cfg.epochs

        def on_epoch(r: dict[str, Any]) -> None:
            self.say(f"{tag} epoch {r['epoch']}/{epochs}: loss {r['train_loss']:.3f} "
                     f"train {_pct(r['train_acc'])} test {_pct(r['test_acc'])} ({r['seconds']:.1f} s)")

        entry = self.models[job.arch]
        if entry.transform is not None:  # the row's own view of whole images, before any augmentation
            train = InMemoryDataset(entry.transform(train.images), train.labels, train.captions, train.keys,
                                    train.skipped)
            test = InMemoryDataset(entry.transform(test.images), test.labels, test.captions, test.keys, test.skipped)
        teacher, teacher_view = None, None
        if entry.teacher is not None:
            self.say(f"{tag}: training the teacher {entry.teacher.label}")
            look = entry.teacher.transform  # a teacher with its own view is trained, and queried, on it
            t_train, t_test = (train.images, test.images) if look is None else (look(train.images), look(test.images))
            teacher, _ = fit_classifier(
                t_train, train.labels, t_test, test.labels, self.num_classes,
                _train_settings(self.cfg, entry.teacher.arch, job.seed, self.device), job.defense,
                build_model=entry.teacher.factory(self.num_classes, job.seed))
            teacher_view = None if look is None else t_train
        model, result = fit_classifier(train.images, train.labels, test.images, test.labels, self.num_classes,
                                       _train_settings(self.cfg, entry.arch, job.seed, self.device), job.defense,
                                       on_epoch=on_epoch, build_model=entry.factory(self.num_classes, job.seed),
                                       teacher=teacher, teacher_images=teacher_view)
        if entry.attacker and "attacker" in data:  # what the attacker sees of the run on its clean set
            attack = data["attacker"]
            if entry.transform is not None:
                attack = InMemoryDataset(entry.transform(attack.images), attack.labels, attack.captions, attack.keys,
                                         attack.skipped)
            cm = evaluate(model, attack.images, attack.labels, self.num_classes, self.device)
            result["attacker_acc"] = accuracy_from_confusion(cm)
        return {"defense": job.defense.spec, "arch": job.arch, "repeat": job.repeat, "seed": job.seed,
                "train_data": job.which, **result}


def _classify_summary(labels: list[str], defenses: list[Defense], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    for defense in defenses:
        for arch in labels:
            row: dict[str, Any] = {"defense": defense.spec, "arch": arch}
            for which in ("protected", "clean"):
                sel = [r for r in runs if r["defense"] == defense.spec and r["arch"] == arch and r["train_data"] == which]
                epochs = len(sel[0]["per_epoch"])
                row[which] = {
                    "final_test_acc": summarize(r["final_test_acc"] for r in sel),
                    "best_test_acc": summarize(r["best_test_acc"] for r in sel),
                    "per_epoch_test_acc_mean": [
                        sum(r["per_epoch"][e]["test_acc"] for r in sel) / len(sel) for e in range(epochs)
                    ],
                    "seeds": [r["seed"] for r in sel],
                }
                if all("attacker_acc" in r for r in sel):
                    row[which]["attacker_acc"] = summarize(r["attacker_acc"] for r in sel)
            if "attacker_acc" in row["protected"]:
                row["attacker_acc"] = row["protected"]["attacker_acc"]["mean"]
            row["drop_final_test_acc"] = (row["clean"]["final_test_acc"]["mean"]
                                          - row["protected"]["final_test_acc"]["mean"])
            summary.append(row)
    return summary


def _clip_report(cfg: EvalConfig, clip_mod: Any, defenses: list[Defense], pairs: list[tuple[_Job, dict[str, Any]]],
                 prot: InMemoryDataset, clean: InMemoryDataset, test: InMemoryDataset,
                 class_names: list[str] | None, device: str) -> dict[str, Any]:
    runs = []
    by_run: dict[tuple[str, int], dict[str, Any]] = {}
    for job, result in pairs:
        by_run.setdefault((job.defense.spec, job.repeat), {})[job.which] = result
    for (spec, rep), both in by_run.items():
        settings = clip_mod.clip_settings(clean, prot, test, crop_pad=both["protected"].get("crop_pad", 0),
                                          class_names=class_names, device=device, **_clip_kwargs(cfg, cfg.seed + rep))
        settings["seconds"] = {w: both[w].get("seconds") for w in ("protected", "clean")}
        strip = ("defense", "repeat", "seed", "train_data")
        runs.append({"defense": spec, "repeat": rep, "seed": cfg.seed + rep, "settings": settings,
                     **{w: {k: v for k, v in both[w].items() if k not in strip} for w in ("protected", "clean")}})
    skipped = [d.spec for d in defenses if d.train_time]
    return {"runs": runs, "class_names": class_names, "skipped_defenses": skipped,
            "note": "training-time defenses apply to the classifier task only" if skipped else None}
