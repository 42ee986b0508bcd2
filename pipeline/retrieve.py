"""`rakt retrieve`: a target embedding set + an index -> the top-k pool neighbours of every query image.

With --query-mode text/both, class-name prompts encoded by the open_clip text tower are queries too
(pipeline/prompts.py): query_id `text:{class}` (or `text:{class}:{template}`), query_label the class index.

Writes `candidates.parquet` (query_id, query_label, rank, pool_id, score; one row per found neighbour) and
`candidates.json` (what was searched with what, and the hashes of both inputs' JSON descriptions).
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError, RetrieveConfig, config_hash
from pipeline.progress import Progress
from pipeline.formats import (CANDIDATES_JSON, CANDIDATES_PARQUET, CANDIDATES_SCHEMA, EMBEDDINGS_JSON, embedding_matrix,
                              read_embedding_set)
from pipeline.io import (InputError, check_index_model, json_hash, l2_normalize, read_json, timed, write_json,
                         write_parquet)
from pipeline.prompts import TextQueries, build_text_queries

log = logging.getLogger("rakt")

SCHEMA = CANDIDATES_SCHEMA


def check(cfg: RetrieveConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    if not cfg.embeddings and cfg.query_mode != "text":
        raise ConfigError("rakt retrieve: give the target embedding set directory (from `rakt embed`), or use "
                          "--query-mode text --classes FILE --model NAME for text queries alone")
    if not cfg.index:
        raise ConfigError("rakt retrieve: --index is required (e.g. faiss:/path/to/index or an index directory)")
    if cfg.k < 1 or cfg.batch_size < 1:
        raise ConfigError("rakt retrieve: --k and --batch-size must be >= 1")
    if cfg.fill_per_class < 0 or (cfg.fill_per_class and cfg.max_k < cfg.k):
        raise ConfigError(f"rakt retrieve: --fill-per-class must be >= 0 and --max-k >= --k (got "
                          f"{cfg.fill_per_class} and {cfg.max_k})")


def run(cfg: RetrieveConfig) -> dict:
    """Search the index with every query of the embedding set; write candidates.parquet + candidates.json."""
    from indexes.registry import absolute_spec, open_index

    start = time.perf_counter()
    check(cfg)
    emb_dir = Path(cfg.embeddings) if cfg.embeddings else None
    if cfg.query_mode == "text":  # an embedding set given here only names the classes and the model
        meta, queries = (read_json(emb_dir / EMBEDDINGS_JSON, "embedding set metadata") if emb_dir else {}), None
    else:
        meta, queries = _queries(emb_dir, cfg.query_split)
    index = open_index(cfg.index)
    _check_compatible(meta, index, emb_dir, cfg)
    index.set_backend(cfg.backend)  # after the checks: it may load the vectors onto a GPU
    text = build_text_queries(cfg, meta, index) if cfg.query_mode != "image" else None
    queries, vectors = _query_set(queries, text)
    if index.metric == "ip":  # cosine: unit queries (a no-op for normalized embedding sets)
        vectors = l2_normalize(vectors, axis=1)
    n = len(vectors)
    scores = np.empty((n, cfg.k), np.float32)
    ids = np.empty((n, cfg.k), np.int64)
    with timed("retrieve"), Progress(n, "retrieve", unit="query") as bar:
        for begin in range(0, n, cfg.batch_size):
            s, i = index.search(vectors[begin:begin + cfg.batch_size], cfg.k, nprobe=cfg.nprobe or None)
            scores[begin:begin + len(s)], ids[begin:begin + len(s)] = s, i
            bar.update(len(s))
    refilled = {}
    if cfg.fill_per_class:
        scores, ids, refilled = fill_classes(index, queries, vectors, scores, ids, cfg)
    table = _candidates(queries, scores, ids)
    out = Path(cfg.out)
    write_parquet(out / CANDIDATES_PARQUET, table)
    info = {
        "index": absolute_spec(cfg.index), "index_model": index.model,
        "embeddings": str(emb_dir.resolve()) if emb_dir else None,
        "embeddings_model": meta.get("model"), "query_split": cfg.query_split, "k": cfg.k, "n_queries": n,
        "n_candidates": table.num_rows, "config_hash": config_hash(cfg),
        "fill_per_class": cfg.fill_per_class, "k_per_class": refilled,
        "inputs": {"embeddings_json_hash": json_hash(meta) if meta else None, "index_json_hash": index.identity()},
        **_text_info(cfg, text, n),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / CANDIDATES_JSON, info)
    missing = int((ids[:, :cfg.k] < 0).sum())
    if missing:
        log.warning("retrieve: %d of %d neighbour slots came back empty (id -1); raise --nprobe for IVF indexes",
                    missing, n * cfg.k)
    log.info("retrieve: %d queries x k=%d -> %d candidates in %s", n, cfg.k, table.num_rows, out)
    return {"out": str(out), "n_queries": n, "k": cfg.k, "n_candidates": table.num_rows,
            "index_model": index.model, "seconds": round(time.perf_counter() - start, 2)}


def fill_classes(index, queries: pa.Table, vectors: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                 cfg: RetrieveConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """Re-query every class whose queries' neighbours hold fewer than cfg.fill_per_class distinct pool images with
    a doubled k, until it does or k reaches cfg.max_k (or the pool's size). Returns the (wider, -1-padded) score
    and id arrays and {class label: final k} of the classes re-queried."""
    labels = np.asarray(queries["label"].to_numpy(zero_copy_only=False), dtype=float)
    top = min(cfg.max_k, index.size)
    k_of = {int(lab): cfg.k for lab in np.unique(labels[~np.isnan(labels)])}

    def distinct(lab: int) -> int:  # pool images the class's queries found so far
        return len(np.setdiff1d(ids[labels == lab], [-1]))

    while True:
        short = [lab for lab, k in k_of.items() if k < top and distinct(lab) < cfg.fill_per_class]
        if not short:
            break
        for lab in short:
            k_of[lab] = min(2 * k_of[lab], top)
        width = max(k_of[lab] for lab in short)
        if width > ids.shape[1]:
            pad = width - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        for lab in short:
            rows = np.nonzero(labels == lab)[0]
            s, i = index.search(vectors[rows], k_of[lab], nprobe=cfg.nprobe or None)
            ids[rows, :k_of[lab]], scores[rows, :k_of[lab]] = i, s
        log.info("retrieve: re-queried %d class(es) below %d distinct neighbours: %s", len(short),
                 cfg.fill_per_class, ", ".join(f"{lab} (k={k_of[lab]})" for lab in short))
    refilled = {str(lab): k for lab, k in k_of.items() if k != cfg.k}
    for lab in k_of:
        if (found := distinct(lab)) < cfg.fill_per_class:
            log.warning("retrieve: class %s holds %d distinct neighbours at k=%d, fewer than --fill-per-class %d "
                        "(raise --max-k, or the pool has no more)", lab, found, k_of[lab], cfg.fill_per_class)
    return scores, ids, refilled


def _queries(emb_dir: Path, split: str) -> tuple[dict, pa.Table]:
    """The embedding set's rows of `split` (all rows when '') with id, label, embedding."""
    meta, table = read_embedding_set(emb_dir, columns=["id", "label", "split", "embedding"])
    if split:
        present = sorted(str(s) for s in pc.unique(table["split"]).to_pylist())
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows == 0:
            raise InputError(f"{emb_dir}: no rows with split '{split}' to query with (splits present: "
                             f"{', '.join(present) or 'none'}); pass --query-split NAME, or '' for all rows")
    if table.num_rows == 0:
        raise InputError(f"{emb_dir}: the embedding set holds no rows; there is nothing to query with")
    return meta, table


def _check_compatible(meta: dict, index, emb_dir: Path, cfg: RetrieveConfig) -> None:
    """Refuse another embedding model (unless --force), another dim, or k beyond the pool."""
    # text-only queries use no image vectors: their encoder is checked against the index in build_text_queries
    emb_model, dim = (meta.get("model"), meta.get("dim")) if cfg.query_mode != "text" else (index.model, None)
    what = f"{emb_dir / EMBEDDINGS_JSON} was embedded with model" if emb_dir else "the queries use model"
    check_index_model(emb_model, index.model, cfg.index, what,
                      "re-embed the targets with the index's model", cfg.force)
    if dim is not None and int(dim) != index.dim:
        raise InputError(f"{emb_dir / EMBEDDINGS_JSON}: embeddings have dim {dim} but the index {cfg.index} holds "
                         f"dim {index.dim}; re-embed the targets with the index's model '{index.model}' "
                         f"(--force cannot bridge different dims)")
    if cfg.k > index.size:
        raise InputError(f"--k {cfg.k} asks for more neighbours than the pool holds: the index {cfg.index} holds "
                         f"only {index.size} images; lower --k to at most {index.size}")


def _query_set(images: pa.Table | None, text: TextQueries | None) -> tuple[pa.Table, np.ndarray]:
    """Image queries then text queries: a table of (id, label) and their vectors, row for row."""
    tables, vectors = [], []
    if images is not None:
        tables.append(pa.table({"id": images["id"].cast(pa.string()), "label": images["label"].cast(pa.int64())}))
        vectors.append(embedding_matrix(images))
    if text is not None:
        tables.append(pa.table({"id": pa.array(text.ids, pa.string()), "label": pa.array(text.labels, pa.int64())}))
        vectors.append(text.vectors)
    return pa.concat_tables(tables), np.concatenate(vectors).astype(np.float32)


def _text_info(cfg: RetrieveConfig, text: TextQueries | None, n: int) -> dict:
    """candidates.json fields on the query mode and the text queries."""
    n_text = len(text.ids) if text else 0
    return {"query_mode": cfg.query_mode, "classes": text.classes if text else None,
            "templates": text.templates if text else None, "text_queries": cfg.text_queries if text else None,
            "text_model": text.model_id if text else None, "n_image_queries": n - n_text, "n_text_queries": n_text}


def _candidates(queries: pa.Table, scores: np.ndarray, ids: np.ndarray) -> pa.Table:
    """One row per (query, found neighbour), dropping id -1."""
    n, k = ids.shape
    keep = ids >= 0
    rows = np.nonzero(keep)[0]
    ranks = np.nonzero(keep)[1]
    labels = queries["label"].combine_chunks() if queries.num_rows else pa.array([], pa.int64())
    return pa.table({
        "query_id": queries["id"].combine_chunks().cast(pa.string()).take(pa.array(rows)),
        "query_label": labels.cast(pa.int64()).take(pa.array(rows)),
        "rank": pa.array(ranks.astype(np.int32), pa.int32()),
        "pool_id": pa.array(ids[keep], pa.int64()),
        "score": pa.array(scores[keep].astype(np.float32), pa.float32()),
    }, schema=SCHEMA)
