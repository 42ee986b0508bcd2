"""`rakt embed`: images -> an embedding set (one parquet file per source partition), resumable.

Per partition: read samples (sources.py), decode + preprocess in DataLoader workers, encode in batches,
write `part-NAME.parquet` then `part-NAME.stats.json`. The stats file marks the partition done, so a
rerun after a crash embeds only the rest. `run.json` (written first) records what the output directory
was made from; a run with another model or source is refused. `embeddings.json` is written last, by the
driver. Partitions run on the engine named by `--engine` (in process, or on Ray actors: docs/scale.md);
every engine calls `embed_partition`, so the files do not depend on where a partition was embedded.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rakt.pipeline.config import ConfigError, EmbedConfig, config_hash
from rakt.pipeline.device import adapt_threads, loader_workers, set_threads
from rakt.pipeline.encoders import ImageEncoder, encoder_model_id, load_image_encoder
from rakt.pipeline.engines import EngineOptions, get_engine, raise_if_failed
from rakt.pipeline.formats import EMBEDDINGS_JSON, embedding_table, write_embedding_part
from rakt.pipeline.images import DECODE_ERRORS, decode_image, skip_cause
from rakt.pipeline.io import InputError, json_hash, read_json, timed, write_json
from rakt.pipeline.pixels import PixelPipeline
from rakt.pipeline.progress import Progress
from rakt.pipeline.sources import Partition, Sample, Source, count_hint, open_source

log = logging.getLogger("rakt")

RUN_JSON = "run.json"
IDENTITY_KEYS = ("model", "sources", "per_class", "seed", "partition_size", "split", "classes", "dtype")
IDENTITY_DEFAULTS = {"dtype": "float32"}  # what a run.json written before the key existed meant
MAX_RETRIES = 1


def run(cfg: EmbedConfig) -> dict:
    """Embed every image of `cfg.source` into the embedding set at `cfg.out`; returns a summary."""
    start = time.perf_counter()
    check(cfg)
    engine = get_engine(cfg.engine, engine_options(cfg))  # an unknown or unavailable engine fails here
    out = Path(cfg.out)
    source = open_source(cfg.source, classes_file=cfg.classes, per_class=cfg.per_class, seed=cfg.seed,
                         partition_size=cfg.partition_size)
    model_id = encoder_model_id(cfg)
    _claim(out, _identity(cfg, source, model_id))
    todo, redone, dropped = _todo(out, source)
    if todo:  # the set is unfinished until embeddings.json is written again, last
        (out / EMBEDDINGS_JSON).unlink(missing_ok=True)
    log.info("embed: %d partitions, %d done before, %d to embed with %s",
             len(source.partitions), len(source.partitions) - len(todo), len(todo), model_id)
    with timed("embed"):  # workers write to out, so with a cluster it must be a path every node sees
        failed = engine.run(todo, EmbedWorkerBuilder(cfg, source, str(out.resolve()), count_hint(source, todo)),
                            MAX_RETRIES)
    raise_if_failed(failed, "partitions")

    parts = [read_json(_stats_path(out, p), "partition stats") for p in source.partitions]
    count = sum(s["count"] for s in parts)
    skipped = collections.Counter()
    for s in parts:
        skipped.update(s["skipped"])
    if count == 0:
        raise InputError(f"{', '.join(cfg.source)}: no image could be read ({_causes(skipped) or 'no samples'}); "
                         f"the target set is empty")
    meta = {
        "model": model_id, "model_name": cfg.model, "pretrained": _abs_if_file(cfg.pretrained),
        "dim": parts[0]["dim"], "normalized": True, "count": count, "dtype": cfg.dtype,
        "skipped": dict(sorted(skipped.items())),
        "classes": source.classes, "partitions": [p.name for p in source.partitions],
        "sources": [os.path.abspath(s) for s in cfg.source], "split": cfg.split, "per_class": cfg.per_class,
        "seed": cfg.seed, "config_hash": config_hash(cfg),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / EMBEDDINGS_JSON, meta)
    log.info("embedded %d images into %s (skipped: %s)", count, out, _causes(skipped) or "none")
    return {"out": str(out), "model": model_id, "dim": meta["dim"], "count": count,
            "skipped": meta["skipped"], "partitions": len(parts), "resumed": len(parts) - len(todo),
            "redone": redone, "dropped": dropped,
            "seconds": round(time.perf_counter() - start, 2)}


def engine_options(cfg: EmbedConfig) -> EngineOptions:
    """An embed worker: the CPUs of its DataLoader workers, and a GPU unless the device is the CPU."""
    return EngineOptions(address=cfg.ray_address, num_cpus=max(1, cfg.workers), use_gpu=cfg.device != "cpu")


def check(cfg: EmbedConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    if not cfg.source:
        raise ConfigError("rakt embed: give at least one source (image folder, manifest or shards)")
    if cfg.batch_size < 1 or cfg.workers < -1 or cfg.per_class < 0:
        raise ConfigError("rakt embed: batch_size must be >= 1, workers >= 0 (or -1 = auto) and per_class >= 0")


def _causes(skipped: collections.Counter) -> str:
    return ", ".join(f"{n} {cause}" for cause, n in sorted(skipped.items()))


def _abs_if_file(path: str) -> str:
    return os.path.abspath(path) if path and os.path.isfile(path) else path


def _stats_path(out: Path, partition: Partition) -> Path:
    return out / f"part-{partition.name}.stats.json"


def partition_digest(source: Source, partition: Partition) -> str:
    """What a partition is made from: its files (path, size, modification time) and, for a per-class draw over
    shards, the keys kept in them. Recorded in its stats file; a rerun redoes a partition whose digest changed."""
    files = []
    for path in partition.files:
        try:
            st = os.stat(path)
            files.append((path, st.st_size, st.st_mtime_ns))
        except OSError:
            files.append((path, None, None))
    kept = None
    if source.keep is not None:
        names = set(partition.files)
        kept = sorted(f"{shard}/{key}" for shard, key in source.keep if shard in names)
    return json_hash({"files": files, "kept": kept})


def _todo(out: Path, source: Source) -> tuple[list[Partition], int, int]:
    """The partitions to embed: not done, or done from files that changed since (or whose part file is gone or
    damaged); part files of partitions the source no longer has are removed. Returns (todo, redone, dropped)."""
    todo, redone = [], 0
    for p in source.partitions:
        stats, part = _stats_path(out, p), out / f"part-{p.name}.parquet"
        if not stats.exists():
            todo.append(p)
            continue
        recorded = read_json(stats, "partition stats").get("source_hash")
        why = ("its part file is missing" if not part.exists() else "its part file is damaged" if not _readable(part)
               else "its files changed" if recorded not in (None, partition_digest(source, p)) else "")
        if why:
            log.warning("embed: %s was embedded before but %s; embedding it again", p, why)
            stats.unlink()
            todo.append(p)
            redone += 1
    names = {f"part-{p.name}{ext}" for p in source.partitions for ext in (".parquet", ".stats.json")}
    stale = [f for f in out.glob("part-*") if f.name not in names]
    for f in stale:
        f.unlink()
    dropped = len({f.name.split(".")[0] for f in stale})
    if redone or dropped:
        log.warning("embed: the source changed since %s was started: %d partition(s) embedded again, %d no longer "
                    "in the source removed", out, redone, dropped)
    return todo, redone, dropped


def _readable(part: Path) -> bool:
    try:
        pq.read_metadata(part)
        return True
    except (pa.ArrowInvalid, OSError):
        return False


# --- what an output directory was made from ---------------------------------------------------------

def _identity(cfg: EmbedConfig, source: Source, model_id: str) -> dict:
    return {"model": model_id, "sources": [os.path.abspath(s) for s in cfg.source], "per_class": cfg.per_class,
            "seed": cfg.seed, "partition_size": cfg.partition_size, "split": cfg.split, "classes": source.classes,
            "dtype": cfg.dtype}


def _claim(out: Path, identity: dict) -> None:
    """Record what `out` is made from, or refuse if it already holds an embedding set made otherwise."""
    run_json = out / RUN_JSON
    if run_json.exists():
        before = read_json(run_json, "embed run record")
        diff = [k for k in IDENTITY_KEYS if before.get(k, IDENTITY_DEFAULTS.get(k)) != identity[k]]
        if diff and not any(out.glob("part-*.stats.json")):  # a claim nothing was made under (a failed start)
            log.info("embed: %s holds no finished partition; replacing its %s", out, RUN_JSON)
            write_json(run_json, {**identity, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        elif diff:
            what = "; ".join(f"{k}: {before.get(k)!r} there, {identity[k]!r} now" for k in diff)
            raise InputError(f"{out} holds an embedding set made with other settings ({what}); "
                             f"use another --out or delete it")
    elif out.exists() and any(out.glob("part-*")):
        raise InputError(f"{out} holds part files but no {RUN_JSON}, so rakt cannot tell what made them; "
                         f"use another --out or delete it")
    else:
        write_json(run_json, {**identity, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    for stale in out.glob(".part-*.tmp-*"):  # left by a killed run; the partition is redone
        stale.unlink()


# --- the per-partition worker ----------------------------------------------------------------------

@dataclass
class EmbedWorkerBuilder:
    """Picklable: builds the encoder where the work runs and returns the per-partition worker."""
    cfg: EmbedConfig
    source: Source
    out: str
    total: int | None = None  # images to embed, for the progress line (None: unknown)

    def __call__(self) -> Callable[[Partition], dict]:
        set_threads(self.cfg.threads)
        return EmbedWorker(self.cfg, self.source, Path(self.out), load_image_encoder(self.cfg), self.total)


class EmbedWorker:
    """Embeds one partition per call (see `embed_partition`), with the encoder it was built with."""

    def __init__(self, cfg: EmbedConfig, source: Source, out: Path, encoder: ImageEncoder,
                 total: int | None = None) -> None:
        self.cfg, self.source, self.out, self.encoder = cfg, source, out, encoder
        self.workers = loader_workers(cfg.workers, encoder.device)
        self.progress = Progress(total, "embed", unit="img")

    def __call__(self, partition: Partition) -> dict:
        return embed_partition(self.encoder, self.source, partition, self.out, batch_size=self.cfg.batch_size,
                               workers=self.workers, split=self.cfg.split, progress=self.progress, dtype=self.cfg.dtype)


def embed_partition(encoder: ImageEncoder, source: Source, partition: Partition, out: Path, *, batch_size: int,
                    workers: int, split: str = "", progress: Progress | None = None, dtype: str = "float32") -> dict:
    """Embed one partition: write `part-NAME.parquet`, then `part-NAME.stats.json` (the done marker); both
    atomically. Every engine runs this, so outputs do not depend on where a partition was embedded."""
    start = time.perf_counter()
    digest = partition_digest(source, partition)  # before reading: a file changed meanwhile is redone next run
    loader = image_batches(source, partition, encoder.preprocess, batch_size, workers, split)
    rows: list[tuple] = []
    vectors: list[np.ndarray] = []
    skipped: collections.Counter = collections.Counter()
    for item in loader:
        skipped.update(item["skipped"])
        if item["rows"]:
            vectors.append(encoder.encode(item["pixels"]).numpy())
            rows += item["rows"]
            if progress is not None:
                progress.update(len(item["rows"]))
            adapt_threads()
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, encoder.dim), np.float32)
    write_embedding_part(out / f"part-{partition.name}.parquet", _table(rows, matrix, source.locator_columns, dtype))
    stats = {"partition": partition.name, "count": len(rows), "source_hash": digest, "skipped": dict(sorted(skipped.items())),
             "seconds": round(time.perf_counter() - start, 3), "dim": encoder.dim}
    write_json(_stats_path(out, partition), stats)
    return stats


def image_batches(source: Source, partition: Partition, preprocess: Callable, batch_size: int, workers: int,
                  split: str = "") -> DataLoader:
    """Batches of a partition's decoded images in source order: {"rows", "pixels", "skipped"} dicts."""
    images = PartitionImages(source, partition, preprocess, batch_size, split)
    chunks = images.chunk_count()
    workers = workers if chunks is None else min(workers, chunks)
    return DataLoader(images, batch_size=None, num_workers=workers, collate_fn=_pass_through,
                      worker_init_fn=_quiet_reader if chunks is None else None)


