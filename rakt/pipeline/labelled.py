"""`rakt labelled`: the few-shot draw of labelled target images, read once and written as one WebDataset shard
OUT/labelled-000000.tar (original bytes, KEY.cls, KEY.json) + OUT/classes.txt, which every later step reads (a
per-class draw re-reads all of the target's shards: ~10 s for CIFAR-10 train).

KEY is the sample's own id where it is a plain WebDataset key (so embeddings and queries keep the ids), else its
position. Images are drawn in source order, as every stage draws them.
"""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

from webdataset import TarWriter

from rakt.pipeline.config import LabelledConfig
from rakt.pipeline.formats import CLASSES_TXT, LABELLED_SHARD
from rakt.pipeline.decoded import decoded_samples
from rakt.pipeline.images import open_image
from rakt.pipeline.io import InputError, atomic_path
from rakt.pipeline.sources import open_source


KEY = re.compile(r"[A-Za-z0-9_-]+")  # ids usable as WebDataset keys as they are
TAR_MTIME = 946684800  # fixed, so the shard's bytes depend on its content only


def run(cfg: LabelledConfig) -> dict:
    src = open_source(cfg.source, per_class=cfg.per_class, seed=cfg.seed)
    if not src.classes:
        raise InputError(f"{', '.join(cfg.source)}: no class names (classes.txt beside the shards or folders of "
                         f"classes)")
    stats: collections.Counter = collections.Counter()
    dest = Path(cfg.out, LABELLED_SHARD)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(cfg.out, CLASSES_TXT)) as tmp:
        tmp.write_text("".join(f"{c}\n" for c in src.classes))
    count, per_label, keys = 0, collections.Counter(), set()
    with atomic_path(dest) as tmp, TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as sink:
        for sample, ext in decoded_samples(src, stats, _extension):  # unlabelled or undecodable: counted
            meta = {"id": sample.id, "split": sample.split, "source": sample.locator}
            key = sample.id if KEY.fullmatch(sample.id) and sample.id not in keys else f"{count:06d}"
            keys.add(key)
            sink.write({"__key__": key, ext: sample.image, "cls": str(sample.label).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode()})
            count += 1
            per_label[src.classes[sample.label]] += 1
    if not count:
        raise InputError(f"{', '.join(cfg.source)}: no labelled images ({dict(stats) or 'no samples'})")
    return {"shard": str(dest), "images": count, "per_class": dict(sorted(per_label.items())), "skipped": dict(stats)}


def _extension(data: bytes) -> str:
    """The file extension of an image's own format, once the decode guard has opened it."""
    with open_image(data) as img:
        return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format or "", "png")
