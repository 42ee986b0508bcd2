"""The adapted teacher: a backbone from rakt.pipeline.encoders + a head (+ a visual prompt), and its checkpoint.

`AdaptedTeacher(x)` takes float images in [0, 1] of any size ([B, 3, H, W]); it resizes and normalizes them
itself, so the same augmented view can be fed to the teacher and to a student. Pixels go through the tensor
counterpart of the encoder's own eval transform (resize the shorter side, center crop, normalize), so the
features match the embedding sets `rakt embed` wrote with that encoder (up to PIL vs. torch resampling).

Heads act on L2-normalized features: logits = logit_scale * head(normalize(features)).
Reprogram (TDMR) uses a *padding* visual prompt: the image is resized into the central
(size - 2 * prompt_size) square and a learnable border `prompt_size` px wide surrounds it (VP, Bahng et al.);
the prompt lives in normalized pixel units and starts at 0 (mid grey).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from rakt.pipeline.config import EncoderConfig
from rakt.pipeline.device import autocast
from rakt.pipeline.encoders import TIMM_PREFIX, ImageEncoder, load_image_encoder
from rakt.pipeline.io import InputError
from rakt.pipeline.pixels import PixelPipeline, center_crop, resize_short

log = logging.getLogger("rakt")

ENCODER_KEYS = ("model", "pretrained", "image_size")
FORMAT = "rakt-teacher/1"


class PaddingPrompt(nn.Module):
    """A learnable border of `width` px around the image resized into the center (normalized units)."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        if width < 1 or 2 * width >= size:
            raise InputError(f"prompt_size {width} must be at least 1 and below half the input size {size}")
        self.size, self.width = size, width
        self.prompt = nn.Parameter(torch.zeros(1, 3, size, size))
        mask = torch.ones(1, 1, size, size)
        mask[..., width:size - width, width:size - width] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, inner: torch.Tensor) -> torch.Tensor:
        """`inner`: normalized images [B, 3, size - 2*width, size - 2*width] -> prompted [B, 3, size, size]."""
        w = self.width
        return F.pad(inner, (w, w, w, w)) + self.prompt * self.mask


class AdaptedTeacher(nn.Module):
    """Backbone + head (+ prompt): forward(x) -> logits, features(x) -> L2-normalized embedding."""

    def __init__(self, backbone: nn.Module, encode: str, dim: int, num_classes: int, pixels: PixelPipeline,
                 *, mode: str, logit_scale: float = 1.0, prompt_size: int = 0, bias: bool = True,
                 model_id: str = "", prompt: bool = False, trains_backbone: bool = False) -> None:
        super().__init__()
        self.backbone, self.encode, self.dim, self.pixels, self.mode = backbone, encode, dim, pixels, mode
        self.model_id = model_id  # the backbone's embedding-space id (pipeline.encoders.encoder_model_id)
        self.head = nn.Linear(dim, num_classes, bias=bias)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.prompt = PaddingPrompt(pixels.crop, prompt_size) if prompt else None
        self.register_buffer("mean", torch.tensor(pixels.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pixels.std).view(1, 3, 1, 1), persistent=False)
        self.backbone_trainable = trains_backbone
        self.backbone.requires_grad_(self.backbone_trainable)
        self.autocast_dtype: torch.dtype | None = None  # the backbone's autocast (--precision), set by build_teacher
        self.memory_format = torch.channels_last  # of the backbone's input (and weights, pipeline.encoders)
        self.train(False)

    @property
    def input_size(self) -> int:
        return self.pixels.crop

    def train(self, mode: bool = True) -> "AdaptedTeacher":
        """A frozen backbone stays in eval mode whatever the caller asks; a finetuned one keeps its batch-norm
        statistics frozen too (few-shot batches would overwrite them)."""
        super().train(mode)
        self.backbone.train(mode and self.backbone_trainable)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size -> the backbone's normalized input (with the prompt when reprogramming)."""
        x = x.float()
        if self.prompt is not None:
            inner = self.input_size - 2 * self.prompt.width
            x = F.interpolate(x, size=(inner, inner), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            return self.prompt((x - self.mean) / self.std)
        x = center_crop(resize_short(x, self.pixels.resize), self.pixels.crop)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized backbone embedding of [0, 1] images."""
        return self.embed(self.normalize(x))

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """L2-normalized backbone embedding of the backbone's input (what `normalize` gives)."""
        inputs = inputs.contiguous(memory_format=self.memory_format)
        with autocast(inputs.device, self.autocast_dtype):
            out = self.backbone.encode_image(inputs) if self.encode == "encode_image" else self.backbone(inputs)
        return F.normalize(out.float(), dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(x))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: head (+ prompt), and the whole backbone when it was finetuned."""
        keep = ("head.", "logit_scale", "prompt.") + (("backbone.",) if self.backbone_trainable else ())
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith(keep)}


def encoder_config(cfg: EncoderConfig) -> EncoderConfig:
    """The plain encoder part of a (stage) config."""
    return EncoderConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EncoderConfig)})


def new_teacher(cfg: EncoderConfig, num_classes: int, mode: str, *, prompt: bool, trains_backbone: bool,
                logit_scale: float = 1.0, prompt_size: int = 0, bias: bool = True,
                encoder: ImageEncoder | None = None) -> AdaptedTeacher:
    """An AdaptedTeacher around the encoder `cfg` names (built once through pipeline.encoders, or the given
    `encoder` of that config), on its device; distill.teacher.modes.build_teacher shapes it as a mode says."""
    encoder = encoder or load_image_encoder(encoder_config(cfg))
    is_timm = cfg.model.startswith(TIMM_PREFIX)
    teacher = AdaptedTeacher(encoder.model, "forward" if is_timm else "encode_image", encoder.dim, num_classes,
                             PixelPipeline.from_transform(encoder.preprocess), mode=mode,
                             logit_scale=logit_scale, prompt_size=prompt_size, bias=bias, model_id=encoder.model_id,
                             prompt=prompt, trains_backbone=trains_backbone)
    teacher.autocast_dtype = encoder.autocast_dtype
    return teacher.to(encoder.device)
