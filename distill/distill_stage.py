"""`rakt distill` (adapted teacher -> student on the transfer set) and `rakt finetune` (student on the labelled
target images), both through distill.trainer. Under torchrun, torch.distributed is set up from the environment
(gloo on CPU, nccl on GPU); rank 0 writes checkpoints, metrics and the student.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from distill.bank import ImageBank, JoinedBank, bank_from_tensors, open_bank
from distill.data import ViewSpec, bank_batches, endless_batches, steps_per_epoch
from distill.losses import DistillTask, teacher_outputs
from distill.students import create_student, load_student
from distill.teacher_data import load_images
from distill.teacher_model import load_teacher, read_teacher_meta
from distill.trainer import FinetuneTask, Prepare, Trainer, TrainSettings, seed_everything
from distill.trainer_cache import build_cache, teacher_input
from distill.views import render
from distill.config import DistillConfig, FinetuneConfig
from pipeline.config import ConfigError, config_hash, to_dict
from pipeline.device import channels_last, resolve_device, set_threads
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
                         device=cfg.device, precision=cfg.precision, seed=cfg.seed,
                         checkpoint_every=cfg.checkpoint_every, compile=cfg.compile, resume=cfg.resume, meta=meta)


def make_prepare(size: int, teacher=None) -> Prepare:
    """prepare() of a batch {"unlabelled": ..., "labelled": ...} (either may be missing; distill/data.py batches):
    each part's views rendered on the device at the student's `size`, labels (the unlabelled part's set to -1), and
    with a teacher the teacher's outputs: cached ones from the batch, else the teacher run on the same views."""
    def prepare(batch: dict, device: torch.device, epoch: int) -> dict:
        images, labels, outs = [], [], []
        for name in ("unlabelled", "labelled"):
            part = batch.get(name)
            if part is None:
                continue
            source = part["source"].to(device, non_blocking=True)
            images.append(render(source, part["theta"], size))
            labels.append(part["labels"].clamp(max=-1) if name == "unlabelled" else part["labels"])
            if "teacher_logits" in part:
                outs.append({k.removeprefix("teacher_"): v for k, v in part.items() if k.startswith("teacher_")})
            elif teacher is not None:
                outs.append(teacher_outputs(teacher, teacher_input(teacher, source, part["theta"])))
        kwargs = {"images": channels_last(torch.cat(images)), "labels": torch.cat(labels).to(device)}
        if outs:
            keys = set.intersection(*(set(o) for o in outs))
            kwargs["teacher_out"] = {k: torch.cat([o[k].to(device).float() for o in outs]) for k in sorted(keys)}
        return kwargs
    return prepare


def _check_config(cfg) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.warmup < 0 or cfg.ema < 0 or cfg.ema >= 1 \
            or not 0 < cfg.crop_scale <= 1:
        raise ConfigError("epochs >= 1, batch_size >= 1, lr > 0, warmup >= 0, 0 <= ema < 1 and 0 < crop_scale <= 1 "
                          "needed")


def _labelled_bank(specs: list[str], size: int, *, classes_file: str, per_class: int, seed: int,
                   split: str = "") -> ImageBank:
    """The labelled target images in memory (few-shot draw of `per_class` with `seed`)."""
    data = load_images(specs, classes_file=classes_file, per_class=per_class, seed=seed, split=split,
                       size=max(size, 32))
    return bank_from_tensors(data.x, data.y, data.classes, data.ids)


def _target_classes(cfg: DistillConfig, target: ImageBank | None) -> list[str] | None:
    if cfg.classes:
        return load_classes(cfg.classes)
    return target.classes if target is not None else None


def run_distill(cfg: DistillConfig) -> dict:
    """Distill the adapted teacher into a timm student on the transfer shards; writes {out}/student.pt."""
    _check_config(cfg)
    if cfg.cache_teacher and cfg.cache_views < 1:
        raise ConfigError("rakt distill: --cache-views must be at least 1")
    if not cfg.teacher:
        raise ConfigError("rakt distill: --teacher (a checkpoint from `rakt adapt`) is required")
    if not cfg.transfer:
        raise ConfigError("rakt distill: give the transfer-set shards (files, brace patterns or a folder)")
    set_threads(cfg.threads)
    teacher_classes = list(read_teacher_meta(cfg.teacher).get("classes") or [])
    rank, world = init_distributed(cfg.device)
    size = cfg.image_size or (32 if cfg.small_input else 224)
    with timed("decode transfer set"):
        transfer = open_bank(cfg.transfer, size)
    target = (_labelled_bank(cfg.target, size, classes_file=cfg.classes, per_class=cfg.target_per_class,
                             seed=_draw_seed(cfg)) if cfg.target else None)
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
    trainer = Trainer(task, _settings(cfg, steps_per_epoch(len(transfer), cfg.batch_size), meta),
                      make_prepare(size, teacher))
    labelled_batch = cfg.target_batch_size or cfg.batch_size

    def loader_for(epoch: int) -> Iterator[dict]:
        extra = (endless_batches(target, batch_size=labelled_batch, seed=cfg.seed, epoch=epoch, views=views,
                                 cache=caches["labelled"]) if target is not None else None)
        for batch in bank_batches(transfer, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, views=views,
                                  cache=caches["unlabelled"]):
            yield {"unlabelled": batch, "labelled": next(extra) if extra is not None else None}

    with timed("distill"):
        summary = trainer.fit(loader_for)
    summary.update({**counts, "classes": len(teacher_classes), "world_size": world,
                    "read_errors": transfer.skipped,
                    "teacher_cache": caches["unlabelled"].ident if caches["unlabelled"] is not None else ""})
    if rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), {**summary, "config": to_dict(cfg)})
    return summary


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Finetune a distilled student with cross-entropy on the labelled target images; writes {out}/student.pt."""
    _check_config(cfg)
    if not cfg.student or not cfg.target:
        raise ConfigError("rakt finetune: --student (a student checkpoint from `rakt distill`) and --target "
                          "(labelled target images) are required")
    set_threads(cfg.threads)
    rank, world = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    student, _ = load_student(cfg.student)
    target = _labelled_bank(cfg.target, student.image_size, classes_file=cfg.classes, per_class=cfg.per_class,
                            seed=_draw_seed(cfg), split=cfg.split)
    if target.classes is not None and len(target.classes) != student.num_classes:
        raise InputError(f"student {cfg.student} predicts {student.num_classes} classes but the target images "
                         f"have {len(target.classes)}; finetune on the task it was distilled for")
    if int(target.labels.max()) >= student.num_classes:
        raise InputError(f"target labels reach {int(target.labels.max())} but the student predicts "
                         f"{student.num_classes} classes")
    views = ViewSpec(cfg.augment, cfg.crop_scale)
    meta = {"stage": "finetune", "from": cfg.student, "classes": target.classes, "config_hash": config_hash(cfg)}
    trainer = Trainer(FinetuneTask(student), _settings(cfg, steps_per_epoch(len(target), cfg.batch_size), meta),
                      make_prepare(student.image_size))

    def loader_for(epoch: int) -> Iterator[dict]:
        for batch in bank_batches(target, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, views=views):
            yield {"labelled": batch}

    with timed("finetune"):
        summary = trainer.fit(loader_for)
    summary.update({"target_images": len(target), "world_size": world})
    if rank == 0:
        write_json(os.path.join(cfg.out, "summary.json"), {**summary, "config": to_dict(cfg)})
    return summary


def _draw_seed(cfg: DistillConfig | FinetuneConfig) -> int:
    return cfg.draw_seed if cfg.draw_seed >= 0 else cfg.seed


# config type -> runner: `rakt distill` and `rakt finetune` share this module (pipeline.cli); a training stage
# added here is one runner + one entry
RUNNERS = {DistillConfig: run_distill, FinetuneConfig: run_finetune}


def runner_for(cfg: object):
    """The runner registered for cfg's config type (or the nearest base class that has one)."""
    for kind in type(cfg).__mro__:
        if kind in RUNNERS:
            return RUNNERS[kind]
    raise TypeError(f"no training runner for {type(cfg).__name__}; expected one of "
                    f"{', '.join(k.__name__ for k in RUNNERS)}")


def run(cfg: DistillConfig | FinetuneConfig) -> dict:
    """The stage runner for pipeline.cli: distill or finetune by the config's type (torchrun-aware)."""
    runner = runner_for(cfg)
    owned = not torch.distributed.is_initialized()
    try:
        return runner(cfg)
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
