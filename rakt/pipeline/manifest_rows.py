"""Selected candidate rows -> the transfer manifest's rows: one row per pool image (`summarize`) with its index
metadata (`attach_metadata`). Shared by `rakt curate` and `rakt score` (which scores every candidate image), so that
neither stage imports the other."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from rakt.pipeline.formats import LOCATOR_COLUMNS
from rakt.pipeline.io import InputError


def summarize(hits: pd.DataFrame, dedup: bool) -> pd.DataFrame:
    """One row per selected image (dedup) or per hit: best score, its query/label/rank, and all query ids."""
    if len(hits):  # a (query, pool image) pair met again at a deeper rank (another window) counts once
        hits = hits.sort_values("rank", kind="mergesort").drop_duplicates(["query_id", "pool_id"])
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


def attach_metadata(images: pd.DataFrame, index) -> pa.Table:
    """The manifest table: pool_id, id, locator columns from the index metadata, score, query fields."""
    ids = images["pool_id"].to_numpy(np.int64)
    meta = index.metadata(ids)
    if "id" not in meta.column_names:
        raise InputError(f"index {index.info().get('path', '')}: metadata has no 'id' column; rebuild the index")
    cols = {"pool_id": pa.array(ids, pa.int64()), "id": meta["id"].cast(pa.string())}
    for name in LOCATOR_COLUMNS:
        if name in meta.column_names:
            cols[name] = meta[name]
    cols["score"] = pa.array(images["score"].to_numpy(np.float32), pa.float32())
    cols["query_id"] = pa.array(images["query_id"].tolist(), pa.string())
    cols["query_label"] = pa.array(images["query_label"].astype(object).where(images["query_label"].notna(), None)
                                   .tolist(), pa.int64())
    cols["rank"] = pa.array(images["rank"].to_numpy(np.int32), pa.int32())
    cols["query_ids"] = pa.array(images["query_ids"].tolist(), pa.list_(pa.string()))
    return pa.table(cols)
