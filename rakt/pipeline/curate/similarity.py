"""Curation filters over pool vectors: the leakage guard (pool vs target eval images) and near-duplicate removal."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from rakt.pipeline.formats import embedding_matrix, read_embedding_set
from rakt.pipeline.io import InputError, l2_normalize

log = logging.getLogger("rakt.curate")

BATCH = 65536
EXACT_NEAR_DUP = 50_000  # selected images up to which near duplicates are found by an exact range search
NEAR_DUP_NPROBE = 4
REMOVED_COLUMNS = ["pool_id", "reason", "matched_id", "matched_pool_id", "cosine"]


@dataclass
class EvalSet:
    """The target eval images the leakage guard protects (empty = guard off, with the reason)."""

    ids: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    source: str = ""
    split: str | None = None
    model: str = ""
    reason: str = ""

    @property
    def enabled(self) -> bool:
        return len(self.ids) > 0

    def info(self) -> dict:
        return {"enabled": self.enabled, "source": self.source, "split": self.split, "count": len(self.ids),
                "model": self.model, "reason": self.reason}


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous, as faiss wants."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return np.ascontiguousarray(l2_normalize(vectors, axis=1), dtype=np.float32)


def pool_vectors(index, pool_ids: np.ndarray) -> np.ndarray:
    """Normalized stored vectors of `pool_ids` from the index, fetched in batches."""
    if len(pool_ids) == 0:
        return np.zeros((0, index.dim), np.float32)
    prefetch(index, pool_ids)
    chunks = [index.embeddings(np.asarray(pool_ids[i:i + BATCH], np.int64)) for i in range(0, len(pool_ids), BATCH)]
    return normalize(np.concatenate(chunks))


def prefetch(index, pool_ids: np.ndarray) -> None:
    """Tell an index that supports it (FaissIndex.prefetch) which stored vectors come next, in batches."""
    if hasattr(index, "prefetch") and len(pool_ids):
        index.prefetch(np.asarray(pool_ids, np.int64))


def load_eval_set(eval_embeddings: str, eval_split: str, query_embeddings: str | None,
                  index_model: str, index_dim: int, model_of) -> EvalSet:
    """The eval images: all rows of `eval_embeddings`, else rows of `eval_split` in the query embedding set.

    `model_of(meta)` names the model of an embedding set as the index records it; another model is refused
    (cosines across two embedding spaces mean nothing)."""
    if eval_embeddings:
        path, split = Path(eval_embeddings), None
    elif query_embeddings and Path(query_embeddings).exists():
        path, split = Path(query_embeddings), eval_split
    else:
        why = ("no --eval-embeddings given and the query embedding set recorded in candidates.json "
               f"({query_embeddings or 'none'}) is not available")
        return EvalSet(reason=why)
    meta, table = read_embedding_set(path, split=split, columns=["id", "split", "embedding"])
    model = model_of(meta)
    if len(table) == 0:
        where = f"rows with split == '{split}' in {path}" if split else f"rows in {path}"
        return EvalSet(source=str(path), split=split, model=model,
                       reason=f"no {where}; pass --eval-embeddings or --eval-split to enable it")
    if model != index_model:
        raise InputError(f"{path}: eval embeddings come from model '{model}' but the index holds '{index_model}' "
                         "vectors; the leakage guard needs both in one space: embed the eval images with the "
                         "index's model (`rakt embed ... --model ...`)")
    vectors = embedding_matrix(table)
    if vectors.shape[1] != index_dim:
        raise InputError(f"{path}: eval embeddings have dim {vectors.shape[1]}, the index has dim {index_dim}")
    return EvalSet(ids=table["id"].to_pylist(), vectors=normalize(vectors), source=str(path), split=split,
                   model=model)


def leakage_matches(index, pool_ids: np.ndarray, ev: EvalSet, threshold: float) -> pd.DataFrame:
    """Pool images whose max cosine to any eval image exceeds `threshold` (removed.parquet rows)."""
    if not ev.enabled or len(pool_ids) == 0:
        return empty_removed()
    flat = faiss.IndexFlatIP(ev.vectors.shape[1])
    flat.add(ev.vectors)
    prefetch(index, pool_ids)
    found = []
    for i in range(0, len(pool_ids), BATCH):
        ids = np.asarray(pool_ids[i:i + BATCH], np.int64)
        sims, nn = flat.search(pool_vectors(index, ids), 1)
        hit = sims[:, 0] > threshold
        if hit.any():
            found.append(pd.DataFrame({"pool_id": ids[hit], "reason": "leakage",
                                       "matched_id": [ev.ids[j] for j in nn[hit, 0]],
                                       "matched_pool_id": pd.array([None] * int(hit.sum()), "Int64"),
                                       "cosine": sims[hit, 0].astype(np.float32)}))
    if not found:
        return empty_removed()
    return pd.concat(found, ignore_index=True).astype(_removed_dtypes())


def near_duplicates(index, images: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Images (pool_id, score, id) whose cosine to a better-scored kept image exceeds `threshold`.

    Greedy in order of score (desc, then pool_id): an image is kept unless a kept image before it is a near
    duplicate; the match reported is the closest such kept image. Pairs are found by a range search, exact up to
    EXACT_NEAR_DUP images, else in an IVF index over them (range_index)."""
    order = images.sort_values(["score", "pool_id"], ascending=[False, True], kind="mergesort")
    ids = order["pool_id"].to_numpy(np.int64)
    names = order["id"].to_numpy(object) if "id" in order else ids.astype(str)
    if len(ids) < 2:
        return empty_removed()
    vecs = pool_vectors(index, ids)
    lims, sims, nbrs = range_index(vecs).range_search(vecs, float(threshold))
    lims = lims.astype(np.int64)
    kept = np.zeros(len(ids), bool)
    rows = []
    for i in range(len(ids)):
        nb, sm = nbrs[lims[i]:lims[i + 1]], sims[lims[i]:lims[i + 1]]
        mask = nb < i
        mask[mask] = kept[nb[mask]]
        if mask.any():
            j = int(np.argmax(np.where(mask, sm, -np.inf)))
            rows.append((ids[i], "near_dup", str(names[nb[j]]), int(ids[nb[j]]), float(sm[j])))
        else:
            kept[i] = True
    frame = pd.DataFrame(rows, columns=REMOVED_COLUMNS)
    return frame.astype(_removed_dtypes())


