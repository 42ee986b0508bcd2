"""`rakt finetune`: a distilled student -> cross-entropy on the labelled target images (distill.trainer's loop)."""
from __future__ import annotations

import os
from typing import Iterator

from rakt.distill.config import FinetuneConfig
from rakt.distill.batches import ViewSpec, bank_batches, steps_per_epoch
from rakt.distill.students import load_student
from rakt.distill.train_loop import FinetuneTask, Trainer, seed_everything
from rakt.distill.train_setup import (check_config, draw_seed, init_distributed, labelled_bank, make_prepare,
                                   owns_process_group, settings)
from rakt.pipeline.config import ConfigError, config_hash, to_dict
from rakt.pipeline.device import set_threads
from rakt.pipeline.io import InputError, timed, write_json


@owns_process_group
def check(cfg: FinetuneConfig) -> None:
    """The settings' own checks (also run by `rakt run` before its first step)."""
    check_config(cfg)
    if not cfg.student or not cfg.target:
        raise ConfigError("rakt finetune: --student (a student checkpoint from `rakt distill`) and --target "
                          "(labelled target images) are required")


def run(cfg: FinetuneConfig) -> dict:
    """Finetune a distilled student with cross-entropy on the labelled target images; writes {out}/student.pt."""
    check(cfg)
    set_threads(cfg.threads)
    rank, world = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    student, _ = load_student(cfg.student)
    target = labelled_bank(cfg.target, student.image_size, classes_file=cfg.classes, per_class=cfg.per_class,
                            seed=draw_seed(cfg), split=cfg.split)
    if target.classes is not None and len(target.classes) != student.num_classes:
        raise InputError(f"student {cfg.student} predicts {student.num_classes} classes but the target images "
                         f"have {len(target.classes)}; finetune on the task it was distilled for")
    if int(target.labels.max()) >= student.num_classes:
        raise InputError(f"target labels reach {int(target.labels.max())} but the student predicts "
                         f"{student.num_classes} classes")
    views = ViewSpec(cfg.augment, cfg.crop_scale)
    meta = {"stage": "finetune", "from": cfg.student, "classes": target.classes, "config_hash": config_hash(cfg)}
    trainer = Trainer(FinetuneTask(student), settings(cfg, steps_per_epoch(len(target), cfg.batch_size), meta),
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
