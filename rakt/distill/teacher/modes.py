"""Adapt modes: each `rakt adapt --mode` is one registered entry (how it fits the teacher, what it reads, its
help text). ADAPT_MODES is the only list of modes; rakt/distill/teacher/adapt.py runs the chosen one, and
`build_teacher` shapes the teacher (prompt? trainable backbone?) as a mode's entry says.

Adding a mode = one fit function `fit(cfg) -> Fitted` + `@register(...)` in this file + a test; the config's
choices (rakt/distill/config.py AdaptConfig.mode) are this registry's names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from rakt.distill.teacher.inputs import Labelled, load_embeddings, load_images
from rakt.distill.teacher.fit import fit_images, fit_linear, zeroshot_weights
from rakt.distill.teacher.model import AdaptedTeacher, encoder_config, new_teacher
from rakt.distill.config import AdaptConfig
from rakt.pipeline.config import ConfigError, EncoderConfig
from rakt.pipeline.encoders import encoder_model_id, load_image_encoder, load_text_encoder, require_text_tower
from rakt.pipeline.io import InputError
from rakt.pipeline.formats import read_classes
from rakt.pipeline.prompts import load_templates
from rakt.pipeline.sources import open_source
from rakt.registry import Registry

log = logging.getLogger("rakt")

TRAIN_LOGIT_SCALE = 10.0  # reprogram/finetune heads act on unit features; a fixed scale lets logits grow fast
ZEROSHOT_LOGIT_SCALE = 100.0


@dataclass
class Fitted:
    """What a mode's fit returns: the teacher, its classes, how many training samples, fit details for the report,
    and the training samples its reader skipped, by reason."""
    teacher: AdaptedTeacher
    classes: list[str]
    train_count: int
    info: dict
    skipped: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdaptMode:
    """A registered adapt mode.

    inputs: "embeddings" (the backbone is left as it is: embedding sets can stand for images, for eval too) or
    "images" (the mode changes the backbone's input or weights: labelled --train images, image --eval only).
    prompt / trains_backbone: the teacher's shape (a padding visual prompt; a trainable backbone).
    check(cfg): the mode's own config checks (raise ConfigError)."""
    name: str
    fit: Callable[[AdaptConfig], Fitted]
    help: str
    inputs: str
    prompt: bool = False
    trains_backbone: bool = False
    default_lr: float = 0.0
    check: Callable[[AdaptConfig], None] | None = None


ADAPT_MODES: Registry[AdaptMode] = Registry("adapt mode", error=InputError)
INPUTS = ("embeddings", "images")


def register(name: str, *, help: str, inputs: str, prompt: bool = False, trains_backbone: bool = False,
             default_lr: float = 0.0, check: Callable[[AdaptConfig], None] | None = None) -> Callable:
    """Decorator: register `fit` as adapt mode `name`."""
    if inputs not in INPUTS:
        raise ValueError(f"adapt mode {name!r}: inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")

    return ADAPT_MODES.register(name, lambda fit: AdaptMode(name, fit, help, inputs, prompt, trains_backbone,
                                                           default_lr, check))


def get_mode(name: str) -> AdaptMode:
    """The registered mode `name`; an unknown name raises InputError with the choices."""
    return ADAPT_MODES.lookup(name)


def build_teacher(cfg: EncoderConfig, num_classes: int, mode: str, **kwargs) -> AdaptedTeacher:
    """An AdaptedTeacher shaped as adapt mode `mode` says (distill.teacher.model.new_teacher takes the rest)."""
    spec = get_mode(mode)
    return new_teacher(cfg, num_classes, mode, prompt=spec.prompt, trains_backbone=spec.trains_backbone, **kwargs)


def _check_linear(cfg: AdaptConfig) -> None:
    if not (cfg.embeddings or cfg.train):
        raise ConfigError("rakt adapt --mode linear: give --embeddings (a train embedding set from `rakt embed`) "
                          "or --train images")


def _resolve_classes(cfg: AdaptConfig, found: list[str] | None, where: str) -> list[str]:
    if cfg.classes:
        classes = read_classes(cfg.classes)
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


@register("linear", inputs="embeddings", check=_check_linear,
          help="logistic-regression probe on frozen embeddings")
def linear(cfg: AdaptConfig) -> Fitted:
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
        data = Labelled(_image_features(teacher, data.x, cfg.batch_size), data.y, classes, data.ids, data.skipped)
    w, b, info = fit_linear(data.x, data.y, len(classes), weight_decay=cfg.weight_decay, holdout=cfg.holdout,
                            seed=cfg.seed)
    with torch.no_grad():
        teacher.head.weight.copy_(w)
        teacher.head.bias.copy_(b)
    return Fitted(teacher, classes, len(data.y), info, data.skipped)


@torch.inference_mode()
def _image_features(teacher: AdaptedTeacher, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = teacher.logit_scale.device
    return torch.cat([teacher.features(images[i:i + batch_size].float().div(255).to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


@register("zeroshot", inputs="embeddings", check=require_text_tower,
          help="open_clip text head from class names x templates")
def zeroshot(cfg: AdaptConfig) -> Fitted:
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
    return Fitted(teacher, classes, 0, {"templates": len(load_templates(cfg.templates))})


@register("reprogram", inputs="images", prompt=True, default_lr=0.01,
          help="frozen backbone + learned padding visual prompt + linear output mapping (TDMR)")
def reprogram(cfg: AdaptConfig) -> Fitted:
    return _trained(cfg)


@register("finetune", inputs="images", trains_backbone=True, default_lr=0.01, help="backbone + linear head")
def finetune(cfg: AdaptConfig) -> Fitted:
    return _trained(cfg)


def _trained(cfg: AdaptConfig) -> Fitted:
    teacher = build_teacher(cfg, 1, cfg.mode, prompt_size=cfg.prompt_size)  # the head is replaced once the classes are known
    data = _train_images(cfg, teacher.input_size)
    classes = _resolve_classes(cfg, data.classes, ", ".join(cfg.train))
    teacher.head = torch.nn.Linear(teacher.dim, len(classes)).to(teacher.logit_scale.device)
    teacher.logit_scale.fill_(TRAIN_LOGIT_SCALE)
    probe = _init_head(teacher, data, cfg)
    lr = cfg.lr or ADAPT_MODES[cfg.mode].default_lr
    losses = fit_images(teacher, data.x, data.y, epochs=cfg.epochs, lr=lr, weight_decay=max(cfg.weight_decay, 0.0),
                        batch_size=cfg.batch_size, seed=cfg.seed, backbone_lr=cfg.backbone_lr)
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    return Fitted(teacher, classes, len(data.y), {"lr": lr, "epochs": cfg.epochs, "losses": [round(v, 5) for v in losses],
                                                   "trainable": trainable, "init_probe": probe}, data.skipped)


def _init_head(teacher: AdaptedTeacher, data: Labelled, cfg: AdaptConfig) -> dict:
    """Start the head from a linear probe on the starting features (LP-FT: the backbone or prompt is then not
    pulled around by a random head). For reprogram these are the features with the initial (grey) prompt."""
    feats = _image_features(teacher, data.x, cfg.batch_size)
    w, b, info = fit_linear(feats, data.y, teacher.head.out_features, holdout=cfg.holdout, seed=cfg.seed)
    with torch.no_grad():
        teacher.head.weight.copy_(w / teacher.logit_scale)
        teacher.head.bias.copy_(b / teacher.logit_scale)
    return info
