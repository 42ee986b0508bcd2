"""Training an index in memory that does not grow with its training sample.

An IVF index's coarse quantizer is trained by faiss's own k-means over a `DatasetAssign` (faiss.contrib.clustering,
the interface faiss gives for data that is not one matrix in RAM): the sample sits in a float32 file and every
iteration reads it a chunk at a time, so k-means holds one chunk and the centroids, whether the sample is 80k
vectors or LAION's 10M. With inner product the k-means is spherical (centroids at unit length, as faiss's IVF
training does). The encoder (PQ) is then trained by faiss on a subsample of the residuals, in memory (16k vectors).
Other indexes (flat, HNSW, a pre-transform such as OPQ) and builds on a GPU train in memory, as faiss does.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing logs are noise
import faiss  # noqa: E402
from faiss.contrib.clustering import DatasetAssign, kmeans  # noqa: E402

from rakt.indexes.faiss_choice import HNSW_MIN_LISTS, KMEANS_CHUNK_ROWS  # noqa: E402
from rakt.indexes.helpers import l2_normalize  # noqa: E402

log = logging.getLogger("rakt.indexes")

CHUNK_ROWS = KMEANS_CHUNK_ROWS  # sample rows in memory at a time during k-means
ENCODER_SAMPLE = 16_384  # vectors the encoder (PQ) trains on: faiss keeps 64 x 256 of them (prepare_ivfpq)


class SampleFile:
    """A float32 [n, d] sample on disk, written chunk by chunk and read back chunk by chunk (no memory map: read
    pages are page cache, not this process's memory)."""

    def __init__(self, path: Path, d: int) -> None:
        self.path, self.d, self.n = path, d, 0
        self._out = open(path, "wb")

    def append(self, vectors: np.ndarray) -> None:
        np.ascontiguousarray(vectors, np.float32).tofile(self._out)
        self.n += len(vectors)

    def close(self) -> None:
        self._out.close()

    def rows(self, begin: int, end: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            return np.fromfile(f, np.float32, (end - begin) * self.d, offset=begin * self.d * 4).reshape(-1, self.d)

    def chunks(self) -> "iter[tuple[int, np.ndarray]]":
        for begin in range(0, self.n, CHUNK_ROWS):
            yield begin, self.rows(begin, min(self.n, begin + CHUNK_ROWS))

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` in that order, reading chunk by chunk."""
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), self.d), np.float32)
        sorted_idx = np.asarray(indices)[order]
        for begin, chunk in self.chunks():
            inside = (sorted_idx >= begin) & (sorted_idx < begin + len(chunk))
            out[order[inside]] = chunk[sorted_idx[inside] - begin]
        return out


class ChunkedAssign(DatasetAssign):
    """faiss.contrib.clustering's dataset interface over a SampleFile: assignment chunk by chunk, by exact search
    over the centroids, or HNSW from HNSW_MIN_LISTS centroids (as faiss assigns with an HNSW coarse quantizer)."""

    def __init__(self, sample: SampleFile, spherical: bool) -> None:
        self.sample, self.spherical = sample, spherical

    def count(self) -> int:
        return self.sample.n

    def dim(self) -> int:
        return self.sample.d

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        return self.sample.take(indices)

    def _searcher(self, centroids: np.ndarray) -> faiss.Index:
        c = np.ascontiguousarray(l2_normalize(centroids, axis=1) if self.spherical else centroids, np.float32)
        metric = faiss.METRIC_INNER_PRODUCT if self.spherical else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(self.sample.d, 32, metric) if len(c) >= HNSW_MIN_LISTS else \
            faiss.IndexFlat(self.sample.d, metric)
        index.add(c)
        return index

    def perform_search(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = self._searcher(centroids)
        found = [index.search(chunk, 1) for _, chunk in self.sample.chunks()]
        return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])

    def assign_to(self, centroids: np.ndarray, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index = self._searcher(centroids)
        sums = np.zeros(centroids.shape, np.float32)
        assign, dist = np.empty(self.sample.n, np.int64), np.empty(self.sample.n, np.float32)
        for begin, chunk in self.sample.chunks():
            d, i = index.search(chunk, 1)
            i = i.ravel()
            assign[begin:begin + len(chunk)], dist[begin:begin + len(chunk)] = i, d.ravel()
            order = np.argsort(i, kind="stable")
            lists, starts = np.unique(i[order], return_index=True)
            sums[lists] += np.add.reduceat(chunk[order], starts, axis=0)
        if self.spherical:  # the objective k-means minimizes: 2 - 2 cos for unit vectors
            dist = 2 - 2 * dist
        return assign, dist, sums


def train_out_of_core(index: faiss.Index, sample: SampleFile, seed: int = 1234) -> bool:
    """Train a plain IVF index (no pre-transform) from `sample` as the module doc says; False (nothing done) for
    other indexes, which the caller trains in memory."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not isinstance(faiss.downcast_index(index), faiss.IndexIVF) or sample.n < ivf.nlist:
        return False
    ivf = faiss.downcast_index(ivf)
    with contextlib.redirect_stdout(sys.stderr):  # faiss's python k-means prints a line whatever `verbose` says
        centroids = kmeans(ivf.nlist, ChunkedAssign(sample, ivf.cp.spherical), niter=ivf.cp.niter,
                           seed=seed, verbose=False)
    centroids = np.ascontiguousarray(l2_normalize(centroids, axis=1) if ivf.cp.spherical else centroids, np.float32)
    quantizer = faiss.downcast_index(ivf.quantizer)
    quantizer.reset()
    quantizer.add(centroids)
    quantizer.is_trained = True
    rng = np.random.default_rng(seed)
    encoder = sample.take(np.sort(rng.choice(sample.n, min(sample.n, ENCODER_SAMPLE), replace=False)))
    index.train(encoder)  # the quantizer holds nlist centroids: faiss trains the encoder only
    return True
