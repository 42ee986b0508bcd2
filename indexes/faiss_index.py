"""FAISS image indexes opened for search: memory-mapped, multi-part, optionally on GPU.

Index directory layout (docs/formats.md): `index.json` (written last), `index-000.faiss` (several parts
allowed: part j's ids are offset by the sizes of the parts before it) and `metadata/part-*.parquet`, whose
concatenated row i describes FAISS id i. Building lives in indexes/faiss_build.py; `build_faiss_index` is
re-exported here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402

from indexes.base import IndexSpecError
from indexes.faiss_build import (INDEX_JSON, METADATA_DIR, METRICS, build_faiss_index, choose_index, exact_knn,
                                 gpu_count, ivf_of, merge_topk, parse_memory, prepare_ivfpq, prep_vectors, recall_at,
                                 set_nprobe, to_gpu)

__all__ = ["FaissIndex", "build_faiss_index", "choose_index", "exact_knn", "parse_memory", "prepare_ivfpq",
           "recall_at", "set_nprobe", "to_gpu", "INDEX_JSON", "METADATA_DIR"]

log = logging.getLogger("rakt.indexes")


def _read_part(path: Path, mmap: bool) -> tuple[faiss.Index, bool]:
    """Read one FAISS file, memory-mapped when asked and supported; returns (index, mapped)."""
    if mmap:
        flags = [getattr(faiss, name) for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP") if hasattr(faiss, name)]
        for flag in flags:
            try:
                return faiss.read_index(str(path), flag), True
            except RuntimeError as e:
                log.debug("mmap flag %#x failed for %s: %s", flag, path, e)
        log.info("%s: this index type cannot be memory-mapped by faiss %s; reading it into RAM", path,
                 faiss.__version__)
    try:
        return faiss.read_index(str(path)), False
    except RuntimeError as e:
        raise IndexSpecError(f"{path}: not a readable FAISS index ({str(e).strip().splitlines()[-1]}); "
                             f"rebuild it with `rakt index build`") from None


class FaissIndex:
    """An index directory opened for search: one or more FAISS parts plus parquet metadata."""

    def __init__(self, path: Path, info: dict, parts: list[faiss.Index], mapped: bool, gpu: bool | None) -> None:
        self.path, self._info, self._parts, self.mapped = path, info, parts, mapped
        self.dim, self.metric, self.model = int(info["dim"]), str(info["metric"]), str(info["model"])
        self.size = int(info["count"])
        self.nprobe = int(info.get("nprobe") or 0)
        self._offsets = np.cumsum([0] + [p.ntotal for p in parts])
        self._search_parts: list[faiss.Index] = parts
        if gpu is not False and gpu_count() > 0:
            clones = [to_gpu(p) for p in parts]
            self._search_parts = [c if c is not None else p for c, p in zip(clones, parts)]
        elif gpu:
            log.warning("gpu=True but faiss sees no GPU (faiss-cpu installed, or none visible); searching on CPU")
        self.device = "gpu" if any(s is not p for s, p in zip(self._search_parts, parts)) else "cpu"
        for p in self._search_parts:
            set_nprobe(p, self.nprobe)
        self._current_nprobe = self.nprobe
        self._direct_map = False
        self._files = [pq.ParquetFile(f) for f in sorted((path / METADATA_DIR).glob("part-*.parquet"))]
        groups = [(fi, g, f.metadata.row_group(g).num_rows) for fi, f in enumerate(self._files)
                  for g in range(f.metadata.num_row_groups)]
        self._groups = [(fi, g) for fi, g, _ in groups]
        self._group_starts = np.cumsum([0] + [rows for _, _, rows in groups])
        log.info("opened %s: %s, %d vectors in %d part(s), %s%s", path, info.get("factory", info.get("kind")),
                 self.size, len(parts), self.device.upper(), ", memory-mapped" if mapped else "")

    @classmethod
    def open(cls, path: str | Path, mmap: bool = True, gpu: bool | None = None) -> "FaissIndex":
        """Open and validate an index directory (index.json, every part, metadata row count)."""
        path = Path(path)
        jpath = path / INDEX_JSON
        fix = f"build one with `rakt index build POOL --out {path}`"
        if not path.is_dir():
            raise IndexSpecError(f"{path}: no such index directory; {fix}")
        if not jpath.exists():
            raise IndexSpecError(f"{jpath} not found: {path} is not an index directory or its build did not "
                                 f"finish; {fix}")
        try:
            info = json.loads(jpath.read_text())
        except json.JSONDecodeError as e:
            raise IndexSpecError(f"{jpath}: not valid JSON ({e}); rebuild the index ({fix})") from None
        missing = [key for key in ("dim", "metric", "count", "parts", "model") if key not in info]
        if missing:
            raise IndexSpecError(f"{jpath}: missing key(s) {', '.join(missing)}; add them or rebuild the index")
        if info["metric"] not in METRICS:
            raise IndexSpecError(f"{jpath}: metric must be one of {', '.join(METRICS)}, got {info['metric']!r}")
        parts, mapped = [], bool(info["parts"]) and mmap
        for name in info["parts"]:
            file = path / name
            if not file.exists():
                raise IndexSpecError(f"{file}: index part listed in {jpath} is missing; restore the file or "
                                     f"rebuild the index with `rakt index build`")
            index, was_mapped = _read_part(file, mmap)
            mapped = mapped and was_mapped
            if index.d != int(info["dim"]):
                raise IndexSpecError(f"{file}: part has dim {index.d} but {jpath} says dim {info['dim']}; the part "
                                     f"belongs to another index: fix index.json or rebuild the index")
            if index.metric_type != METRICS[info["metric"]]:
                raise IndexSpecError(f"{file}: part metric differs from {jpath} (metric {info['metric']!r}); fix "
                                     f"index.json or rebuild the index")
            parts.append(index)
        if not parts:
            raise IndexSpecError(f"{jpath}: 'parts' lists no FAISS files; rebuild the index ({fix})")
        total = sum(p.ntotal for p in parts)
        if total != int(info["count"]):
            raise IndexSpecError(f"{jpath}: count is {info['count']} but its parts hold {total} vectors; fix "
                                 f"index.json or rebuild the index")
        meta_files = sorted((path / METADATA_DIR).glob("part-*.parquet"))
        if not meta_files:
            raise IndexSpecError(f"{path / METADATA_DIR}: no part-*.parquet metadata; each FAISS id needs a row "
                                 f"(id, url / path / shard+key); rebuild the index ({fix})")
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in meta_files)
        if rows != total:
            raise IndexSpecError(f"{path / METADATA_DIR}: metadata has {rows} rows but the index holds {total} "
                                 f"vectors; row i must describe FAISS id i: rebuild the index or its metadata")
        if "id" not in pq.ParquetFile(meta_files[0]).schema_arrow.names:
            raise IndexSpecError(f"{meta_files[0]}: metadata has no 'id' column; rebuild the index")
        return cls(path, info, parts, mapped, gpu)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 [n, k], ids int64 [n, k]) over every part; ip queries are L2-normalized."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}] for {self.path}, got shape {q.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = prep_vectors(q, normalize=self.metric == "ip")
        want = nprobe or self.nprobe
        if want != self._current_nprobe:
            for p in self._search_parts:
                set_nprobe(p, want)
            self._current_nprobe = want
        scores, ids = [], []
        for part, offset in zip(self._search_parts, self._offsets):
            if part.ntotal == 0:
                continue
            s, i = part.search(q, min(k, part.ntotal))
            scores.append(s)
            ids.append(np.where(i >= 0, i + offset, -1))
        if not scores:  # every part is empty
            scores, ids = [np.zeros((len(q), 0), np.float32)], [np.zeros((len(q), 0), np.int64)]
        if len(scores) == 1 and scores[0].shape[1] == k:
            return scores[0].astype(np.float32), ids[0].astype(np.int64)
        return merge_topk(scores, ids, k, self.metric)

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.size)]
        if len(bad):
            raise ValueError(f"ids out of range [0, {self.size}) for {self.path}: {bad[:5].tolist()}")
        return ids

    def metadata(self, ids: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Metadata rows for `ids` in order (repeats allowed), reading only the row groups they fall in."""
        ids = self._check_ids(ids)
        if len(ids) == 0:
            return self._files[0].schema_arrow.empty_table().select(columns or self._files[0].schema_arrow.names)
        group_of = np.searchsorted(self._group_starts, ids, side="right") - 1
        needed = np.unique(group_of)
        tables, base = [], {}
        offset = 0
        for g in needed:
            fi, rg = self._groups[g]
            t = self._files[fi].read_row_group(rg, columns=columns)
            tables.append(t)
            base[g] = offset
            offset += t.num_rows
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        pos = np.array([base[g] for g in group_of], np.int64) + ids - self._group_starts[group_of]
        return table.take(pa.array(pos))

    def embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for `ids` (float32 [n, dim]); approximate (decoded codes) for PQ indexes."""
        ids = self._check_ids(ids)
        if not self._direct_map:
            for p in self._parts:
                ivf = ivf_of(p)
                if ivf is not None:
                    ivf.make_direct_map()
            self._direct_map = True
        out = np.zeros((len(ids), self.dim), np.float32)
        part_of = np.searchsorted(self._offsets, ids, side="right") - 1
        for j in np.unique(part_of):
            mask = part_of == j
            try:
                out[mask] = self._parts[j].reconstruct_batch(ids[mask] - self._offsets[j])
            except RuntimeError as e:
                raise IndexSpecError(f"{self.path}: {type(self._parts[j]).__name__} cannot reconstruct stored "
                                     f"vectors ({str(e).strip().splitlines()[-1]}); use a flat or IVF index") from None
        return out

    def info(self) -> dict:
        """index.json plus where and how it is open."""
        return {**self._info, "path": str(self.path.resolve()), "size": self.size, "device": self.device,
                "mmap": self.mapped, "metadata_files": len(self._files)}

    def __repr__(self) -> str:
        return f"FaissIndex({str(self.path)!r}, {self._info.get('factory')}, size={self.size}, dim={self.dim})"
