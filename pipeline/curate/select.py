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
    were taken by other queries) go to the other queries of its class, again rank by rank."""
    order = ["rank", "score", "query_id", "pool_id"]
    cands = cands.sort_values(order, ascending=[True, False, True, True], kind="mergesort")
    if not dedup:
        nth = cands.groupby("query_id", sort=False).cumcount().to_numpy()
        hits = cands[nth < quotas.reindex(cands["query_id"]).to_numpy()].copy()
        hits["took"] = True
        return hits.reset_index(drop=True)
    pos = pd.Series(np.arange(len(quotas)), index=quotas.index)
    quota = quotas.to_numpy()
    taken = np.zeros(len(quota), np.int64)
    chosen = np.zeros(0, np.int64)
    parts = []
    for _, props in cands.groupby("rank", sort=True):
        qpos = pos.reindex(props["query_id"]).to_numpy()
        active = taken[qpos] < quota[qpos]
        if not active.any():
            if (taken >= quota).all():
                break
            continue
        props, qpos = props[active], qpos[active]
        pool = props["pool_id"].to_numpy()
        seen = np.isin(pool, chosen)
        took = ~seen & ~pd.Series(pool).duplicated(keep="first").to_numpy()
        np.add.at(taken, qpos[took], 1)
        chosen = np.concatenate([chosen, pool[took]])
        parts.append(props.assign(took=took))
    if groups is not None:
        parts += share_class_slots(cands, quotas, taken, chosen, groups)
    if not parts:
        return cands.iloc[:0].assign(took=np.zeros(0, bool))
    return pd.concat(parts, ignore_index=True)


def share_class_slots(cands: pd.DataFrame, quotas: pd.Series, taken: np.ndarray, chosen: np.ndarray,
                      groups: pd.Series) -> list[pd.DataFrame]:
    """The empty slots of each class filled from its queries' candidates not chosen yet, rank by rank."""
    group_of = groups.reindex(quotas.index).to_numpy()
    left = pd.Series(quotas.to_numpy() - taken, index=group_of).groupby(level=0).sum()
    left = left[left > 0]
    if left.empty:
        return []
    rest = cands[~cands["pool_id"].isin(chosen)]
    rest = rest.assign(group=groups.reindex(rest["query_id"]).to_numpy())
    rest = rest[rest["group"].isin(left.index)]
    parts, room = [], left.to_dict()
    for _, props in rest.groupby("rank", sort=True):
        props = props[props["group"].map(room).to_numpy() > 0]
        props = props[~props["pool_id"].isin(chosen) & ~props["pool_id"].duplicated(keep="first")]
        if props.empty:
            if not any(v > 0 for v in room.values()):
                break
            continue
        nth = props.groupby("group", sort=False).cumcount().to_numpy()
        props = props[nth < props["group"].map(room).to_numpy()]
        for group, n in props["group"].value_counts().items():
            room[group] -= int(n)
        chosen = np.concatenate([chosen, props["pool_id"].to_numpy()])
        parts.append(props.drop(columns="group").assign(took=True))
    return parts


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