def _quiet_reader(worker_id: int) -> None:
    """Every worker streams a shard partition; only worker 0 logs the reader's warnings (counts are exact)."""
    if worker_id > 0:
        logging.getLogger("rakt").addFilter(lambda record: record.module != "sources")


def _pass_through(item: dict) -> dict:
    """The DataLoader's collate function: items are batches already (picklable, module level)."""
    return item


def _table(rows: list[tuple], matrix: np.ndarray, locator_columns: list[str], dtype: str) -> pa.Table:
    ids, labels, splits, locators = zip(*rows) if rows else ((), (), (), ())
    extra = {c: pa.array([None if loc.get(c) is None else str(loc[c]) for loc in locators], pa.string())
             for c in locator_columns}
    return embedding_table(ids, labels, splits, matrix, extra, dtype)


class PartitionImages(IterableDataset):
    """A partition's images as preprocessed batches, in source order.

    The samples are cut into chunks of `batch_size`; DataLoader worker w takes chunks w, w+W, w+2W ...
    and yields one item per chunk (rows may be fewer after skips), so the DataLoader's round-robin order
    gives back the source order. Folder/manifest chunks are read by their owner only; a shard is
    streamed by every worker, each keeping its own chunks, and a skip counts in the chunk where it occurs.
    """

    def __init__(self, source: Source, partition: Partition, preprocess: Callable, batch_size: int,
                 split: str) -> None:
        self.source, self.partition, self.preprocess = source, partition, preprocess
        self.pixels = PixelPipeline.exact(preprocess)
        self.batch_size, self.split = batch_size, split

    def _is_files(self) -> bool:
        return all(f in self.source.entries for f in self.partition.files)

    def chunk_count(self) -> int | None:
        """Chunks in this partition, when known before reading (folders and manifests)."""
        return -(-len(self.partition.files) // self.batch_size) if self._is_files() else None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        chunks = self._file_chunks if self._is_files() else self._stream_chunks
        for samples, skipped in chunks(worker, workers):
            yield self._decode(samples, skipped)

    def _file_chunks(self, worker: int, workers: int) -> Iterator[tuple[list[Sample], collections.Counter]]:
        files, size = self.partition.files, self.batch_size
        for start in range(worker * size, len(files), workers * size):
            stats: collections.Counter = collections.Counter()
            chunk = Partition(self.partition.index, self.partition.name, files[start:start + size])
            yield list(self.source.read(chunk, stats)), stats

    def _stream_chunks(self, worker: int, workers: int) -> Iterator[tuple[list[Sample], collections.Counter]]:
        stats: collections.Counter = collections.Counter()
        chunk, samples = 0, []
        for position, sample in enumerate(self.source.read(self.partition, stats)):
            if position and position % self.batch_size == 0:
                if chunk % workers == worker:
                    yield samples, collections.Counter(stats)
                chunk, samples = chunk + 1, []
                stats.clear()
            if chunk % workers == worker:
                samples.append(sample)
        if chunk % workers == worker:
            yield samples, collections.Counter(stats)

    def _decode(self, samples: list[Sample], skipped: collections.Counter) -> dict:
        rows, images = [], []
        for sample in samples:
            try:
                rgb = decode_image(sample.image)
                image = rgb if self.pixels is None else np.asarray(rgb, dtype=np.uint8)
            except DECODE_ERRORS as e:
                skipped[skip_cause(e)] += 1
                where = sample.locator.get("path") or sample.locator.get("shard")
                log.warning("%s (%s): image skipped: %s (%s)", sample.id, where, skip_cause(e), e)
                continue
            images.append(image)
            rows.append((sample.id, sample.label, self.split or sample.split or "train", sample.locator))
        return {"rows": rows, "pixels": self._preprocess(images) if images else None, "skipped": dict(skipped)}

    def _preprocess(self, images: list) -> torch.Tensor:
        """The encoder's input batch: through the tensor pipeline a size group at a time when the transform allows
        it (rakt/pipeline/pixels.py), else the transform on each PIL image."""
        if self.pixels is None:
            return torch.stack([self.preprocess(img) for img in images])
        out = torch.empty((len(images), 3, self.pixels.crop, self.pixels.crop))
        by_shape: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, array in enumerate(images):
            by_shape[array.shape].append(i)
        for rows in by_shape.values():
            batch = torch.from_numpy(np.stack([images[i] for i in rows])).permute(0, 3, 1, 2)  # channels_last
            out[rows] = self.pixels(batch)
        return out
