"""Images decoded once: an `ImageBank` holds every image of a transfer set (or of the labelled set) as one uint8
array [N, 3, S, S] with its keys and labels, so training epochs read no JPEG and augment whole batches as tensors
(rakt/distill/views.py).

Transfer shards are decoded once into `{folder of the first shard}/decoded/{ident}/`: `images.npy` (memory-mapped
when read, so a set larger than RAM still works) and `bank.json` (keys, labels, classes, skips; written last: the
done marker). Every later run on the same shards reuses it; `ident` hashes the shard files (path, size, mtime,
inode and change time -- a shard rewritten in place gets a new ctime even when its size and mtime are put back)
and the side. `content` hashes the decoded images, keys and labels: what the teacher cache is keyed by.
The side S is decided before decoding, from the images' declared sizes (headers only): the side of the squares
no larger than the training size that make up more than half of the images (32-px CIFAR-like images for a 64-px
student stay 32 px), else the training size. Every image of another size is resized to S (shorter side resized
with antialiasing, then center-cropped) and counted in the log: one odd image never sets the size of the rest.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from rakt.pipeline.decoded import decoded_samples
from rakt.pipeline.images import DECODE_ERRORS, decode_image, open_image
from rakt.pipeline.io import InputError, atomic_path, json_hash
from rakt.pipeline.progress import Progress
from rakt.pipeline.sources import Sample, Source, count_hint, open_source

log = logging.getLogger("rakt")

DECODED_DIR = "decoded"
FORMAT = "rakt-bank/2"  # 2: the side from the majority of the images, not from the first


@dataclass
class ImageBank:
    """uint8 images [N, 3, S, S] (a tensor, possibly memory-mapped), keys, labels (-1 = none), classes."""
    images: torch.Tensor
    keys: list[str]
    labels: torch.Tensor
    classes: list[str] | None = None
    ident: str = ""
    skipped: dict = field(default_factory=dict)
    folder: Path | None = None  # where the decoded copy lives (None: in memory only)
    content: str = ""  # hash of images, keys and labels ("" = not computed yet: see content_hash)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def side(self) -> int:
        return int(self.images.shape[-1])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images of the rows `index` (a copy, contiguous)."""
        if len(index) and bool((index[1:] >= index[:-1]).all()) and int(index[-1]) - int(index[0]) + 1 == len(index):
            return self.images[int(index[0]):int(index[-1]) + 1].clone()
        return self.images[index]


class JoinedBank:
    """Two banks as one (rows of `first`, then rows of `second`), without copying either: the labelled images joined
    to a transfer set. The second's images are resized to the first's side when they differ."""

    def __init__(self, first: ImageBank, second: ImageBank) -> None:
        self.first, self.second = first, second
        self.keys = first.keys + second.keys
        self.labels = torch.cat([first.labels, second.labels])
        self.classes = first.classes or second.classes
        self.ident = json_hash({"joined": [first.ident or "memory", second.ident or content_hash(second)]})
        self.content = ""  # computed by content_hash when needed
        self.skipped = {k: first.skipped.get(k, 0) + second.skipped.get(k, 0)
                        for k in {**first.skipped, **second.skipped}}
        self.folder = first.folder

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def side(self) -> int:
        return self.first.side

    def take(self, index: torch.Tensor) -> torch.Tensor:
        n = len(self.first)
        out = torch.empty((len(index), 3, self.side, self.side), dtype=torch.uint8)
        low = index < n
        if low.any():
            out[low] = self.first.take(index[low])
        if (~low).any():
            rows = self.second.take(index[~low] - n)
            if rows.shape[-1] != self.side:
                rows = torch.nn.functional.interpolate(rows.float(), size=(self.side, self.side), mode="bilinear",
                                                       antialias=rows.shape[-1] > self.side,
                                                       align_corners=False).round().clamp(0, 255).to(torch.uint8)
            out[~low] = rows
        return out


