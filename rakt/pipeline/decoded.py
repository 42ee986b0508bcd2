"""The one reader of a source's images for the stages that need them decoded (labelled, adapt, the image bank of
distill and finetune, evaluate): samples of one split, labelled ones only where asked, each decoded by the caller's
function behind the decode guard (rakt/pipeline/images.py). What it leaves out is counted by one set of reasons:

- `other_split`: the sample belongs to another split (not a skip: it is not asked for);
- `no_label`: a labelled image was asked for and the sample has none (a shard member without .cls);
- the decode guard's causes: `undecodable_image`, `empty_image`, `image_too_large`, `extreme_aspect_ratio`, ...
  plus what the source counts while reading (e.g. `truncated_shard`).
"""
from __future__ import annotations

import collections
import logging
from typing import Callable, Iterator, TypeVar

from rakt.pipeline.images import DECODE_ERRORS, skip_cause
from rakt.pipeline.sources import Sample, Source

log = logging.getLogger("rakt")
T = TypeVar("T")


def decoded_samples(source: Source, stats: collections.Counter, decode: Callable[[bytes], T], *, split: str = "",
                    labelled_only: bool = True) -> Iterator[tuple[Sample, T]]:
    """(sample, decode(sample.image)) for every sample of `split` ('' = all; a sample without a split is in
    'train') that has a label (unless not `labelled_only`), in source order; the rest counted in `stats`."""
    for partition in source.partitions:
        for sample in source.read(partition, stats):
            if split and (sample.split or "train") != split:
                stats["other_split"] += 1
                continue
            if labelled_only and sample.label is None:
                stats["no_label"] += 1
                log.warning("%s: no label (.cls); skipped", sample.id)
                continue
            try:
                decoded = decode(sample.image)
            except DECODE_ERRORS as e:
                stats[skip_cause(e)] += 1
                log.warning("%s (%s): image skipped: %s (%s)", sample.id,
                            sample.locator.get("shard") or sample.locator.get("path") or "", skip_cause(e), e)
                continue
            yield sample, decoded
