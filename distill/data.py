"""Training data for the trainer: the unlabelled transfer set (WebDataset shards) and the labelled target set.

Both give batches {"images": float [B, 3, S, S] in [0, 1], "labels": int64 [B] (-1 = unlabelled),
"keys": list[str]}. Augmentation (RandomResizedCrop(scale=(0.6, 1)) + horizontal flip, torchvision v2) is
applied once per sample, so the same augmented view goes to the teacher and to the student.

Determinism: every sample's view is drawn from a generator seeded by (seed, epoch, key) (`view_seed`), the
shard order by (seed, epoch) and the shuffle buffer by (seed, epoch, rank, worker); so the batches of an
epoch depend only on (seed, epoch, world size, workers) and a resumed run can regenerate them exactly.
"""
from __future__ import annotations

import collections
import glob
import hashlib
import io
import itertools
import logging
import os
import random
import tarfile
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info
from torchvision.transforms import v2

from distill.teacher_data import load_images
from pipeline.io import InputError

log = logging.getLogger("rakt")

SCALE = (0.6, 1.0)
SHUFFLE_BUFFER = 1000


def view_seed(seed: int, epoch: int, key: str) -> int:
    """A stable 63-bit seed for the augmented view of sample `key` in `epoch` (no Python hash randomization)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_augment(size: int) -> v2.Compose:
    """RandomResizedCrop(size, scale=(0.6, 1)) + horizontal flip, on uint8 [3, H, W] tensors."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=SCALE, antialias=True), v2.RandomHorizontalFlip()])


