"""Selection under per-query quotas: greedy rank by rank, a class's unfilled slots shared among its queries, the
"selected" rules' drop-and-refill rounds, and one row per selected image."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.config import CurateConfig
from pipeline.curate.rules import CurateContext, rules

log = logging.getLogger("rakt.curate")

NEAR_DUP_ROUNDS = 4
UNLABELLED = "unlabelled"


def select(cands: pd.DataFrame, quotas: pd.Series, dedup: bool, groups: pd.Series | None = None) -> pd.DataFrame:
    """Greedy rank-by-rank selection; returns the hits with `took` (True: took a slot, False: merged dup).

    With `groups` (query_id -> class, balance="class" with dedup) the slots a query cannot fill (its neighbours
    were taken by other queries) go to the other queries of its class, again rank by rank. Rows marked `deferred`
    (curation rules such as teacher_agree) come only after all others: they fill what the others could not."""
    order = ["rank", "score", "query_id", "pool_id"]
    cands = cands.sort_values(order, ascending=[True, False, True, True], kind="mergesort")
    deferred = cands["deferred"].to_numpy(bool) if "deferred" in cands else np.zeros(len(cands), bool)
    if not dedup:
        cands = pd.concat([cands[~deferred], cands[deferred]])
        nth = cands.groupby("query_id", sort=False).cumcount().to_numpy()
        hits = cands[nth < quotas.reindex(cands["query_id"]).to_numpy()].copy()
        hits["took"] = True
        return hits.reset_index(drop=True)
    state = Selection(quotas, groups)
    state.by_query(cands[~deferred])
    if groups is not None:
        state.by_class(cands[~deferred])
        state.by_class(cands[deferred])  # per class: queries' own slots may have gone to their classmates
    else:
        state.by_query(cands[deferred])
    if not state.parts:
        return cands.iloc[:0].assign(took=np.zeros(0, bool))
    return pd.concat(state.parts, ignore_index=True)


class Selection:
    """What is taken so far: per-query counts, the chosen pool images, per-class room, the hit rows."""

    def __init__(self, quotas: pd.Series, groups: pd.Series | None) -> None:
        self.quotas, self.groups = quotas, groups
        self.pos = pd.Series(np.arange(len(quotas)), index=quotas.index)
        self.quota = quotas.to_numpy()
        self.taken = np.zeros(len(self.quota), np.int64)
        self.chosen = np.zeros(0, np.int64)
        self.parts: list[pd.DataFrame] = []
        self.room: dict | None = None  # per class, set by the first by_class

    def by_query(self, cands: pd.DataFrame) -> None:
        """Rank by rank, every query with quota left proposes its next candidate (score order within a rank)."""
        for _, props in cands.groupby("rank", sort=True):
            if "deferred" in props:  # a deferred row of a chosen image is no hit of its query: not merged
                props = props[~(props["deferred"].to_numpy(bool) & np.isin(props["pool_id"].to_numpy(), self.chosen))]
            qpos = self.pos.reindex(props["query_id"]).to_numpy()
            active = self.taken[qpos] < self.quota[qpos]
            if not active.any():
                if (self.taken >= self.quota).all():
                    break
                continue
            props, qpos = props[active], qpos[active]
            pool = props["pool_id"].to_numpy()
            took = ~np.isin(pool, self.chosen) & ~pd.Series(pool).duplicated(keep="first").to_numpy()
            np.add.at(self.taken, qpos[took], 1)
            self.chosen = np.concatenate([self.chosen, pool[took]])
            self.parts.append(props.assign(took=took))

    def by_class(self, cands: pd.DataFrame) -> None:
        """The empty slots of each class filled from its queries' candidates not chosen yet, rank by rank."""
        if self.room is None:
            group_of = self.groups.reindex(self.quotas.index).to_numpy()
            left = pd.Series(self.quota - self.taken, index=group_of).groupby(level=0).sum()
            self.room = {g: int(n) for g, n in left.items() if n > 0}
        if not any(v > 0 for v in self.room.values()):
            return
        rest = cands[~cands["pool_id"].isin(self.chosen)]
        rest = rest.assign(group=self.groups.reindex(rest["query_id"]).to_numpy())
        rest = rest[rest["group"].map(self.room).fillna(0).to_numpy() > 0]
        for _, props in rest.groupby("rank", sort=True):
            props = props[props["group"].map(self.room).to_numpy() > 0]
            props = props[~props["pool_id"].isin(self.chosen) & ~props["pool_id"].duplicated(keep="first")]
            if props.empty:
                if not any(v > 0 for v in self.room.values()):
                    break
                continue
            nth = props.groupby("group", sort=False).cumcount().to_numpy()
            props = props[nth < props["group"].map(self.room).to_numpy()]
            for group, n in props["group"].value_counts().items():
                self.room[group] -= int(n)
            self.chosen = np.concatenate([self.chosen, props["pool_id"].to_numpy()])
            self.parts.append(props.drop(columns="group").assign(took=True))


def class_groups(queries: pd.DataFrame, cfg: CurateConfig) -> pd.Series | None:
    """query_id -> class key for balance="class" with dedup (select shares a class's slots), else None."""
    if cfg.balance != "class" or not cfg.dedup:
        return None
    labels = queries["query_label"].astype(object).where(queries["query_label"].notna(), UNLABELLED)
    return pd.Series(labels.map(str).to_numpy(), index=queries["query_id"].to_numpy())


def select_filtered(cands: pd.DataFrame, quotas: pd.Series, ctx: CurateContext) -> tuple[pd.DataFrame, dict]:
    """Select, drop what the "selected" rules reject, reselect without it (refilling from deeper ranks), a few
    rounds; returns the hits and, per rule name, its removed.parquet frames (one per round that dropped)."""
    cfg, index = ctx.cfg, ctx.index
    active = rules("selected", cfg)
    dropped: dict[str, list] = {rule.name: [] for rule in active}
    hits = select(cands, quotas, cfg.dedup, ctx.groups)
    if not active:
        return hits, dropped
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
            cands = cands[~cands["pool_id"].isin(gone)]
            hits = select(cands, quotas, cfg.dedup, ctx.groups)
    return hits, dropped


def summarize(hits: pd.DataFrame, dedup: bool) -> pd.DataFrame:
    """One row per selected image (dedup) or per hit: best score, its query/label/rank, and all query ids."""
    hits = hits.sort_values(["score", "query_id", "rank", "pool_id"], ascending=[False, True, True, True],
                            kind="mergesort")
    if dedup:
        ids = hits.groupby("pool_id", sort=False)["query_id"].agg(list)
        best = hits.drop_duplicates("pool_id", keep="first").copy()
        best["query_ids"] = ids.reindex(best["pool_id"]).to_numpy()
    else:
        best = hits[hits["took"]].copy()
        best["query_ids"] = [[q] for q in best["query_id"]]
    best = best.sort_values(["pool_id", "query_id"], kind="mergesort").reset_index(drop=True)
    return best[["pool_id", "score", "query_id", "query_label", "rank", "query_ids"]]
