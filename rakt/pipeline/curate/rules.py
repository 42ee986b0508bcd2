"""Curation rules: every filter `rakt curate` applies, named and registered once, applied in registry order.

A rule is a function `rule(frame, ctx) -> RuleResult` registered with `@register(name, phase=..., count=...)`:

- phase "candidates": `frame` is the candidate rows (query_id, query_label, rank, pool_id, score) before
  selection; the rule returns the rows it keeps.
- phase "selected": `frame` is the selected images (one row per pool image: pool_id, score, query_id,
  query_label, rank, query_ids, id); what the rule drops is taken out and the selection is redone without it
  (refilling from deeper ranks), for a few rounds (curate.NEAR_DUP_ROUNDS).

`RuleResult.removed` holds the rows for removed.parquet (`removed_rows` builds them; an empty frame when the
rule's drops are not audited there), and `count` goes to manifest.json `counts[<count>]` (default: the removed
rows; summed over rounds for "selected" rules). `when(cfg)` says whether the rule runs at all.

Adding a rule = one function + its `@register(...)` in this file + a test (and a CurateConfig field if it has
a setting).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from rakt.pipeline.config import CurateConfig
from rakt.pipeline.curate.similarity import EvalSet, empty_removed, leakage_matches, near_duplicates
from rakt.registry import Registry

log = logging.getLogger("rakt.curate")

PHASES = ("candidates", "selected")


@dataclass
class CurateContext:
    """What a rule may look at besides its frame."""

    cfg: CurateConfig
    index: Any  # indexes.base.Index: metadata(ids), embeddings(ids), model, dim
    eval_set: EvalSet
    removed_path: Path  # where removed.parquet goes (for messages)
    scores: pd.DataFrame | None = None  # teacher scores by pool_id (pred, prob): pipeline.formats.read_scores
    classes: list[str] | None = None  # the teacher's class names (removed.parquet names the predicted class)
    groups: pd.Series | None = None  # query_id -> class key when a class's slots are shared (curate.class_groups)
    memo: dict = field(default_factory=dict)  # what a rule keeps from one rank window to the next


@dataclass
class RuleResult:
    """The rows a rule keeps, the removed.parquet rows it adds, and its manifest count (None: len(removed))."""

    kept: pd.DataFrame
    removed: pd.DataFrame
    count: int | None = None


@dataclass(frozen=True)
class Rule:
    """A registered rule: `fn(frame, ctx)`, its phase, its manifest count key, its name in log lines."""

    name: str
    fn: Callable[[pd.DataFrame, CurateContext], RuleResult]
    phase: str
    count: str
    label: str
    when: Callable[[CurateConfig], bool]


RULES: Registry[Rule] = Registry("curation rule")


def register(name: str, *, phase: str, count: str, label: str = "",
             when: Callable[[CurateConfig], bool] | None = None) -> Callable:
    """Decorator: add `fn` to RULES under `name` (applied after the rules registered before it)."""
    if phase not in PHASES:
        raise ValueError(f"curation rule {name!r}: phase must be one of {', '.join(PHASES)}, got {phase!r}")

    return RULES.register(name, lambda fn: Rule(name, fn, phase, count, label or name, when or (lambda cfg: True)))


def registered(phase: str) -> list[Rule]:
    """The rules of `phase`, in registry order."""
    return [r for r in RULES.values() if r.phase == phase]


def rules(phase: str, cfg: CurateConfig) -> list[Rule]:
    """The rules of `phase` that run under `cfg` (their `when`), in registry order."""
    return [r for r in registered(phase) if r.when(cfg)]


def removed_rows(pool_ids, reason: str, matched_id=None, matched_pool_id=None, cosine=None) -> pd.DataFrame:
    """removed.parquet rows (before curate adds the pool image's `id`) for `pool_ids` dropped for `reason`."""
    n = len(pool_ids)
    if n == 0:
        return empty_removed()
    column = lambda v: [None] * n if v is None else list(v)  # noqa: E731
    return pd.DataFrame({"pool_id": np.asarray(pool_ids, np.int64), "reason": reason,
                         "matched_id": column(matched_id),
                         "matched_pool_id": pd.array(column(matched_pool_id), "Int64"),
                         "cosine": np.asarray([np.nan] * n if cosine is None else cosine, np.float32)})


def without(frame: pd.DataFrame, removed: pd.DataFrame) -> pd.DataFrame:
    """`frame` without the pool images in `removed`."""
    return frame[~frame["pool_id"].isin(removed["pool_id"])]


@register("min_score", phase="candidates", count="below_min_score")
def min_score(cands: pd.DataFrame, ctx: CurateContext) -> RuleResult:
    """Candidate rows scoring below --min-score (counted, not listed in removed.parquet)."""
    low = cands["score"] < ctx.cfg.min_score
    return RuleResult(cands[~low], empty_removed(), int(low.sum()))


@register("leakage", phase="candidates", count="leakage_removed")
def leakage(cands: pd.DataFrame, ctx: CurateContext) -> RuleResult:
    """Pool images whose cosine to a target eval image exceeds --leakage-threshold (the leakage guard). Each pool
    image is checked once, in the first rank window that holds it (memo: the images checked and found)."""
    ev, threshold = ctx.eval_set, ctx.cfg.leakage_threshold
    memo = ctx.memo.setdefault("leakage", {"checked": np.zeros(0, np.int64), "leaked": np.zeros(0, np.int64)})
    if not ev.enabled and not memo.get("warned"):
        log.warning("leakage guard is OFF: %s", ev.reason)
        memo["warned"] = True
    pool_ids = np.unique(cands["pool_id"].to_numpy(np.int64))
    new = pool_ids[~np.isin(pool_ids, memo["checked"], assume_unique=True)]
    leaked = leakage_matches(ctx.index, new, ev, threshold)
    memo["checked"] = np.union1d(memo["checked"], new)
    memo["leaked"] = np.union1d(memo["leaked"], leaked["pool_id"].to_numpy(np.int64))
    return RuleResult(cands[~cands["pool_id"].isin(memo["leaked"])], leaked)


def leakage_report(ctx: CurateContext) -> None:
    """After every window: say so when the guard removed most candidate images (a threshold too low?)."""
    memo = ctx.memo.get("leakage")
    if memo is not None and len(memo["checked"]) and len(memo["leaked"]) > len(memo["checked"]) // 2:
        log.warning("the leakage guard removed %d of %d candidate pool images (cosine > %g to an eval image): "
                    "a threshold too low for this embedding model? see %s", len(memo["leaked"]),
                    len(memo["checked"]), ctx.cfg.leakage_threshold, ctx.removed_path)


@register("near_dup", phase="selected", count="near_dup_removed", label="near-dup",
          when=lambda cfg: cfg.near_dup > 0)
def near_dup(images: pd.DataFrame, ctx: CurateContext) -> RuleResult:
    """Selected images whose cosine to a better-scored kept image exceeds --near-dup."""
    dropped = near_duplicates(ctx.index, images, ctx.cfg.near_dup)
    return RuleResult(without(images, dropped), dropped)


def teacher_rows(cands: pd.DataFrame, ctx: CurateContext) -> pd.DataFrame:
    """The teacher's pred and prob of each candidate row (NaN where the pool image was not scored)."""
    return ctx.scores.reindex(cands["pool_id"].to_numpy())


def _teacher_removed(pool_ids, got: pd.DataFrame, reason: str, ctx: CurateContext) -> pd.DataFrame:
    """removed.parquet rows for teacher rules: matched_id = the predicted class's name, cosine = its probability."""
    names = ctx.classes or []
    preds = got["pred"].to_numpy()
    label = [names[int(p)] if 0 <= int(p) < len(names) else str(int(p)) for p in preds]
    return removed_rows(pool_ids, reason, matched_id=label, cosine=got["prob"].to_numpy(np.float32))


def _gone(before: pd.DataFrame, after: pd.DataFrame) -> np.ndarray:
    """Pool images in no row of `after` that were in `before` (a row-level rule removes an image only then)."""
    ids = np.unique(before["pool_id"].to_numpy())
    return ids[~np.isin(ids, after["pool_id"].to_numpy())]


@register("teacher_unscored", phase="candidates", count="teacher_unscored",
          when=lambda cfg: bool(cfg.teacher_scores))
def teacher_unscored(cands: pd.DataFrame, ctx: CurateContext) -> RuleResult:
    """Candidates the teacher did not score (beyond `rakt score --max-rank`, or unreadable images): dropped."""
    scored = cands["pool_id"].isin(ctx.scores.index)
    gone = _gone(cands, cands[scored])
    return RuleResult(cands[scored], removed_rows(gone, "teacher_unscored"))


@register("teacher_ood", phase="candidates", count="teacher_ood_removed", label="teacher out-of-domain",
          when=lambda cfg: bool(cfg.teacher_scores) and cfg.teacher_min_prob > 0)
def teacher_ood(cands: pd.DataFrame, ctx: CurateContext) -> RuleResult:
    """Pool images whose top teacher probability is below --teacher-min-prob: unlike every target class."""
    got = teacher_rows(cands, ctx)
    low = (got["prob"] < ctx.cfg.teacher_min_prob).to_numpy()
    gone = _gone(cands, cands[~low])
    return RuleResult(cands[~low], _teacher_removed(gone, ctx.scores.reindex(gone), "teacher_ood", ctx))


@register("teacher_agree", phase="candidates", count="teacher_disagree_deferred", label="teacher disagrees",
          when=lambda cfg: bool(cfg.teacher_scores) and cfg.teacher_agree)
def teacher_agree(cands: pd.DataFrame, ctx: CurateContext) -> RuleResult:
    """Candidate rows whose query class the teacher does not predict are deferred (column `deferred`): selection
    proposes them only after every other row, so they fill just the slots the teacher's class cannot. Counts the
    deferred rows; nothing is removed."""
    got = teacher_rows(cands, ctx)
    labels = cands["query_label"]
    agree = (labels.isna() | (labels.astype("float64").to_numpy() == got["pred"].to_numpy())).to_numpy()
    return RuleResult(cands.assign(deferred=~agree), empty_removed(), int((~agree).sum()))
