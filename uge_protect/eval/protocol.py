"""The efficacy protocol: which rows judge a protection, and the report's headline.

Noise fitted against some networks can leave data unlearnable for those networks and fully
learnable for others, so a row only counts when its network was *held out* of the fit:

* every classifier row (and the CLIP run) gets a **role**: ``owner`` (the authorized network,
  which should learn), ``seen in fit`` (its architecture is among the networks the method's
  fit used, as its ``protection.json`` records them), ``held out``, or ``fit not recorded``
  (the protected directory does not say what the fit used);
* a row whose clean-trained accuracy is under half of the best clean row of its defense, or
  not clearly above chance, **did not learn** within the evaluation's budget: it says nothing
  about the protection and is left out of every summary;
* the **headline** is the worst case over held-out rows that learned: the highest accuracy any
  held-out hacker reached on the clean test set after training on protected data (under any
  defense evaluated; the mean over repeats), next to its clean-trained accuracy.

A network behind another key than the owner's (UGE's ``ARCH+key:N``), and a method-aware
attacker's row (``ARCH@STRATEGY``), is held out: no fit trains against a key it does not have
or a front layer the attacker chose.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

OWNER = "owner"
SEEN = "seen in fit"
HELD_OUT = "held out"
UNRECORDED = "fit not recorded"

#: A row learned when its clean-trained accuracy is at least this fraction of the best one.
LEARNED_FRACTION = 0.5
#: A CLIP run learned when its clean-trained Recall@10 is at least this multiple of chance.
CLIP_LEARNED_OVER_CHANCE = 2.0
#: At most this many names are read from a protection record's ``fit_architectures``.
MAX_FIT_ARCHITECTURES = 64
#: What a name in a record or report may look like (architecture labels, defenses, CLIP ids).
_NAME = re.compile(r"[A-Za-z0-9_.:+<@\-]{1,200}")
_BASIS = re.compile(r"[A-Za-z0-9 ,'()\-.]{1,200}")
ROLES = (OWNER, SEEN, HELD_OUT, UNRECORDED)


def is_name(value: Any) -> bool:
    """Whether ``value`` is a plain name (letters, digits and ``_.:+<@-``), safe to print."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def chance_floor(num_classes: int) -> float:
    """The least clean accuracy that is clearly above chance: a tenth of the way from chance
    (1/C) to 100%."""
    chance = 1.0 / max(1, num_classes)
    return chance + (1.0 - chance) / 10


def fit_architectures(method: Any) -> list[str] | None:
    """The networks a protection's fit used, from its ``protection.json`` method record:
    a list of names, ``[]`` for a method fitted against none (and for a non-protecting
    control, whatever it records), ``None`` when not recorded (or not a list of plain names:
    the record is read as data, never trusted further)."""
    if isinstance(method, dict) and method.get("protects") is False:
        return []
    names = method.get("fit_architectures") if isinstance(method, dict) else None
    if not isinstance(names, list) or len(names) > MAX_FIT_ARCHITECTURES:
        return None
    if not all(is_name(n) for n in names):
        return None
    return list(dict.fromkeys(names))


def role(arch: str, fit: list[str] | None, *, owner: bool = False, other_key: bool = False) -> str:
    """The role of a row whose network has architecture ``arch`` (see the module docstring);
    ``other_key``: the network is behind a key other than the owner's."""
    if owner:
        return OWNER
    if other_key:
        return HELD_OUT
    if fit is None:
        return UNRECORDED
    return SEEN if arch in fit else HELD_OUT


def mark_classifier_rows(summary: list[dict[str, Any]], roles: dict[str, str], num_classes: int) -> None:
    """Add ``role`` and ``learned`` to every summary row (in place): a row learned when its
    clean final accuracy is at least :data:`LEARNED_FRACTION` of its defense's best clean row
    and at least :func:`chance_floor`."""
    best: dict[str, float] = {}
    for row in summary:
        acc = row["clean"]["final_test_acc"]["mean"]
        best[row["defense"]] = max(best.get(row["defense"], 0.0), acc)
    floor = chance_floor(num_classes)
    for row in summary:
        clean = row["clean"]["final_test_acc"]["mean"]
        row["role"] = roles.get(row["arch"], UNRECORDED)
        row["learned"] = clean >= LEARNED_FRACTION * best[row["defense"]] and clean >= floor


