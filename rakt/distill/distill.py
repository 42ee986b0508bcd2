"""`rakt distill`: the adapted teacher -> a timm student on the transfer set (distill.trainer's loop; under
torchrun, one process per device: see rakt/distill/train_setup.py)."""
from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from rakt.distill.image_bank import ImageBank, JoinedBank, open_bank
from rakt.distill.config import MIXES, DistillConfig
from rakt.distill.batches import ViewSpec, bank_batches, endless_batches, steps_per_epoch
from rakt.distill.losses import DistillTask
from rakt.distill.mixing import MixSpec
from rakt.distill.students import create_student
from rakt.distill.teacher.checkpoint import load_teacher, read_teacher_meta
from rakt.distill.train_loop import Trainer, seed_everything
from rakt.distill.teacher_cache import build_cache
from rakt.distill.train_setup import (check_config, draw_seed, init_distributed, labelled_bank, make_prepare,
                                   owns_process_group, settings)
from rakt.pipeline.config import ConfigError, config_hash, to_dict
from rakt.pipeline.device import resolve_device, set_threads
from rakt.pipeline.io import InputError, timed, write_json
from rakt.pipeline.formats import read_classes

log = logging.getLogger("rakt")


def _target_classes(cfg: DistillConfig, target: ImageBank | None) -> list[str] | None:
    if cfg.classes:
        return read_classes(cfg.classes)
    return target.classes if target is not None else None


def check(cfg: DistillConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    check_config(cfg)
    if cfg.cache_teacher and cfg.cache_views < 1:
        raise ConfigError("rakt distill: --cache-views must be at least 1")
    if cfg.mix not in MIXES:
        raise ConfigError(f"rakt distill: --mix must be one of {', '.join(MIXES)}, got {cfg.mix!r}")
    if not cfg.mix_alpha > 0:
        raise ConfigError(f"rakt distill: --mix-alpha must be > 0, got {cfg.mix_alpha}")
    if not 0 <= cfg.mix_prob <= 1:
        raise ConfigError(f"rakt distill: --mix-prob must be in [0, 1], got {cfg.mix_prob}")
    if not cfg.teacher:
        raise ConfigError("rakt distill: --teacher (a checkpoint from `rakt adapt`) is required")
    if not cfg.transfer:
        raise ConfigError("rakt distill: give the transfer-set shards (files, brace patterns or a folder)")


@owns_process_group
def run(cfg: DistillConfig) -> dict:
    """Distill the adapted teacher into a timm student on the transfer shards; writes {out}/student.pt."""
    check(cfg)
    set_threads(cfg.threads)
    teacher_classes = list(read_teacher_meta(cfg.teacher).get("classes") or [])
    rank, world = init_distributed(cfg.device)
    size = cfg.image_size or (32 if cfg.small_input else 224)
    with timed("decode transfer set"):
        transfer = open_bank(cfg.transfer, size)
    target = (labelled_bank(cfg.target, size, classes_file=cfg.classes, per_class=cfg.target_per_class,
                             seed=draw_seed(cfg)) if cfg.target else None)
    classes = _target_classes(cfg, target)
    counts = {"transfer_samples": len(transfer), "target_samples": len(target) if target is not None else 0}
    if target is not None and cfg.target_mix == "transfer":
        transfer, target = JoinedBank(transfer, target), None  # the labelled images as transfer images (KD only)
    if classes is not None and len(classes) != len(teacher_classes):
        raise InputError(f"teacher {cfg.teacher} predicts {len(teacher_classes)} classes but the target task has "
                         f"{len(classes)} ({', '.join(classes[:4])}, ...); adapt the teacher on the target classes")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    teacher = load_teacher(cfg.teacher, device=str(device), classes=classes, precision=cfg.precision)
    seed_everything(cfg.seed)  # the student's (and projector's) init is part of the run's determinism
    student = create_student(cfg.student, len(teacher_classes), small_input=cfg.small_input, image_size=size)
    task = DistillTask(student, teacher, mode=cfg.mode, temperature=cfg.temperature,
                       hard_weight=cfg.hard_weight if target is not None else 0.0, teacher_dim=teacher.dim)
    views = ViewSpec(cfg.augment, cfg.crop_scale)
    mix = MixSpec(cfg.mix, cfg.mix_alpha, cfg.mix_prob) if cfg.mix != "none" else None
    caches: dict = {"unlabelled": None, "labelled": None}
    if cfg.cache_teacher:
        vseed = cfg.cache_seed if cfg.cache_seed >= 0 else cfg.seed
        with timed("teacher cache"):
            for name, bank in (("unlabelled", transfer), ("labelled", target)):
                if bank is not None:
                    caches[name] = build_cache(teacher, bank, cfg.teacher, kind=cfg.teacher_view,
                                               views=cfg.cache_views, spec=views, seed=vseed,
                                               features=cfg.mode != "task", device=device,
                                               batch_size=max(cfg.batch_size, 64), folder=bank.folder)
    meta = {"stage": "distill", "teacher": cfg.teacher, "classes": teacher_classes, "mode": cfg.mode,
            "config_hash": config_hash(cfg)}
    trainer = Trainer(task, settings(cfg, steps_per_epoch(len(transfer), cfg.batch_size), meta),
                      make_prepare(size, teacher, cfg.temperature))
    labelled_batch = cfg.target_batch_size or cfg.batch_size

    def loader_for(epoch: int) -> Iterator[dict]:
        extra = (endless_batches(target, batch_size=labelled_batch, seed=cfg.seed, epoch=epoch, views=views,
                                 cache=caches["labelled"]) if target is not None else None)
        for batch in bank_batches(transfer, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, views=views,
                                  cache=caches["unlabelled"], mix=mix):  # the per-step labelled images: never mixed
            yield {"unlabelled": batch, "labelled": next(extra) if extra is not None else None}

    with timed("distill"):
        summary = trainer.fit(loader_for)
    summary.update({**counts, "classes": len(teacher_classes), "world_size": world,
                    "read_errors": transfer.skipped,
                    "teacher_cache": caches["unlabelled"].ident if caches["unlabelled"] is not None else ""})
    if rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), {**summary, "config": to_dict(cfg)})
    return summary
