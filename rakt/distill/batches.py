"""Training batches from image banks (rakt/distill/image_bank.py): the transfer set for distill, the labelled set for
distill's mixed-in target images and for finetune.

A batch is {"source": uint8 [B, 3, s, s] (the bank's images, CPU), "theta": [B, 2, 3] (each sample's view,
rakt/distill/views.py), "labels": int64 [B] (-1 = unlabelled), "index": int64 [B] (bank rows)} plus
"teacher_logits"/"teacher_features" when a teacher cache is attached, and "mix" (rakt/distill/mixing.py parameters)
when the batch is mixed. The trainer's prepare() renders the views on the training device, at the student's size
and (online teacher) at the teacher's, so both see the same crop (and the same mix).

Determinism: the order of an epoch is a permutation seeded by (seed, epoch), split across DDP ranks; every
sample's view in an epoch is drawn by (seed, epoch) too, or is view (epoch mod V) of the teacher cache, and each
batch's mix comes from a generator seeded by (seed, "mix", epoch). The
batches of an epoch depend only on (seed, epoch, world size), so a resumed run regenerates them exactly.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from rakt.distill.image_bank import ImageBank
from rakt.distill.mixing import MixSpec
from rakt.distill.views import KINDS, draw_views, generator
from rakt.pipeline.device import rank_world

log = logging.getLogger("rakt")


@dataclass(frozen=True)
class ViewSpec:
    """How training views are drawn: a kind of distill.views.KINDS and the crop's smallest area fraction."""
    kind: str = "crop"
    scale: float = 0.6

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"augment must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"crop scale must be in (0, 1], got {self.scale}")

    def draw(self, n: int, gen: torch.Generator, side: int) -> torch.Tensor:
        return draw_views(n, self.kind, gen, scale=self.scale, side=side)


def epoch_order(n: int, seed: int, epoch: object, *, shuffle: bool = True) -> torch.Tensor:
    """This rank's bank rows for one pass: a permutation seeded by (seed, epoch), every world-th row."""
    rank, world = rank_world()
    order = torch.randperm(n, generator=generator(seed, "order", epoch)) if shuffle else torch.arange(n)
    return order[rank::world]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch and rank (the last one may be short)."""
    _, world = rank_world()
    per_rank = -(-n // world)
    return max(-(-per_rank // batch_size), 1)


def bank_batches(bank: ImageBank, *, batch_size: int, seed: int, epoch: object, views: ViewSpec,
                 cache=None, shuffle: bool = True, mix: MixSpec | None = None) -> Iterator[dict]:
    """One pass over the bank in batches (see the module docstring); `cache` a rakt.distill.teacher_cache.TeacherCache,
    `mix` how batches are mixed (None = never)."""
    order = epoch_order(len(bank), seed, epoch, shuffle=shuffle)
    if cache is not None and cache.shares_views:
        theta = cache.theta(cache.view_of(epoch))
    else:
        theta = views.draw(len(bank), generator(seed, "views", epoch), bank.side)
    mixes = generator(seed, "mix", epoch)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = {"source": bank.take(index), "theta": theta[index], "labels": bank.labels[index], "index": index}
        if cache is not None:
            batch.update(cache.outputs(index, epoch))
        if mix is not None and (params := mix.draw(len(index), mixes)) is not None:
            batch["mix"] = params
        yield batch


def endless_batches(bank: ImageBank, *, batch_size: int, seed: int, epoch: int, views: ViewSpec,
                    cache=None) -> Iterator[dict]:
    """Batches without end: pass r of `epoch` reshuffles and redraws its views with (epoch, r)."""
    for r in itertools.count():
        yield from bank_batches(bank, batch_size=batch_size, seed=seed, epoch=f"{epoch}.{r}", views=views,
                                cache=cache)