def _judging(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The rows a headline is taken over, and what they are: the held-out rows that learned;
    without a record of the fit, every non-owner row that learned (said so in ``basis``)."""
    hackers = [r for r in rows if r["role"] != OWNER]
    learned = [r for r in hackers if r["learned"]]
    held = [r for r in learned if r["role"] == HELD_OUT]
    if held:
        return held, "held-out architectures"
    if any(r["role"] == UNRECORDED for r in learned):
        return [r for r in learned if r["role"] == UNRECORDED], "all architectures (the fit's networks are not recorded)"
    if not hackers:
        return [], "no hacker architecture was evaluated (add --arch)"
    if any(r["role"] in (HELD_OUT, UNRECORDED) for r in hackers):
        return [], "no held-out architecture learned clean data"
    return [], "every evaluated architecture was seen in the fit (add a held-out --arch)"


def classifier_headline(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst case over held-out classifier rows that learned (rows marked by
    :func:`mark_classifier_rows`); ``worst`` is None when there is none."""
    rows, basis = _judging(summary)
    out: dict[str, Any] = {
        "basis": basis,
        "held_out": sorted({r["arch"] for r in summary if r["role"] == HELD_OUT}),
        "seen_in_fit": sorted({r["arch"] for r in summary if r["role"] == SEEN}),
        "owner": sorted({r["arch"] for r in summary if r["role"] == OWNER}),
        "did_not_learn": sorted({f"{r['arch']} ({r['defense']})" for r in summary if not r["learned"]}),
        "worst": None,
    }
    if rows:
        w = max(rows, key=lambda r: (r["protected"]["final_test_acc"]["mean"], r["clean"]["final_test_acc"]["mean"]))
        clean, prot = w["clean"]["final_test_acc"]["mean"], w["protected"]["final_test_acc"]["mean"]
        out["worst"] = {"arch": w["arch"], "defense": w["defense"], "protected_acc": prot, "clean_acc": clean,
                        "ratio": prot / clean if clean > 0 else None}
    owners = [r for r in summary if r["role"] == OWNER]
    if owners:
        o = min(owners, key=lambda r: r["protected"]["final_test_acc"]["mean"])
        out["owner_worst"] = {"arch": o["arch"], "defense": o["defense"],
                              "protected_acc": o["protected"]["final_test_acc"]["mean"],
                              "clean_acc": o["clean"]["final_test_acc"]["mean"]}
    return out


def clip_recall(result: dict[str, Any]) -> float:
    """A CLIP run's Recall@10 on the clean test pairs: the better of its two directions."""
    return max(float(result["i2t"]["R@10"]), float(result["t2i"]["R@10"]))


def covers_every_row(fit: list[str] | None, archs: Iterable[str]) -> bool:
    """Whether a fit record names every one of the evaluated (non-owner) architectures, so
    that no row can judge the protection: worth a warning, since the record is data that
    anyone holding the directory may have edited."""
    archs = list(archs)
    return bool(fit) and bool(archs) and all(a in fit for a in archs)


def clip_headline(runs: list[dict[str, Any]], arch: str, fit: list[str] | None) -> dict[str, Any]:
    """Mark every CLIP run with ``role`` and ``learned`` (in place) and return the worst
    case over held-out runs that learned: the highest protected Recall@10 (either direction)."""
    row_role = role(arch, fit)
    for run in runs:
        chance = float(run.get("settings", {}).get("chance_R@10") or 0.0)
        run["role"] = row_role
        run["learned"] = clip_recall(run["clean"]) >= min(1.0, CLIP_LEARNED_OVER_CHANCE * chance)
    rows = [{"learned": r["learned"], "role": r["role"], "run": r} for r in runs]
    judged, basis = _judging(rows)
    out: dict[str, Any] = {"basis": basis, "arch": arch, "role": row_role, "worst": None,
                           "did_not_learn": sorted({r["defense"] for r in runs if not r["learned"]})}
    if judged:
        w = max((j["run"] for j in judged), key=lambda r: clip_recall(r["protected"]))
        out["worst"] = {"defense": w["defense"], "seed": w["seed"], "protected_R@10": clip_recall(w["protected"]),
                        "clean_R@10": clip_recall(w["clean"]),
                        "chance_R@10": w.get("settings", {}).get("chance_R@10")}
    return out


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"not a fraction: {str(value)[:40]!r}")
    return float(value)


