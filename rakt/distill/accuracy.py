"""Accuracy, per-class accuracy and confusion matrix of a classifier on labelled images: the library under
`rakt evaluate` and `rakt export` (its accuracy check in each runtime).

`evaluate_model` works on any model mapping [0, 1] image batches to logits; `labelled_batches` reads labelled
images with `rakt.pipeline.sources` and decodes them with PIL (RGB, resized to the model's input size).
"""
from __future__ import annotations

import collections
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from rakt.pipeline.device import adapt_threads, autocast, autocast_dtype, channels_last
from rakt.pipeline.progress import Progress
from rakt.pipeline.decoded import decoded_samples
from rakt.pipeline.images import decode_image
from rakt.pipeline.io import InputError
from rakt.pipeline.sources import Source


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def evaluate_model(model: torch.nn.Module, data: Batches | tuple[torch.Tensor, torch.Tensor], num_classes: int,
                   *, device: str | torch.device = "cpu", batch_size: int = 256, precision: str = "fp32",
                   progress: Progress | None = None) -> dict:
    """Top-1 accuracy, per-class accuracy (None for a class without samples), confusion matrix, count.

    data: an iterable of (images, labels) batches (e.g. a DataLoader), or one (images, labels) pair of
    tensors, evaluated in chunks of `batch_size`. confusion[i][j] counts samples of true class i predicted
    as j. The model runs in eval mode under inference_mode (autocast by `precision`, channels_last) and is put
    back in its previous mode.
    """
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        data = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, labels in data:
                labels = torch.as_tensor(labels).to("cpu", torch.int64)
                if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                    raise InputError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}.."
                                     f"{int(labels.max())}")
                with autocast(device, dtype):
                    logits = model(channels_last(images.to(device))).float()
                if logits.shape[-1] != num_classes:
                    raise InputError(f"the model gives {logits.shape[-1]} class scores but the task has "
                                     f"{num_classes} classes")
                pred = logits.argmax(dim=-1).cpu()
                confusion += torch.bincount(labels * num_classes + pred,
                                            minlength=num_classes ** 2).view(num_classes, num_classes)
                if progress is not None:
                    progress.update(len(labels))
                adapt_threads()
    finally:
        model.train(was_training)
    return metrics_from_confusion(confusion.numpy())


def metrics_from_confusion(confusion: np.ndarray) -> dict:
    """accuracy, per_class_accuracy, confusion (lists), count from a [true, predicted] count matrix."""
    count = int(confusion.sum())
    per_class_total = confusion.sum(axis=1)
    diag = np.diag(confusion)
    per_class = [float(d / n) if n else None for d, n in zip(diag, per_class_total)]
    return {"accuracy": float(diag.sum() / count) if count else 0.0, "per_class_accuracy": per_class,
            "confusion": confusion.astype(int).tolist(), "count": count}


def decode_rgb(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> float [3, S, S] tensor in [0, 1] (see decode_uint8)."""
    return decode_uint8(data, size).float().div_(255.0)


def decode_uint8(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, S, S]: a square no larger than `size` as it is (the student upsamples it
    itself, as in training), anything else resized to size x size (size 0 keeps every image as is)."""
    rgb = decode_image(data)
    w, h = rgb.size
    if size and not (w == h and w <= size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def labelled_batches(source: Source, split: str, size: int, batch_size: int,
                     skipped: collections.Counter) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decoded (images, labels) batches of a source's labelled samples of `split` ('' = all splits); images are
    decoded as uint8 and turned into [0, 1] floats a batch at a time."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for sample, image in decoded_samples(source, skipped, lambda data: decode_uint8(data, size), split=split):
        images.append(image)
        labels.append(sample.label)
        if len(images) == batch_size:
            yield _stack(images, size), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield _stack(images, size), torch.tensor(labels)


def _stack(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """One float batch in [0, 1] from uint8 images; images of several sizes (small squares kept as they are) are
    brought to size x size first."""
    if len({tuple(x.shape) for x in images}) > 1:
        return torch.cat([torch.nn.functional.interpolate(x[None].float().div_(255.0), size=(size, size),
                                                          mode="bilinear", align_corners=False,
                                                          antialias=x.shape[-1] > size) for x in images])
    return torch.stack(images).float().div_(255.0)