def content_hash(bank: "ImageBank | JoinedBank") -> str:
    """The bank's content identity: a hash of its uint8 images, keys and labels (computed once, then kept)."""
    if not bank.content and isinstance(bank, JoinedBank):
        bank.content = json_hash({"joined": [content_hash(bank.first), content_hash(bank.second)]})
    if not bank.content:
        digest = hashlib.sha256()
        for start in range(0, len(bank), 4096):
            digest.update(np.ascontiguousarray(bank.images[start:start + 4096].numpy()).data)
        digest.update(json.dumps([bank.keys, bank.labels.tolist()]).encode())
        bank.content = digest.hexdigest()[:32]
    return bank.content


def bank_ident(source: Source, side: int) -> str:
    """Names the decoded copy of a source: its files (path, size, mtime), the draw settings and the side."""
    files = [f for p in source.partitions for f in p.files]
    stats = [os.stat(f) if os.path.exists(f) else None for f in files]
    stamp = [(f, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) if st else (f, -1)
             for f, st in zip(files, stats)]
    return json_hash({"format": FORMAT, "files": stamp, "keep": sorted(source.keep or []), "side": side})


def open_bank(specs: list[str], size: int, *, classes_file: str = "", per_class: int = 0, seed: int = 0,
              split: str = "", labelled_only: bool = False, keep_decoded: bool = True) -> ImageBank:
    """The images of source specs decoded once at side <= `size` (see the module docstring); `labelled_only` leaves
    out unlabelled samples, `split` samples of other splits; `keep_decoded` stores and reuses the decoded copy."""
    source = open_source(specs, classes_file=classes_file, per_class=per_class, seed=seed)
    where = _decoded_dir(source, size, split, labelled_only) if keep_decoded else None
    if where is not None and (where / "bank.json").is_file():
        bank = _load(where)
        log.info("%s: %d decoded images reused from %s", ", ".join(specs), len(bank), where)
        return bank
    bank = _decode(source, size, split, labelled_only, where)
    if not len(bank):
        what = "labelled images" if labelled_only else "images"
        raise InputError(f"no {what} could be read from {', '.join(specs[:5])}{' ...' if len(specs) > 5 else ''}"
                         f"{f' (split {split!r})' if split else ''} (skipped: {bank.skipped or 'nothing'}); "
                         f"are they empty or corrupt?")
    return bank


def bank_from_tensors(images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None,
                      keys: list[str] | None = None) -> ImageBank:
    """A bank of uint8 images already in memory (e.g. distill.teacher.data.load_images)."""
    keys = keys or [f"{i:06d}" for i in range(len(labels))]
    return ImageBank(images.contiguous(), list(keys), labels.long(), classes)


def _decoded_dir(source: Source, size: int, split: str, labelled_only: bool) -> Path | None:
    first = next((f for p in source.partitions for f in p.files), None)
    if first is None:
        return None
    ident = json_hash({"bank": bank_ident(source, size), "split": split, "labelled_only": labelled_only})
    return Path(first).parent / DECODED_DIR / ident