def _checked(block: Any, names: tuple[str, ...], fractions: tuple[str, ...]) -> None:
    """Refuse (ValueError) a headline block whose names are not plain or whose numbers are not
    fractions: a report may come from elsewhere (``push --report``)."""
    if not isinstance(block, dict):
        raise ValueError("not an object")
    for key in names:
        if key in block and not is_name(block[key]):
            raise ValueError(f"{key} is not a plain name")
    for key in fractions:
        if key in block:
            _fraction(block[key])


def headline_text(report: dict[str, Any]) -> str:
    """The report's first line: the worst held-out case (classifier, then CLIP) next to clean.
    A malformed headline (from a report written elsewhere) raises :class:`ValueError`."""
    parts = []
    head = report.get("headline") or {}
    if not isinstance(head, dict):
        raise ValueError("headline is not an object")
    for block, names, fractions in (("classify", ("arch", "defense"), ("protected_acc", "clean_acc")),
                                    ("clip", ("arch", "defense"), ("protected_R@10", "clean_R@10"))):
        if head.get(block) is not None:
            _checked(head[block], (), ())
            if not isinstance(head[block].get("basis"), str) or not _BASIS.fullmatch(head[block]["basis"]):
                raise ValueError("basis is not a short plain text")
            for sub_block in ("worst", "owner_worst"):
                if head[block].get(sub_block) is not None:
                    _checked(head[block][sub_block], names, fractions)
    if head.get("clip") is not None and head["clip"].get("role") not in ROLES:
        raise ValueError("the CLIP role is not one of the protocol's")
    cls = head.get("classify")
    if cls is not None:
        parts.append(_block_text(cls, "classifiers", _classify_worst_text))
        if cls.get("owner_worst"):
            o = cls["owner_worst"]
            parts.append(f"owner {o['arch']} {100 * o['protected_acc']:.1f}% (clean {100 * o['clean_acc']:.1f}%)")
    if head.get("clip") is not None:
        parts.append(_block_text(head["clip"], "CLIP", _clip_worst_text))
    return "; ".join(parts) if parts else "no results"


def _block_text(block: dict[str, Any], label: str, worst_text: Callable[[dict[str, Any], dict[str, Any]], str]
                ) -> str:
    """A headline block's text: ``worst_text(block, worst case)``, or ``label: basis`` without a worst case."""
    w = block["worst"]
    return f"{label}: {block['basis']}" if w is None else worst_text(block, w)


def _classify_worst_text(block: dict[str, Any], w: dict[str, Any]) -> str:
    return (f"worst case over {block['basis']}: {w['arch']} reached {100 * w['protected_acc']:.1f}% "
            f"trained on protected data ({w['defense']}), {100 * w['clean_acc']:.1f}% trained on clean")


def _clip_worst_text(block: dict[str, Any], w: dict[str, Any]) -> str:
    return (f"CLIP ({block['role']}): Recall@10 {100 * w['protected_R@10']:.1f}% trained on protected "
            f"data ({w['defense']}), {100 * w['clean_R@10']:.1f}% on clean")