def augment(image: torch.Tensor, augmenter: v2.Compose, seed: int) -> torch.Tensor:
    """One seeded augmented view: uint8 [3, H, W] -> float [3, S, S] in [0, 1] (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also reseeds CUDA, slowly
        out = augmenter(image)
    return out.float().div_(255.0)


def decode_uint8(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB tensor [3, H, W]."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)


def list_shards(specs: list[str]) -> list[str]:
    """Shard files of specs: .tar/.tar.gz files, brace patterns, globs, or folders of shards (sorted)."""
    shards: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "*.tar")) + glob.glob(os.path.join(spec, "*.tar.gz")))
        else:
            found = sorted(p for pattern in wds.shardlists.expand_urls(spec) for p in glob.glob(pattern)) \
                if any(c in spec for c in "{*?[") else [spec]
        missing = [p for p in found if not os.path.isfile(p)]
        if missing or not found:
            raise InputError(f"transfer shards {spec}: no shard files found ({missing[0] if missing else 'empty'})")
        shards += found
    return shards


def count_samples(shards: list[str]) -> int:
    """Samples (distinct keys with an image) in the shards, from tar headers only; unreadable shards count 0."""
    total = 0
    for shard in shards:
        try:
            with tarfile.open(shard, "r:*") as tar:
                total += len({m.name.rsplit(".", 1)[0] for m in tar if m.isfile() and
                              m.name.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))})
        except (tarfile.TarError, OSError, EOFError) as e:
            log.warning("%s: cannot list the shard (%s)", shard, e)
    return total


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TransferSet(IterableDataset):
    """Augmented samples of WebDataset shards; call `set_epoch` before iterating an epoch.

    Errors while reading (an empty or corrupt shard, an undecodable image) are counted in `errors` (in this
    process; DataLoader workers log their own counts) and skipped with a warning.
    """

    def __init__(self, shards: list[str], image_size: int, *, seed: int = 0, shuffle: bool = True,
                 buffer: int = SHUFFLE_BUFFER) -> None:
        super().__init__()
        self.shards, self.image_size, self.seed, self.shuffle, self.buffer = list(shards), image_size, seed, shuffle, buffer
        self.epoch = 0
        self.errors: collections.Counter = collections.Counter()
        self._augment = make_augment(image_size)
        self.rank, self.world = _rank_world()  # read here: DataLoader workers may not see torch.distributed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _handler(self, exn: Exception) -> bool:
        """warn-and-continue that counts what it skipped."""
        self.errors[type(exn).__name__] += 1
        log.warning("transfer set: skipped a shard or sample (%s: %s)", type(exn).__name__, str(exn)[:200])
        return True

    def sample_seed(self, key: str) -> int:
        """Seed of the augmented view of `key` in the current epoch."""
        return view_seed(self.seed, self.epoch, key)

    def _sample(self, record: dict) -> dict:
        key = record["__key__"]
        data = next((record[k] for k in ("jpg", "jpeg", "png", "webp") if k in record), None)
        if data is None:
            raise ValueError(f"sample {key} in {record.get('__url__')} has no image")
        image = augment(decode_uint8(data), self._augment, self.sample_seed(key))
        label = int(record["cls"]) if "cls" in record else -1
        return {"images": image, "labels": label, "keys": key}

    def __iter__(self) -> Iterator[dict]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 100003 + self.epoch).shuffle(shards)
        info = get_worker_info()
        worker = info.id if info else 0
        # the same split as wds.split_by_node, with the rank/world captured in the main process
        pipeline = wds.WebDataset(shards, shardshuffle=False, handler=self._handler, empty_check=False,
                                  nodesplitter=lambda src: itertools.islice(src, self.rank, None, self.world),
                                  workersplitter=wds.split_by_worker)
        if self.shuffle and self.buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
            pipeline = pipeline.shuffle(self.buffer, initial=self.buffer, rng=rng)
        yield from pipeline.map(self._sample, handler=self._handler)


class LabelledSet(Dataset):
    """Labelled target images held in memory (uint8), augmented per (seed, epoch, index)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None, image_size: int,
                 *, seed: int = 0, augment_views: bool = True) -> None:
        self.images, self.labels, self.classes = images, labels, classes
        self.image_size, self.seed, self.augment_views, self.epoch = image_size, seed, augment_views, 0
        self._augment = make_augment(image_size)
        self._resize = v2.Resize((image_size, image_size), antialias=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        key = f"target-{i}"
        if self.augment_views:
            image = augment(self.images[i], self._augment, view_seed(self.seed, self.epoch, key))
        else:
            image = self._resize(self.images[i]).float().div_(255.0)
        return {"images": image, "labels": int(self.labels[i]), "keys": key}


def load_labelled(specs: list[str], image_size: int, *, classes_file: str = "", per_class: int = 0, seed: int = 0,
                  split: str = "", draw_seed: int | None = None) -> LabelledSet:
    """The labelled target images of source specs (few-shot draw of `per_class` with `draw_seed`, default `seed`;
    augmentation with `seed`), in memory."""
    data = load_images(specs, classes_file=classes_file, per_class=per_class,
                       seed=seed if draw_seed is None else draw_seed, split=split, size=max(image_size, 32))
    return LabelledSet(data.x, data.y, data.classes, image_size, seed=seed)


def _collate(samples: list[dict]) -> dict:
    batch = {"images": torch.stack([s["images"] for s in samples]),
             "labels": torch.tensor([s["labels"] for s in samples], dtype=torch.long),
             "keys": [s["keys"] for s in samples]}
    for name in ("teacher_logits", "teacher_features"):  # cached teacher outputs (distill/trainer_cache.py)
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def _own_generator(seed: int) -> torch.Generator:
    """The loader's own generator, so starting an epoch (worker base seeds) leaves the global torch RNG alone
    and a resumed run's RNG stream matches an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def transfer_loader(dataset: TransferSet, batch_size: int, workers: int = 0) -> DataLoader:
    """A DataLoader over a TransferSet (batches keep worker order, so they are deterministic per epoch)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(), drop_last=False,
                      generator=_own_generator(dataset.seed))


def labelled_loader(dataset: LabelledSet, batch_size: int, workers: int = 0, *, shuffle: bool = True,
                    drop_last: bool = False) -> tuple[DataLoader, DistributedSampler]:
    """(DataLoader, sampler) over a LabelledSet, sharded across DDP ranks; call sampler.set_epoch per epoch."""
    rank, world = _rank_world()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=dataset.seed,
                                 drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=_collate,
                        pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                        generator=_own_generator(dataset.seed))
    return loader, sampler
