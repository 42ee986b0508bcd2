"""`rakt adapt`: adapt the teacher (a vision foundation model) to the target task, step 1 of task-oriented
knowledge transfer. Modes (registered in rakt/distill/teacher/modes.py):

  linear     logistic regression on frozen L2-normalized embeddings (full-batch LBFGS; the weight decay is
             chosen on a held-out fraction of train), fit on a `rakt embed` embedding set of the same model
             (or on the train images, embedded here)
  zeroshot   open_clip only: class names x templates through the text tower; the head rows are the normalized
             mean template embeddings, logit scale 100
  reprogram  TDMR: frozen backbone, learned padding visual prompt + learned linear output mapping
  finetune   backbone + linear head, AdamW, backbone lr = lr * backbone_lr, batch-norm statistics frozen
reprogram and finetune start their head from a linear probe on the starting features (LP-FT), then train
with AdamW (cosine schedule), light augmentation (flip, shift) and cross-entropy.

The checkpoint (`save_teacher` / `load_teacher`, rakt/distill/teacher/checkpoint.py) holds only what was learned; loading
rebuilds the backbone through pipeline.encoders. The teacher maps [0, 1] images of any size to logits:

    teacher = load_teacher("teacher.pt", device="cuda")   # eval mode, frozen
    logits = teacher(images)                               # [B, classes]
    feats = teacher.features(images)                       # [B, dim], L2-normalized
"""
from __future__ import annotations

import collections
import logging
import os
import time

import torch

from rakt.distill.teacher.modes import AdaptMode, get_mode
from rakt.distill.teacher.inputs import accuracy_report, is_embedding_set, load_embeddings, load_images
from rakt.distill.teacher.fit import image_logits
from rakt.distill.teacher.checkpoint import load_teacher, read_teacher_meta, save_teacher
from rakt.distill.teacher.model import AdaptedTeacher
from rakt.distill.teacher.modes import build_teacher
from rakt.distill.config import AdaptConfig
from rakt.pipeline.config import ConfigError, config_hash, to_dict
from rakt.pipeline.device import set_threads
from rakt.pipeline.io import InputError, timed, write_json

log = logging.getLogger("rakt")

__all__ = ["AdaptedTeacher", "build_teacher", "evaluate_teacher", "load_teacher", "read_teacher_meta", "run",
           "save_teacher"]

def run(cfg: AdaptConfig) -> dict:
    """Adapt the teacher, save the checkpoint to cfg.out, evaluate on cfg.eval, write `{out}.json`."""
    start = time.perf_counter()
    mode = check(cfg)
    set_threads(cfg.threads)
    with timed(f"adapt ({cfg.mode})"):
        fitted = mode.fit(cfg)
    teacher = fitted.teacher
    meta = {"encoder": _encoder_meta(cfg), "model_id": teacher.model_id, "mode": cfg.mode,
            "classes": fitted.classes, "prompt_size": cfg.prompt_size if mode.prompt else 0,
            "input_size": teacher.input_size, "config_hash": config_hash(cfg), "fit": fitted.info}
    save_teacher(cfg.out, teacher, meta)
    summary = {"out": cfg.out, "mode": cfg.mode, "model": teacher.model_id, "classes": len(fitted.classes),
               "train_count": fitted.train_count, "train_skipped": fitted.skipped, "config_hash": meta["config_hash"],
               "fit": fitted.info}
    if cfg.eval:
        with timed("adapt eval"):
            summary.update(evaluate_teacher(teacher, cfg.eval, fitted.classes, split=cfg.eval_split,
                                            batch_size=cfg.batch_size))
    summary["seconds"] = round(time.perf_counter() - start, 2)
    write_json(f"{cfg.out}.json", {**summary, "config": to_dict(cfg)})
    if "accuracy" in summary:
        log.info("adapted teacher (%s): accuracy %.4f on %d eval samples", cfg.mode, summary["accuracy"],
                 summary["eval_count"])
    return summary


def check(cfg: AdaptConfig) -> AdaptMode:
    """The registered mode of cfg, once the config suits it (also run by `rakt run` before its first step)."""
    mode = get_mode(cfg.mode)
    if mode.check:
        mode.check(cfg)
    if mode.inputs == "images" and not cfg.train:
        raise ConfigError(f"rakt adapt --mode {cfg.mode}: give --train (labelled target images)")
    if cfg.epochs < 0 or cfg.batch_size < 1 or not 0 <= cfg.holdout < 1 or cfg.per_class < 0:
        raise ConfigError("rakt adapt: epochs >= 0, batch_size >= 1, 0 <= holdout < 1 and per_class >= 0 needed")
    for spec in cfg.eval:
        if is_embedding_set(spec) and mode.inputs == "images":
            raise ConfigError(f"rakt adapt --mode {cfg.mode}: --eval {spec} is an embedding set, but this mode "
                              f"changes the backbone's input or weights; pass the test images instead")
    return mode


def _encoder_meta(cfg: AdaptConfig) -> dict:
    """Encoder settings as the checkpoint records them (local files as absolute paths)."""
    absolute = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731
    return {"model": absolute(cfg.model), "pretrained": absolute(cfg.pretrained), "image_size": cfg.image_size}


def evaluate_teacher(teacher: AdaptedTeacher, specs: list[str], classes: list[str], *, split: str = "",
                     batch_size: int = 256) -> dict:
    """Accuracy of the teacher on test images and/or eval embedding sets (rows through the head only)."""
    logits, labels, skipped = [], [], collections.Counter()
    images = [s for s in specs if not is_embedding_set(s)]
    for spec in (s for s in specs if is_embedding_set(s)):
        data = load_embeddings(spec, teacher.model_id, split)
        _check_same_classes(data.classes, classes, spec)
        with torch.inference_mode():
            logits.append(teacher.logits_from_features(data.x.to(teacher.logit_scale.device)).cpu())
        labels.append(data.y)
        skipped.update(data.skipped)
    if images:
        data = load_images(images, split=split, size=teacher.input_size)
        _check_same_classes(data.classes, classes, ", ".join(images))
        logits.append(image_logits(teacher, data.x, batch_size))
        labels.append(data.y)
        skipped.update(data.skipped)
    report = accuracy_report(torch.cat(logits), torch.cat(labels), classes)
    return {"accuracy": report["accuracy"], "eval_count": report["count"],
            "per_class_accuracy": report["per_class_accuracy"], "eval_skipped": dict(sorted(skipped.items()))}


def _check_same_classes(found: list[str] | None, classes: list[str], where: str) -> None:
    if found and list(found) != list(classes):
        raise InputError(f"eval data {where} names classes ({', '.join(found[:4])}, ...) other than the teacher's "
                         f"({', '.join(classes[:4])}, ...); evaluate on the same class list")
