"""Selection under per-query quotas: greedy rank by rank, a class's unfilled slots shared among its queries, the
"selected" rules' drop-and-refill rounds, and one row per selected image.

The candidates come as a stream of rank windows (rakt/pipeline/curate/windows.py), read again for each pass: a window
is whole ranks in selection order, so a pass over windows takes the rows in the same order as over all candidates
at once, and stops reading as soon as every slot is taken."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from rakt.pipeline.config import CurateConfig
from rakt.pipeline.curate.rules import CurateContext, rules
from rakt.pipeline.manifest_rows import summarize

log = logging.getLogger("rakt.curate")

NEAR_DUP_ROUNDS = 4
UNLABELLED = "unlabelled"

Windows = Callable[[np.ndarray | None], Iterable[pd.DataFrame]]  # exclude pool ids -> candidate windows


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A window's rows the teacher agrees with (or all) and its deferred rows."""
    if "deferred" not in frame:
        return frame, frame.iloc[:0]
    deferred = frame["deferred"].to_numpy(bool)
    return frame[~deferred], frame[deferred]


def select(windows: Windows, quotas: pd.Series, dedup: bool, groups: pd.Series | None = None,
           exclude: np.ndarray | None = None) -> pd.DataFrame:
    """Greedy rank-by-rank selection; returns the hits with `took` (True: took a slot, False: merged dup).

    With `groups` (query_id -> class, balance="class" with dedup) the slots a query cannot fill (its neighbours
    were taken by other queries) go to the other queries of its class, again rank by rank. Rows marked `deferred`
    (curation rules such as teacher_agree) come only after all others: they fill what the others could not."""
    state = Selection(quotas, groups)
    if not dedup:
        passes = [(state.plain, 0), (state.plain, 1)]
    elif groups is not None:
        passes = [(state.by_query, 0), (state.by_class, 0), (state.by_class, 1)]
    else:
        passes = [(state.by_query, 0), (state.by_query, 1)]
    for step, part in passes:  # part 0: the rows the teacher agrees with (or all), 1: the deferred rows
        for frame in windows(exclude):
            if step(_split(frame)[part]):
                break
    if not state.parts:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in (("query_id", object), ("pool_id", "int64"),
                                                                ("rank", "int64"), ("score", "float32"),
                                                                ("query_label", "Int64"), ("took", bool))})
    return pd.concat(state.parts, ignore_index=True)