def majority_shape(shapes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The (width, height) that more than half of `shapes` have, else None."""
    if not shapes:
        return None
    shape, n = collections.Counter(shapes).most_common(1)[0]
    return shape if 2 * n > len(shapes) else None


def fit(rgb: Image.Image, width: int, height: int) -> Image.Image:
    """`rgb` resized to cover width x height (bicubic, antialiased) and center-cropped to it; as is when it fits."""
    w, h = rgb.size
    if (w, h) == (width, height):
        return rgb
    scale = max(width / w, height / h)
    rgb = rgb.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    left, top = (rgb.size[0] - width) // 2, (rgb.size[1] - height) // 2
    return rgb.crop((left, top, left + width, top + height))


def _bank_side(source: Source, size: int, keep: Callable[[Sample], bool]) -> int:
    """The decoded side (module docstring), from the declared sizes of the images `keep` accepts."""
    shapes = []
    for partition in source.partitions:
        for sample in source.read(partition, collections.Counter()):
            if keep(sample):
                with contextlib.suppress(*DECODE_ERRORS), open_image(sample.image) as img:
                    shapes.append(img.size)
    common = majority_shape(shapes)
    return common[0] if common is not None and common[0] == common[1] <= size else size


def _decode(source: Source, size: int, split: str, labelled_only: bool, where: Path | None) -> ImageBank:
    stats: collections.Counter = collections.Counter()
    bound = count_hint(source, max_shards=1 << 30) or 0
    keys: list[str] = []
    labels: list[int] = []
    store: np.ndarray | None = None

    def keep(sample: Sample) -> bool:
        return not (labelled_only and sample.label is None) and not (split and (sample.split or "train") != split)

    side, resized = _bank_side(source, size, keep), 0
    tmp = None
    if where is not None:
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / f".decoding.npy.tmp-{os.getpid()}"  # not atomic_path's name for images.npy
    progress = Progress(bound, "decode", unit="img")
    def decode(data: bytes) -> tuple[np.ndarray, bool]:
        rgb = decode_image(data)
        return np.asarray(fit(rgb, side, side), dtype=np.uint8), rgb.size != (side, side)

    for sample, (array, was_resized) in decoded_samples(source, stats, decode, split=split,
                                                        labelled_only=labelled_only):
        resized += was_resized
        if store is None:
            shape = (max(bound, 1), 3, side, side)
            store = _memmap(tmp, shape) if tmp is not None else np.empty(shape, np.uint8)
        if len(keys) >= len(store):  # more samples than the tar headers promised: keep them in memory
            store, tmp = np.concatenate([np.asarray(store), np.empty_like(store)]), _drop(tmp)
        store[len(keys)] = array.transpose(2, 0, 1)
        keys.append(sample.id)
        labels.append(-1 if sample.label is None else sample.label)
        progress.update(1)
    progress.close()
    if stats:
        log.info("decode: skipped %s", dict(stats))
    if resized:
        log.warning("decode: %d of %d images were not %dx%d (the side of most): resized and center-cropped to it",
                    resized, len(keys), side, side)
    n = len(keys)
    ident = bank_ident(source, size)
    if tmp is None or not n:
        _drop(tmp)
        images = torch.from_numpy(store[:n] if store is not None else np.zeros((0, 3, size, size), np.uint8))
        return ImageBank(images, keys, torch.tensor(labels, dtype=torch.long), source.classes, ident,
                         dict(sorted(stats.items())))
    store.flush()
    del store
    if n == bound:
        os.replace(tmp, where / "images.npy")
    else:
        with atomic_path(where / "images.npy") as out, open(out, "wb") as f:
            np.save(f, np.load(tmp, mmap_mode="r")[:n])
        _drop(tmp)
    meta = {"format": FORMAT, "ident": ident, "count": n, "side": side, "keys": keys, "labels": labels,
            "classes": source.classes, "skipped": dict(sorted(stats.items()))}
    with atomic_path(where / "bank.json") as out:
        Path(out).write_text(json.dumps(meta))
    return _load(where)


def _memmap(path: Path, shape: tuple) -> np.ndarray:
    """A uint8 .npy memory map with its disk space reserved up front: a full disk is an OSError naming the file
    here, never a SIGBUS on a later write into the map."""
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        try:
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return store  # a filesystem that cannot reserve space: writes find out
            del store
            path.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path.parent / "images.npy")) from e
    return store


def _drop(path: Path | None) -> None:
    if path is not None and path.exists():
        path.unlink()


def _load(where: Path) -> ImageBank:
    meta = json.loads((where / "bank.json").read_text())
    images = np.load(where / "images.npy", mmap_mode="c")  # copy-on-write: torch wants a writable array
    if images.shape[0] != meta["count"]:
        raise InputError(f"{where}: images.npy holds {images.shape[0]} images but bank.json says {meta['count']}; "
                         f"delete {where} to decode again")
    return ImageBank(torch.from_numpy(images), meta["keys"], torch.tensor(meta["labels"], dtype=torch.long),
                     meta["classes"], meta["ident"], meta["skipped"], where)
