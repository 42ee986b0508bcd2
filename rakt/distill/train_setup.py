"""What `rakt distill` and `rakt finetune` share: torch.distributed from torchrun's environment (gloo on CPU, nccl
on GPU; rank 0 writes checkpoints, metrics and the student), the loop settings from a config, batch preparation
and the labelled images in memory."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from rakt.distill.image_bank import ImageBank, bank_from_tensors
from rakt.distill.losses import teacher_outputs
from rakt.distill.mixing import apply_mix, mix_teacher_outputs, mix_weight
from rakt.distill.teacher.inputs import load_images
from rakt.distill.train_loop import Prepare, TrainSettings
from rakt.distill.teacher_cache import teacher_input
from rakt.distill.views import render
from rakt.pipeline.config import ConfigError
from rakt.pipeline.device import channels_last, resolve_device


def owns_process_group(run: Callable) -> Callable:
    """A stage's run: destroys the torch.distributed process group afterwards when the run created it."""
    @functools.wraps(run)
    def wrapper(cfg):
        owned = not torch.distributed.is_initialized()
        try:
            return run(cfg)
        finally:
            if owned and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return wrapper


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


def settings(cfg, steps_per_epoch: int, meta: dict) -> TrainSettings:
    return TrainSettings(out=cfg.out, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, warmup=cfg.warmup, clip=cfg.clip, ema=cfg.ema,
                         device=cfg.device, precision=cfg.precision, seed=cfg.seed,
                         checkpoint_every=cfg.checkpoint_every, compile=cfg.compile, resume=cfg.resume, meta=meta)


def make_prepare(size: int, teacher=None, temperature: float = 1.0) -> Prepare:
    """prepare() of a batch {"unlabelled": ..., "labelled": ...} (either may be missing; rakt/distill/batches.py batches):
    each part's views rendered on the device at the student's `size`, labels (the unlabelled part's set to -1), and
    with a teacher the teacher's outputs: cached ones from the batch, else the teacher run on the same views.
    A part with a "mix" (rakt/distill/mixing.py) is mixed alike at both sizes, its labels set to -1 (no hard-label CE on
    a mixed image), and the online teacher runs on the mixed image (function matching); cached outputs are mixed
    as tempered class distributions at `temperature` (an approximation)."""
    def prepare(batch: dict, device: torch.device, epoch: int) -> dict:
        images, labels, outs = [], [], []
        for name in ("unlabelled", "labelled"):
            part = batch.get(name)
            if part is None:
                continue
            source = part["source"].to(device, non_blocking=True)
            mix = part.get("mix")
            view = render(source, part["theta"], size)
            images.append(apply_mix(view, mix) if mix is not None else view)
            labels.append(part["labels"].clamp(max=-1) if name == "unlabelled" or mix is not None else part["labels"])
            if "teacher_logits" in part:
                out = {k.removeprefix("teacher_"): v for k, v in part.items() if k.startswith("teacher_")}
                outs.append(mix_teacher_outputs(out, mix, mix_weight(mix, size), temperature) if mix is not None
                            else out)
            elif teacher is not None:
                seen = teacher_input(teacher, source, part["theta"])
                outs.append(teacher_outputs(teacher, apply_mix(seen, mix) if mix is not None else seen))
        kwargs = {"images": channels_last(torch.cat(images)), "labels": torch.cat(labels).to(device)}
        if outs:
            keys = set.intersection(*(set(o) for o in outs))
            kwargs["teacher_out"] = {k: torch.cat([o[k].to(device).float() for o in outs]) for k in sorted(keys)}
        return kwargs
    return prepare


def check_config(cfg) -> None:
    """The training settings distill and finetune share; the error names every one out of its range."""
    rules = {"epochs": (cfg.epochs >= 1, ">= 1"), "batch_size": (cfg.batch_size >= 1, ">= 1"),
             "lr": (cfg.lr > 0, "> 0"), "warmup": (cfg.warmup >= 0, ">= 0"), "ema": (0 <= cfg.ema < 1, "in [0, 1)"),
             "crop_scale": (0 < cfg.crop_scale <= 1, "in (0, 1]")}
    bad = [f"'{name}' must be {rule}, got {getattr(cfg, name)}" for name, (ok, rule) in rules.items() if not ok]
    if bad:
        raise ConfigError("; ".join(bad))


def labelled_bank(specs: list[str], size: int, *, classes_file: str, per_class: int, seed: int,
                   split: str = "") -> ImageBank:
    """The labelled target images in memory (few-shot draw of `per_class` with `seed`)."""
    data = load_images(specs, classes_file=classes_file, per_class=per_class, seed=seed, split=split,
                       size=max(size, 32))
    return bank_from_tensors(data.x, data.y, data.classes, data.ids)


def draw_seed(cfg) -> int:
    return cfg.draw_seed if cfg.draw_seed >= 0 else cfg.seed


