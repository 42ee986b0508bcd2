"""What `rakt adapt` reads: labelled images from source specs, labelled embedding sets, and accuracy reports."""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from rakt.distill.image_bank import majority_shape
from rakt.pipeline.formats import EMBEDDINGS_JSON, embedding_matrix, read_embedding_set
from rakt.pipeline.decoded import decoded_samples
from rakt.pipeline.images import decode_image
from rakt.pipeline.io import InputError
from rakt.pipeline.sources import open_source

log = logging.getLogger("rakt")


@dataclass
class Labelled:
    """Labelled examples: `x` uint8 images [N, 3, H, W] or float32 embeddings [N, dim]; `y` int64 [N];
    `skipped`: what the reader left out, by reason (no_label, undecodable_image, ...; other_split is no skip)."""
    x: torch.Tensor
    y: torch.Tensor
    classes: list[str] | None
    ids: list[str]
    skipped: dict = field(default_factory=dict)


def is_embedding_set(spec: str) -> bool:
    return Path(spec, EMBEDDINGS_JSON).is_file()


def load_images(specs: list[str], *, classes_file: str = "", per_class: int = 0, seed: int = 0, split: str = "",
                size: int = 224) -> Labelled:
    """Decode the labelled images of source specs (unlabelled ones are left out; `split` filters by the sample's
    own split). Images keep the size more than half of them share; the others are resized to it (to `size` x `size`
    when no size is shared by most)."""
    source = open_source(specs, classes_file=classes_file, per_class=per_class, seed=seed)
    stats: collections.Counter = collections.Counter()
    arrays, labels, ids = [], [], []
    for sample, array in decoded_samples(source, stats, lambda data: np.asarray(decode_image(data)), split=split):
        arrays.append(array)  # a sample without a label (e.g. no .cls) or an undecodable image: counted, reported
        labels.append(sample.label)
        ids.append(sample.id)
    if not arrays:
        raise InputError(f"{', '.join(specs)}: no labelled images{f' of split {split!r}' if split else ''} "
                         f"({dict(stats) or 'no samples'})")
    width, height = majority_shape([(a.shape[1], a.shape[0]) for a in arrays]) or (size, size)
    odd = sum(a.shape[:2] != (height, width) for a in arrays)
    if odd:  # the few images of another size are resized to the size of most; they never resize the rest
        log.warning("%d of %d labelled images are not %dx%d: resized to it", odd, len(arrays), width, height)
        arrays = [a if a.shape[:2] == (height, width) else
                  np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC)) for a in arrays]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    skipped = {k: v for k, v in sorted(stats.items()) if k != "other_split"}
    if skipped:
        log.warning("%s: skipped %s", ", ".join(specs), skipped)
    log.info("loaded %d labelled images %s from %s", len(ids), tuple(x.shape[1:]), ", ".join(specs))
    return Labelled(x, torch.tensor(labels, dtype=torch.long), source.classes, ids, skipped)


def load_embeddings(path: str, model_id: str, split: str = "") -> Labelled:
    """The labelled rows of an embedding set (of `split` when given); refuses one made by another model."""
    meta, table = read_embedding_set(path)
    if meta.get("model") != model_id:
        raise InputError(f"embedding set {path} was made with model '{meta.get('model')}' but the teacher is "
                         f"'{model_id}'; embed the images with the teacher's --model/--pretrained/--image-size")
    if split:
        table = table.filter(pc.equal(table["split"], split))
    rows = table.num_rows
    table = table.filter(pc.is_valid(table["label"]))
    skipped = {"no_label": rows - table.num_rows} if rows > table.num_rows else {}
    if skipped:
        log.warning("embedding set %s: %d rows have no label; skipped", path, skipped["no_label"])
    if table.num_rows == 0:
        raise InputError(f"embedding set {path}: no labelled rows{f' of split {split!r}' if split else ''}")
    x = torch.from_numpy(embedding_matrix(table))
    x = torch.nn.functional.normalize(x, dim=-1)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.long)
    return Labelled(x, y, meta.get("classes"), table["id"].to_pylist(), skipped)


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Top-1 accuracy, per-class accuracy (by class name) and counts."""
    pred = logits.argmax(dim=1)
    correct = (pred == labels)
    per_class = {}
    for i, name in enumerate(classes):
        mask = labels == i
        if mask.any():
            per_class[name] = round(float(correct[mask].float().mean()), 4)
    return {"accuracy": round(float(correct.float().mean()), 4), "count": int(labels.numel()),
            "per_class_accuracy": per_class}


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) index tensors: about `fraction` of each class, at least one row kept to train."""
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n = min(len(rows) - 1, round(len(rows) * fraction))
        held.append(rows[:n])
        train.append(rows[n:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values