class Selection:
    """What is taken so far: per-query counts, the chosen pool images, per-class room, the hit rows."""

    def __init__(self, quotas: pd.Series, groups: pd.Series | None) -> None:
        self.quotas, self.groups = quotas, groups
        self.pos = pd.Series(np.arange(len(quotas)), index=quotas.index)
        self.quota = quotas.to_numpy()
        self.taken = np.zeros(len(self.quota), np.int64)
        self.chosen = np.zeros(0, np.int64)
        self.pairs = np.zeros(0, np.int64)  # without dedup: (query, pool image) pairs taken, as one key each
        self.parts: list[pd.DataFrame] = []
        self.room: dict | None = None  # per class, set by the first by_class

    def full(self) -> bool:
        return bool((self.taken >= self.quota).all())

    def plain(self, cands: pd.DataFrame) -> bool:
        """Without dedup: each query takes its next rows up to its quota (a pair it took already never twice);
        True once every query is full."""
        if self.full():
            return True
        qpos = self.pos.reindex(cands["query_id"]).to_numpy()
        keys = qpos.astype(np.int64) << 40 | cands["pool_id"].to_numpy(np.int64)
        fresh = ~np.isin(keys, self.pairs)
        cands, qpos, keys = cands[fresh], qpos[fresh], keys[fresh]
        nth = cands.groupby("query_id", sort=False).cumcount().to_numpy() + self.taken[qpos]
        take = nth < self.quota[qpos]
        np.add.at(self.taken, qpos[take], 1)
        self.pairs = np.union1d(self.pairs, keys[take])
        self.parts.append(cands[take].assign(took=True))
        return self.full()

    def by_query(self, cands: pd.DataFrame) -> bool:
        """Rank by rank, every query with quota left proposes its next candidate (score order within a rank);
        True once every query is full."""
        if self.full():
            return True
        for _, props in cands.groupby("rank", sort=True):
            if "deferred" in props:  # a deferred row of a chosen image is no hit of its query: not merged
                props = props[~(props["deferred"].to_numpy(bool) & np.isin(props["pool_id"].to_numpy(), self.chosen))]
            qpos = self.pos.reindex(props["query_id"]).to_numpy()
            active = self.taken[qpos] < self.quota[qpos]
            if not active.any():
                if self.full():
                    return True
                continue
            props, qpos = props[active], qpos[active]
            pool = props["pool_id"].to_numpy()
            took = ~np.isin(pool, self.chosen) & ~pd.Series(pool).duplicated(keep="first").to_numpy()
            np.add.at(self.taken, qpos[took], 1)
            self.chosen = np.concatenate([self.chosen, pool[took]])
            self.parts.append(props.assign(took=took))
        return self.full()

    def by_class(self, cands: pd.DataFrame) -> bool:
        """The empty slots of each class filled from its queries' candidates not chosen yet, rank by rank; True
        once no class has room."""
        if self.room is None:
            group_of = self.groups.reindex(self.quotas.index).to_numpy()
            left = pd.Series(self.quota - self.taken, index=group_of).groupby(level=0).sum()
            self.room = {g: int(n) for g, n in left.items() if n > 0}
        if not any(v > 0 for v in self.room.values()):
            return True
        rest = cands[~cands["pool_id"].isin(self.chosen)]
        rest = rest.assign(group=self.groups.reindex(rest["query_id"]).to_numpy())
        rest = rest[rest["group"].map(self.room).fillna(0).to_numpy() > 0]
        for _, props in rest.groupby("rank", sort=True):
            props = props[props["group"].map(self.room).to_numpy() > 0]
            props = props[~props["pool_id"].isin(self.chosen) & ~props["pool_id"].duplicated(keep="first")]
            if props.empty:
                if not any(v > 0 for v in self.room.values()):
                    return True
                continue
            nth = props.groupby("group", sort=False).cumcount().to_numpy()
            props = props[nth < props["group"].map(self.room).to_numpy()]
            for group, n in props["group"].value_counts().items():
                self.room[group] -= int(n)
            self.chosen = np.concatenate([self.chosen, props["pool_id"].to_numpy()])
            self.parts.append(props.drop(columns="group").assign(took=True))
        return not any(v > 0 for v in self.room.values())


def class_groups(queries: pd.DataFrame, cfg: CurateConfig) -> pd.Series | None:
    """query_id -> class key for balance="class" with dedup (select shares a class's slots), else None."""
    if cfg.balance != "class" or not cfg.dedup:
        return None
    labels = queries["query_label"].astype(object).where(queries["query_label"].notna(), UNLABELLED)
    return pd.Series(labels.map(str).to_numpy(), index=queries["query_id"].to_numpy())


def select_filtered(windows: Windows, quotas: pd.Series, ctx: CurateContext) -> tuple[pd.DataFrame, dict]:
    """Select, drop what the "selected" rules reject, reselect without it (refilling from deeper ranks), a few
    rounds; returns the hits and, per rule name, its removed.parquet frames (one per round that dropped)."""
    cfg, index = ctx.cfg, ctx.index
    active = rules("selected", cfg)
    dropped: dict[str, list] = {rule.name: [] for rule in active}
    hits = select(windows, quotas, cfg.dedup, ctx.groups)
    if not active:
        return hits, dropped
    excluded = np.zeros(0, np.int64)
    for rnd in range(NEAR_DUP_ROUNDS):
        images = summarize(hits, dedup=True)
        images["id"] = index.metadata(images["pool_id"].to_numpy(np.int64))["id"].to_pylist() if len(images) else []
        this_round = []
        for rule in active:
            res = rule.fn(images, ctx)
            if len(res.removed):
                log.info("%s round %d: %d of %d images dropped", rule.label, rnd + 1, len(res.removed), len(images))
                dropped[rule.name].append(res.removed)
                this_round.append((rule, res.removed))
            images = res.kept
        if not this_round:
            break
        gone = np.concatenate([frame["pool_id"].to_numpy(np.int64) for _, frame in this_round])
        hits = hits[~hits["pool_id"].isin(gone)]
        if rnd == NEAR_DUP_ROUNDS - 1:
            for rule, frame in this_round:
                log.warning("%s filter still dropped %d images in round %d (the last); their slots stay empty",
                            rule.label, len(frame), rnd + 1)
        else:
            excluded = np.union1d(excluded, gone)
            hits = select(windows, quotas, cfg.dedup, ctx.groups, exclude=excluded)
    return hits, dropped
