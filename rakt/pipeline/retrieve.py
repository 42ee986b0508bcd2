"""`rakt retrieve`: a target embedding set + an index -> the top-k pool neighbours of every query image.

With --query-mode text/both, class-name prompts encoded by the open_clip text tower are queries too
(rakt/pipeline/prompts.py): query_id `text:{class}` (or `text:{class}:{template}`), query_label the class index.

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
import pyarrow.parquet as pq

from rakt.pipeline.config import ConfigError, RetrieveConfig, config_hash
from rakt.pipeline.progress import Progress
from rakt.pipeline.formats import (CANDIDATES_JSON, CANDIDATES_PARQUET, CANDIDATES_SCHEMA, EMBEDDINGS_JSON, embedding_matrix,
                                   read_embedding_set)
from rakt.pipeline.io import InputError, check_index_model, json_hash, l2_normalize, read_json, timed, write_json
from rakt.pipeline.prompts import TextQueries, build_text_queries

log = logging.getLogger("rakt")

SCHEMA = CANDIDATES_SCHEMA
ROW_GROUP = 65_536  # candidate rows per row group; a batch's rows are sorted by rank, so a group spans few ranks


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
    from rakt.indexes.registry import absolute_spec, open_index

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
    out = Path(cfg.out)
    labels = np.asarray(queries["label"].to_numpy(zero_copy_only=False), dtype=float)
    found = ClassNeighbours(labels) if cfg.fill_per_class else None
    missing = 0
    with timed("retrieve"), Progress(n, "retrieve", unit="query") as bar, \
            CandidateWriter(out / CANDIDATES_PARQUET) as writer:
        for begin in range(0, n, cfg.batch_size):
            s, i = index.search(vectors[begin:begin + cfg.batch_size], cfg.k, nprobe=cfg.nprobe or None)
            rows = np.arange(begin, begin + len(s))
            writer.write(_candidates(queries.take(pa.array(rows)), s, i))
            missing += int((i < 0).sum())
            if found is not None:
                found.add(rows, i)
            bar.update(len(s))
        refilled = fill_classes(index, queries, vectors, found, cfg, writer) if found is not None else {}
    table_rows = writer.rows
    info = {
        "index": absolute_spec(cfg.index), "index_model": index.model,
        "embeddings": str(emb_dir.resolve()) if emb_dir else None,
        "embeddings_model": meta.get("model"), "query_split": cfg.query_split, "k": cfg.k, "n_queries": n,
        "n_candidates": table_rows, "config_hash": config_hash(cfg),
        "fill_per_class": cfg.fill_per_class, "k_per_class": refilled,
        "inputs": {"embeddings_json_hash": json_hash(meta) if meta else None, "index_json_hash": index.identity()},
        **_text_info(cfg, text, n),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / CANDIDATES_JSON, info)
    if missing:
        log.warning("retrieve: %d of %d neighbour slots came back empty (id -1); raise --nprobe for IVF indexes",
                    missing, n * cfg.k)
    log.info("retrieve: %d queries x k=%d -> %d candidates in %s", n, cfg.k, table_rows, out)
    return {"out": str(out), "n_queries": n, "k": cfg.k, "n_candidates": table_rows,
            "index_model": index.model, "seconds": round(time.perf_counter() - start, 2)}


class ClassNeighbours:
    """The distinct pool images each class's queries found so far (for --fill-per-class)."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.ids = {int(lab): np.zeros(0, np.int64) for lab in np.unique(labels[~np.isnan(labels)])}

    def add(self, rows: np.ndarray, ids: np.ndarray) -> None:
        for lab in self.ids:
            mine = ids[self.labels[rows] == lab]
            if mine.size:
                self.ids[lab] = np.union1d(self.ids[lab], mine[mine >= 0])

    def distinct(self, lab: int) -> int:
        return len(self.ids[lab])


def fill_classes(index, queries: pa.Table, vectors: np.ndarray, found: ClassNeighbours, cfg: RetrieveConfig,
                 writer: "CandidateWriter") -> dict:
    """Re-query every class whose queries' neighbours hold fewer than cfg.fill_per_class distinct pool images with
    a doubled k, until it does or k reaches cfg.max_k (or the pool's size); the re-queried classes' rows replace
    their first ones in the candidates. Returns {class label: final k} of the classes re-queried."""
    labels = found.labels
    top = min(cfg.max_k, index.size)
    k_of = {lab: cfg.k for lab in found.ids}
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    while True:
        short = [lab for lab, k in k_of.items() if k < top and found.distinct(lab) < cfg.fill_per_class]
        if not short:
            break
        for lab in short:
            k_of[lab] = min(2 * k_of[lab], top)
            rows = np.nonzero(labels == lab)[0]
            s, i = index.search(vectors[rows], k_of[lab], nprobe=cfg.nprobe or None)
            results[lab] = (s, i)
            found.ids[lab] = np.union1d(found.ids[lab], i[i >= 0])
        log.info("retrieve: re-queried %d class(es) below %d distinct neighbours: %s", len(short),
                 cfg.fill_per_class, ", ".join(f"{lab} (k={k_of[lab]})" for lab in short))
    for lab in k_of:
        if (have := found.distinct(lab)) < cfg.fill_per_class:
            log.warning("retrieve: class %s holds %d distinct neighbours at k=%d, fewer than --fill-per-class %d "
                        "(raise --max-k, or the pool has no more)", lab, have, k_of[lab], cfg.fill_per_class)
    if results:
        rows = {lab: pa.array(np.nonzero(labels == lab)[0]) for lab in results}
        replaced = pa.concat_arrays([queries["id"].combine_chunks().take(r) for r in rows.values()])
        writer.replace(replaced.cast(pa.string()), [_candidates(queries.take(rows[lab]), s, i)
                                                    for lab, (s, i) in results.items()])
    return {str(lab): k for lab, k in k_of.items() if k != cfg.k}


class CandidateWriter:
    """candidates.parquet written batch by batch (memory: one batch), each batch's rows in rank order so that a
    reader can take rank windows by row-group statistics; renamed into place when complete."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self.tmp = path.with_name(f".{path.name}.tmp")
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "CandidateWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, SCHEMA)
        return self

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table.sort_by([("rank", "ascending")]), row_group_size=ROW_GROUP)
        self.rows += table.num_rows

    def replace(self, query_ids: pa.Array, tables: list[pa.Table]) -> None:
        """Drop the rows of the queries `query_ids` (searched again) and append their new rows: one more pass over
        the file, a row group at a time."""
        self._writer.close()
        first = self.tmp.with_name(self.tmp.name + ".first")
        self.tmp.replace(first)
        self._writer, self.rows = pq.ParquetWriter(self.tmp, SCHEMA), 0
        source = pq.ParquetFile(first)
        for g in range(source.num_row_groups):
            group = source.read_row_group(g)
            self.write(group.filter(pc.invert(pc.is_in(group["query_id"], value_set=query_ids))))
        for table in tables:
            self.write(table)
        first.unlink()

    def __exit__(self, kind, value, tb) -> None:
        self._writer.close()
        if kind is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


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
