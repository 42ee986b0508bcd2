"""Teacher-output cache (`rakt distill --cache-teacher`): the teacher runs once per image and view, not per epoch.

For V views per image (view v of sample `key` is the augmentation seeded by (seed, v, key), see
distill.data.view_seed, so it can be regenerated exactly), the teacher's logits and features are written to
`{shard folder}/teacher-cache/{cache_id}/{shard name}.npz` (keys, logits [V, N, C], features [V, N, D],
float32; atomic). cache_id hashes the teacher checkpoint file, resolution, V and the seed. Epoch e then
regenerates view e % V and reads the teacher outputs instead of running the teacher. A shard whose npz exists
is not recomputed (the resume marker) unless the shard's size changed; under DDP each rank fills its share of shards, then all wait.
"""
from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from distill.data import TransferSet, augment, decode_uint8, make_augment, view_seed
from distill.losses import teacher_outputs
from pipeline.io import atomic_path, file_hash, json_hash

log = logging.getLogger("rakt")

CACHE_DIR = "teacher-cache"
TABLES = 8  # shard caches kept in memory per DataLoader worker


def cache_id(teacher_path: str, image_size: int, views: int, seed: int) -> str:
    """Short hash naming one cache: teacher file content, resolution, number of views, view seed."""
    return json_hash({"teacher": file_hash(teacher_path), "image_size": image_size, "views": views, "seed": seed})


def cache_path(shard: str, ident: str) -> Path:
    name = Path(shard).name.split(".")[0] + ".npz"
    return Path(shard).parent / CACHE_DIR / ident / name


def _records(shard: str) -> list[tuple[str, bytes]]:
    """(key, image bytes) of a shard in file order; unreadable parts are skipped with a warning."""
    out = []
    for record in wds.WebDataset([shard], shardshuffle=False, handler=wds.warn_and_continue, empty_check=False,
                                 nodesplitter=None, workersplitter=None):
        data = next((record[k] for k in ("jpg", "jpeg", "png", "webp") if k in record), None)
        if data is not None:
            out.append((record["__key__"], data))
    return out


@torch.no_grad()
def build_shard_cache(teacher, shard: str, out: Path, *, image_size: int, views: int, seed: int,
                      device: torch.device, batch_size: int = 256) -> None:
    """Teacher logits/features of every view of every sample of one shard, written to `out` (npz)."""
    augmenter = make_augment(image_size)
    records = _records(shard)
    keys = [k for k, _ in records]
    images = [decode_uint8(data) for _, data in records]
    logits, feats = [], []
    for v in range(views):
        lv, fv = [], []
        for i in range(0, len(images), batch_size):
            chunk = torch.stack([augment(img, augmenter, view_seed(seed, v, key))
                                 for img, key in zip(images[i:i + batch_size], keys[i:i + batch_size])])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                got = teacher_outputs(teacher, chunk.to(device))
            lv.append(got["logits"].float().cpu())
            fv.append(got["features"].float().cpu())
        logits.append(torch.cat(lv) if lv else torch.zeros(0, 0))
        feats.append(torch.cat(fv) if fv else torch.zeros(0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype=str), shard_bytes=np.int64(os.path.getsize(shard)), logits=torch.stack(logits).numpy(),
                     features=torch.stack(feats).numpy())


def _fresh(shard: str, path: Path) -> bool:
    """A cache file exists and was made from a shard of this size (a rewritten shard is recomputed)."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return int(z["shard_bytes"]) == os.path.getsize(shard)
    except (OSError, ValueError, KeyError):
        return False


def build_cache(teacher, shards: list[str], teacher_path: str, *, image_size: int, views: int, seed: int,
                device: torch.device, batch_size: int = 256) -> str:
    """Fill the cache for all shards (this rank's share under DDP); returns the cache id."""
    ident = cache_id(teacher_path, image_size, views, seed)
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if torch.distributed.is_initialized() else (0, 1))
    todo = [s for s in shards[rank::world] if not _fresh(s, cache_path(s, ident))]
    for shard in todo:
        build_shard_cache(teacher, shard, cache_path(shard, ident), image_size=image_size, views=views, seed=seed,
                          device=device, batch_size=batch_size)
    if todo:
        log.info("teacher cache %s: computed %d shard(s) x %d views", ident, len(todo), views)
    if world > 1:
        torch.distributed.barrier()
    return ident


class CachedTransferSet(TransferSet):
    """A TransferSet whose epoch e shows view e % V of each sample, with the cached teacher outputs attached."""

    def __init__(self, shards: list[str], image_size: int, ident: str, views: int, *, view_seed: int | None = None,
                 **kw) -> None:
        super().__init__(shards, image_size, **kw)
        self.ident, self.views = ident, views
        self.view_seed = self.seed if view_seed is None else view_seed  # the cache's; shuffling keeps `seed`
        self._tables: collections.OrderedDict[str, tuple[dict[str, int], np.ndarray, np.ndarray]] = \
            collections.OrderedDict()

    def _table(self, shard: str):
        """The cache of `shard`; the shuffle buffer mixes a few shards, so the last TABLES stay loaded."""
        if shard in self._tables:
            self._tables.move_to_end(shard)
        else:
            with np.load(cache_path(shard, self.ident)) as z:
                self._tables[shard] = ({str(k): i for i, k in enumerate(z["keys"])}, z["logits"], z["features"])
            while len(self._tables) > TABLES:
                self._tables.popitem(last=False)
        return self._tables[shard]

    def sample_seed(self, key: str) -> int:
        """View epoch % V of `key`: the seed the cache was built with."""
        return view_seed(self.view_seed, self.epoch % self.views, key)

    def _sample(self, record: dict) -> dict:
        view = self.epoch % self.views
        sample = super()._sample(record)
        index, logits, feats = self._table(record["__url__"])
        i = index[record["__key__"]]
        sample["teacher_logits"] = torch.from_numpy(logits[view, i].copy())
        sample["teacher_features"] = torch.from_numpy(feats[view, i].copy())
        return sample


def has_cache(shards: list[str], ident: str) -> bool:
    return all(os.path.isfile(cache_path(s, ident)) for s in shards)
