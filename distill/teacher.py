"""`rakt adapt`: adapt the teacher (a vision foundation model) to the target task, step 1 of task-oriented
knowledge transfer. Modes:

  linear     logistic regression on frozen L2-normalized embeddings (full-batch LBFGS; the weight decay is
             chosen on a held-out fraction of train), fit on a `rakt embed` embedding set of the same model
             (or on the train images, embedded here)
  zeroshot   open_clip only: class names x templates through the text tower; the head rows are the normalized
             mean template embeddings, logit scale 100
  reprogram  TDMR: frozen backbone, learned padding visual prompt + learned linear output mapping
  finetune   backbone + linear head, AdamW, backbone lr = lr * backbone_lr, batch-norm statistics frozen
reprogram and finetune start their head from a linear probe on the starting features (LP-FT), then train
with AdamW (cosine schedule), light augmentation (flip, shift) and cross-entropy.

The checkpoint (`save_teacher` / `load_teacher`, distill/teacher_model.py) holds only what was learned; loading
rebuilds the backbone through pipeline.encoders. The teacher maps [0, 1] images of any size to logits:

    teacher = load_teacher("teacher.pt", device="cuda")   # eval mode, frozen
    logits = teacher(images)                               # [B, classes]
    feats = teacher.features(images)                       # [B, dim], L2-normalized
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from distill.teacher_data import (Labelled, accuracy_report, is_embedding_set, load_embeddings, load_images)
from distill.teacher_fit import fit_images, fit_linear, image_logits, zeroshot_weights
from distill.teacher_model import (AdaptedTeacher, build_teacher, encoder_config, load_teacher,
                                   read_teacher_meta, save_teacher)
from pipeline.config import AdaptConfig, ConfigError, config_hash, to_dict
from pipeline.device import set_threads
from pipeline.encoders import encoder_model_id, load_image_encoder, load_text_encoder, require_text_tower
from pipeline.io import InputError, timed, write_json
from pipeline.prompts import load_classes, load_templates
from pipeline.sources import open_source

log = logging.getLogger("rakt")

__all__ = ["AdaptedTeacher", "build_teacher", "evaluate_teacher", "load_teacher", "read_teacher_meta", "run",
           "save_teacher"]

DEFAULT_LR = {"reprogram": 0.01, "finetune": 0.01}
TRAIN_LOGIT_SCALE = 10.0  # reprogram/finetune heads act on unit features; a fixed scale lets logits grow fast
ZEROSHOT_LOGIT_SCALE = 100.0


@dataclass
class _Fitted:
    teacher: AdaptedTeacher
    classes: list[str]
    train_count: int
    info: dict


def run(cfg: AdaptConfig) -> dict:
    """Adapt the teacher, save the checkpoint to cfg.out, evaluate on cfg.eval, write `{out}.json`."""
    start = time.perf_counter()
    _check(cfg)
    set_threads(cfg.threads)
    with timed(f"adapt ({cfg.mode})"):
        fitted = {"linear": _linear, "zeroshot": _zeroshot}.get(cfg.mode, _trained)(cfg)
    teacher = fitted.teacher
    meta = {"encoder": _encoder_meta(cfg), "model_id": teacher.model_id, "mode": cfg.mode,
            "classes": fitted.classes, "prompt_size": cfg.prompt_size if cfg.mode == "reprogram" else 0,
            "input_size": teacher.input_size, "config_hash": config_hash(cfg), "fit": fitted.info}
    save_teacher(cfg.out, teacher, meta)
    summary = {"out": cfg.out, "mode": cfg.mode, "model": teacher.model_id, "classes": len(fitted.classes),
               "train_count": fitted.train_count, "config_hash": meta["config_hash"], "fit": fitted.info}
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


def _check(cfg: AdaptConfig) -> None:
    if cfg.mode == "linear" and not (cfg.embeddings or cfg.train):
        raise ConfigError("rakt adapt --mode linear: give --embeddings (a train embedding set from `rakt embed`) "
                          "or --train images")
    if cfg.mode in ("reprogram", "finetune") and not cfg.train:
        raise ConfigError(f"rakt adapt --mode {cfg.mode}: give --train (labelled target images)")
    if cfg.mode == "zeroshot":
        require_text_tower(cfg)
    if cfg.epochs < 0 or cfg.batch_size < 1 or not 0 <= cfg.holdout < 1 or cfg.per_class < 0:
        raise ConfigError("rakt adapt: epochs >= 0, batch_size >= 1, 0 <= holdout < 1 and per_class >= 0 needed")
    for spec in cfg.eval:
        if is_embedding_set(spec) and cfg.mode in ("reprogram", "finetune"):
            raise ConfigError(f"rakt adapt --mode {cfg.mode}: --eval {spec} is an embedding set, but this mode "
                              f"changes the backbone's input or weights; pass the test images instead")


def _encoder_meta(cfg: AdaptConfig) -> dict:
    """Encoder settings as the checkpoint records them (local files as absolute paths)."""
    absolute = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731
    return {"model": absolute(cfg.model), "pretrained": absolute(cfg.pretrained), "image_size": cfg.image_size}


def _resolve_classes(cfg: AdaptConfig, found: list[str] | None, where: str) -> list[str]:
    if cfg.classes:
        classes = load_classes(cfg.classes)
        if found and list(found) != classes:
            raise InputError(f"--classes {cfg.classes} ({', '.join(classes[:4])}, ...) differs from the classes "
                             f"of {where} ({', '.join(found[:4])}, ...); drop --classes or pass the same list")
        return classes
    if not found:
        raise InputError(f"{where} records no class names; pass --classes classes.txt")
    return list(found)


def _train_images(cfg: AdaptConfig, size: int) -> Labelled:
    return load_images(cfg.train, classes_file=cfg.classes, per_class=cfg.per_class, seed=cfg.seed,
                       split=cfg.split, size=size)


def _linear(cfg: AdaptConfig) -> _Fitted:
    model_id = encoder_model_id(cfg)
    if cfg.embeddings:
        data = load_embeddings(cfg.embeddings, model_id, cfg.split)  # refuses another model before building it
        if cfg.per_class:
            log.warning("--per-class applies to --train images; the embedding set %s is used as it is",
                        cfg.embeddings)
        classes = _resolve_classes(cfg, data.classes, f"embedding set {cfg.embeddings}")
        teacher = build_teacher(cfg, len(classes), "linear")
    else:
        probe = load_image_encoder(encoder_config(cfg))
        data = _train_images(cfg, 224)
        classes = _resolve_classes(cfg, data.classes, ", ".join(cfg.train))
        teacher = build_teacher(cfg, len(classes), "linear", encoder=probe)
        data = Labelled(_image_features(teacher, data.x, cfg.batch_size), data.y, classes, data.ids)
    w, b, info = fit_linear(data.x, data.y, len(classes), weight_decay=cfg.weight_decay, holdout=cfg.holdout,
                            seed=cfg.seed)
    with torch.no_grad():
        teacher.head.weight.copy_(w)
        teacher.head.bias.copy_(b)
    return _Fitted(teacher, classes, len(data.y), info)


@torch.inference_mode()
def _image_features(teacher: AdaptedTeacher, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = teacher.logit_scale.device
    return torch.cat([teacher.features(images[i:i + batch_size].float().div(255).to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def _zeroshot(cfg: AdaptConfig) -> _Fitted:
    found = None
    if cfg.embeddings:
        found = load_embeddings(cfg.embeddings, encoder_model_id(cfg)).classes
    elif cfg.train:
        found = open_source(cfg.train, classes_file=cfg.classes).classes
    classes = _resolve_classes(cfg, found, "the train source / embedding set")
    encoder = load_image_encoder(encoder_config(cfg))
    weights = zeroshot_weights(load_text_encoder(encoder_config(cfg), encoder), classes,
                               load_templates(cfg.templates))
    teacher = build_teacher(cfg, len(classes), "zeroshot", logit_scale=ZEROSHOT_LOGIT_SCALE, bias=False,
                            encoder=encoder)
    with torch.no_grad():
        teacher.head.weight.copy_(weights)
    return _Fitted(teacher, classes, 0, {"templates": len(load_templates(cfg.templates))})


def _trained(cfg: AdaptConfig) -> _Fitted:
    teacher = build_teacher(cfg, 1, cfg.mode, prompt_size=cfg.prompt_size)  # the head is replaced once the classes are known
    data = _train_images(cfg, teacher.input_size)
    classes = _resolve_classes(cfg, data.classes, ", ".join(cfg.train))
    teacher.head = torch.nn.Linear(teacher.dim, len(classes)).to(teacher.logit_scale.device)
    teacher.logit_scale.fill_(TRAIN_LOGIT_SCALE)
    probe = _init_head(teacher, data, cfg)
    lr = cfg.lr or DEFAULT_LR[cfg.mode]
    losses = fit_images(teacher, data.x, data.y, epochs=cfg.epochs, lr=lr, weight_decay=max(cfg.weight_decay, 0.0),
                        batch_size=cfg.batch_size, seed=cfg.seed, backbone_lr=cfg.backbone_lr)
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    return _Fitted(teacher, classes, len(data.y), {"lr": lr, "epochs": cfg.epochs, "losses": [round(v, 5) for v in losses],
                                                   "trainable": trainable, "init_probe": probe})


def _init_head(teacher: AdaptedTeacher, data: Labelled, cfg: AdaptConfig) -> dict:
    """Start the head from a linear probe on the starting features (LP-FT: the backbone or prompt is then not
    pulled around by a random head). For reprogram these are the features with the initial (grey) prompt."""
    feats = _image_features(teacher, data.x, cfg.batch_size)
    w, b, info = fit_linear(feats, data.y, teacher.head.out_features, holdout=cfg.holdout, seed=cfg.seed)
    with torch.no_grad():
        teacher.head.weight.copy_(w / teacher.logit_scale)
        teacher.head.bias.copy_(b / teacher.logit_scale)
    return info


def evaluate_teacher(teacher: AdaptedTeacher, specs: list[str], classes: list[str], *, split: str = "",
                     batch_size: int = 256) -> dict:
    """Accuracy of the teacher on test images and/or eval embedding sets (rows through the head only)."""
    logits, labels = [], []
    images = [s for s in specs if not is_embedding_set(s)]
    for spec in (s for s in specs if is_embedding_set(s)):
        data = load_embeddings(spec, teacher.model_id, split)
        _check_same_classes(data.classes, classes, spec)
        with torch.inference_mode():
            logits.append(teacher.logits_from_features(data.x.to(teacher.logit_scale.device)).cpu())
        labels.append(data.y)
    if images:
        data = load_images(images, split=split, size=teacher.input_size)
        _check_same_classes(data.classes, classes, ", ".join(images))
        logits.append(image_logits(teacher, data.x, batch_size))
        labels.append(data.y)
    report = accuracy_report(torch.cat(logits), torch.cat(labels), classes)
    return {"accuracy": report["accuracy"], "eval_count": report["count"],
            "per_class_accuracy": report["per_class_accuracy"]}


def _check_same_classes(found: list[str] | None, classes: list[str], where: str) -> None:
    if found and list(found) != list(classes):
        raise InputError(f"eval data {where} names classes ({', '.join(found[:4])}, ...) other than the teacher's "
                         f"({', '.join(classes[:4])}, ...); evaluate on the same class list")