def range_index(vecs: np.ndarray) -> faiss.Index:
    """An index over unit vectors to range-search them against themselves: exact (flat) up to EXACT_NEAR_DUP, else
    an IVF of ~100 images a list visiting NEAR_DUP_NPROBE lists (a flat scan of the n^2 pairs of 200,000 images
    ran over 10 minutes on 2 cores; this ~40 s). Near duplicates (cosine > ~0.95) are so close that they share a
    list or sit in lists next to each other: of 1,977 planted pairs at cosine ~0.99 among 200,000 clustered
    512-d vectors it found every one."""
    n, d = vecs.shape
    if n <= EXACT_NEAR_DUP:
        flat = faiss.IndexFlatIP(d)
        flat.add(vecs)
        return flat
    nlist = 1 << round(np.log2(n / 100))  # ~100 images a list: each image is compared with ~nprobe x 100
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 16  # cells to compare within, not a quantizer to encode with: 20 a list do
    ivf.train(vecs[::max(1, n // (20 * nlist))])
    ivf.add(vecs)
    ivf.nprobe = NEAR_DUP_NPROBE
    return ivf


def empty_removed() -> pd.DataFrame:
    """A removed.parquet frame with no rows."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _removed_dtypes().items()})


def _removed_dtypes() -> dict:
    return {"pool_id": "int64", "reason": "object", "matched_id": "object", "matched_pool_id": "Int64",
            "cosine": "float32"}
