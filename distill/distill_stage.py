"""`rakt distill` (adapted teacher -> student on the transfer set) and `rakt finetune` (student on the labelled
target images), both through distill.trainer. Under torchrun, torch.distributed is set up from the environment
(gloo on CPU, nccl on GPU); rank 0 writes checkpoints, metrics and the student.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Iterator

import torch

from distill.data import (LabelledSet, TransferSet, count_samples, labelled_loader, list_shards, load_labelled,
                          transfer_loader)
from distill.losses import DistillTask, teacher_outputs
from distill.students import create_student, load_student
from distill.teacher_model import load_teacher, read_teacher_meta
from distill.trainer_cache import CachedTransferSet, build_cache
from distill.trainer import FinetuneTask, Prepare, Trainer, TrainSettings, resolve_device, seed_everything
from pipeline.config import ConfigError, DistillConfig, FinetuneConfig, config_hash, to_dict
from pipeline.io import InputError, timed, write_json
from pipeline.prompts import load_classes

log = logging.getLogger("rakt")


def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world) — initialises torch.distributed from torchrun's environment when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _settings(cfg, steps_per_epoch: int, meta: dict) -> TrainSettings:
    return TrainSettings(out=cfg.out, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, warmup=cfg.warmup, clip=cfg.clip, ema=cfg.ema,
                         device=cfg.device, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                         compile=cfg.compile, resume=cfg.resume, meta=meta)


def _move(batch: dict, device: torch.device, epoch: int) -> dict:
    images = batch["images"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return {"images": images, "labels": batch["labels"].to(device, non_blocking=True)}


def _with_cached_teacher(teacher) -> Prepare:
    """prepare() for cached runs: teacher outputs from the batch; rows without (mixed-in target images) online."""
    def prepare(batch: dict, device: torch.device, epoch: int) -> dict:
        kwargs = _move(batch, device, epoch)
        out = {"logits": batch["teacher_logits"].to(device), "features": batch["teacher_features"].to(device)}
        cached = len(out["logits"])
        if len(kwargs["images"]) > cached:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                fresh = teacher_outputs(teacher, kwargs["images"][cached:])
            out = {k: torch.cat([v, fresh[k].to(v.dtype)]) for k, v in out.items()}
        kwargs["teacher_out"] = out
        return kwargs
    return prepare


def _check_config(cfg) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.workers < 0 or cfg.warmup < 0 or cfg.ema < 0 \
            or cfg.ema >= 1:
        raise ConfigError("epochs >= 1, batch_size >= 1, lr > 0, workers >= 0, warmup >= 0 and 0 <= ema < 1 needed")


def _target_classes(cfg: DistillConfig, target: LabelledSet | None) -> list[str] | None:
    if cfg.classes:
        return load_classes(cfg.classes)
    return target.classes if target is not None else None


def _mixed(transfer: Iterator[dict], target: Iterator[dict] | None) -> Iterator[dict]:
    """Transfer batches (labels -1), each joined by a labelled target batch when a target set is given."""
    for batch in transfer:
        if target is not None:
            extra = next(target)
            batch = {"images": torch.cat([batch["images"], extra["images"]]),
                     "labels": torch.cat([batch["labels"].clamp(max=-1), extra["labels"]]),
                     "keys": batch["keys"] + extra["keys"],
                     **{k: v for k, v in batch.items() if k.startswith("teacher_")}}
        else:
            batch = {**batch, "labels": torch.full_like(batch["labels"], -1)}
        yield batch


def run_distill(cfg: DistillConfig) -> dict:
    """Distill the adapted teacher into a timm student on the transfer shards; writes {out}/student.pt."""
    _check_config(cfg)
    if cfg.cache_teacher and cfg.cache_views < 1:
        raise ConfigError("rakt distill: --cache-views must be at least 1")
    if not cfg.teacher:
        raise ConfigError("rakt distill: --teacher (a checkpoint from `rakt adapt`) is required")
    shards = list_shards(cfg.transfer)
    teacher_classes = list(read_teacher_meta(cfg.teacher).get("classes") or [])
    rank, world = init_distributed(cfg.device)
    size = cfg.image_size or (32 if cfg.small_input else 224)
    target = (load_labelled(cfg.target, size, classes_file=cfg.classes, per_class=cfg.target_per_class,
                            seed=cfg.seed, draw_seed=_draw_seed(cfg)) if cfg.target else None)
    classes = _target_classes(cfg, target)
    if classes is not None and len(classes) != len(teacher_classes):
        raise InputError(f"teacher {cfg.teacher} predicts {len(teacher_classes)} classes but the target task has "
                         f"{len(classes)} ({', '.join(classes[:4])}, ...); adapt the teacher on the target classes")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    teacher = load_teacher(cfg.teacher, device=str(device), classes=classes)
    seed_everything(cfg.seed)  # the student's (and projector's) init is part of the run's determinism
    student = create_student(cfg.student, len(teacher_classes), small_input=cfg.small_input, image_size=size)
    task = DistillTask(student, teacher, mode=cfg.mode, temperature=cfg.temperature,
                       hard_weight=cfg.hard_weight if target is not None else 0.0, teacher_dim=teacher.dim)
    if cfg.cache_teacher:
        with timed("teacher cache"):
            vseed = cfg.cache_seed if cfg.cache_seed >= 0 else cfg.seed
            ident = build_cache(teacher, shards, cfg.teacher, image_size=size, views=cfg.cache_views, seed=vseed,
                                device=device, batch_size=max(cfg.batch_size, 64))
        transfer = CachedTransferSet(shards, size, ident, cfg.cache_views, seed=cfg.seed, view_seed=vseed)
        prepare = _with_cached_teacher(teacher)
    else:
        transfer, prepare = TransferSet(shards, size, seed=cfg.seed), _move
    n = count_samples(shards)
    steps = max(math.ceil(n / (cfg.batch_size * world)), 1)
    meta = {"stage": "distill", "teacher": cfg.teacher, "classes": teacher_classes, "mode": cfg.mode,
            "config_hash": config_hash(cfg)}
    trainer = Trainer(task, _settings(cfg, steps, meta), prepare)
    tloader = transfer_loader(transfer, cfg.batch_size, cfg.workers)
    lloader, sampler = (labelled_loader(target, cfg.target_batch_size or cfg.batch_size, 0, drop_last=False)
                        if target is not None else (None, None))

    def loader_for(epoch: int) -> Iterator[dict]:
        transfer.set_epoch(epoch)
        cycle = None
        if lloader is not None:
            target.set_epoch(epoch)
            sampler.set_epoch(epoch)
            cycle = _cycle(lloader, sampler, target, epoch)
        return _check_nonempty(_mixed(iter(tloader), cycle), shards, transfer)

    with timed("distill"):
        summary = trainer.fit(loader_for)
    summary.update({"transfer_samples": n, "classes": len(teacher_classes), "world_size": world,
                    "read_errors": dict(transfer.errors),
                    "teacher_cache": transfer.ident if cfg.cache_teacher else ""})
    if rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), {**summary, "config": to_dict(cfg)})
    return summary


def _cycle(loader, sampler, dataset: LabelledSet, epoch: int) -> Iterator[dict]:
    """Labelled batches without end: pass r of the epoch reshuffles with sampler epoch (epoch, r)."""
    for r in itertools.count():
        sampler.set_epoch(epoch * 1000 + r)
        dataset.set_epoch(epoch * 1000 + r)
        yield from loader


def _check_nonempty(batches: Iterator[dict], shards: list[str], transfer: TransferSet) -> Iterator[dict]:
    any_batch = False
    for batch in batches:
        any_batch = True
        yield batch
    if not any_batch:
        raise InputError(f"no samples could be read from the transfer shards {', '.join(shards[:5])}"
                         f"{' ...' if len(shards) > 5 else ''} (read errors: {dict(transfer.errors) or 'none'}); "
                         f"are they empty or corrupt?")


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetune a distilled student with cross-entropy on the labelled target images; writes {out}/student.pt."""
    _check_config(cfg)
    if not cfg.student or not cfg.target:
        raise ConfigError("rakt finetune: --student (a student checkpoint from `rakt distill`) and --target "
                          "(labelled target images) are required")
    rank, world = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    student, _ = load_student(cfg.student)
    target = load_labelled(cfg.target, student.image_size, classes_file=cfg.classes, per_class=cfg.per_class,
                           seed=cfg.seed, draw_seed=_draw_seed(cfg), split=cfg.split)
    if target.classes is not None and len(target.classes) != student.num_classes:
        raise InputError(f"student {cfg.student} predicts {student.num_classes} classes but the target images "
                         f"have {len(target.classes)}; finetune on the task it was distilled for")
    if int(target.labels.max()) >= student.num_classes:
        raise InputError(f"target labels reach {int(target.labels.max())} but the student predicts "
                         f"{student.num_classes} classes")
    loader, sampler = labelled_loader(target, cfg.batch_size, cfg.workers)
    steps = max(len(loader), 1)
    meta = {"stage": "finetune", "from": cfg.student, "classes": target.classes, "config_hash": config_hash(cfg)}
    trainer = Trainer(FinetuneTask(student), _settings(cfg, steps, meta), _move)

    def loader_for(epoch: int):
        sampler.set_epoch(epoch)
        target.set_epoch(epoch)
        return loader

    with timed("finetune"):
        summary = trainer.fit(loader_for)
    summary.update({"target_images": len(target), "world_size": world})
    if rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), {**summary, "config": to_dict(cfg)})
    return summary


def _draw_seed(cfg: DistillConfig | FinetuneConfig) -> int:
    return cfg.draw_seed if cfg.draw_seed >= 0 else cfg.seed


def run(cfg: DistillConfig | FinetuneConfig) -> dict:
    """The stage runner for pipeline.cli: distill or finetune by the config's type (torchrun-aware)."""
    owned = not torch.distributed.is_initialized()
    try:
        return run_finetune(cfg) if isinstance(cfg, FinetuneConfig) else run_distill(cfg)
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
