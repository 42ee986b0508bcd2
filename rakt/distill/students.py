"""Students from timm by name (random init), their input normalization, and the student checkpoint file.

A `StudentModel` takes images as float [0, 1] tensors [B, 3, H, W] (the same augmented view the teacher
sees), resizes them to its own input size when that differs and normalizes them with its own mean/std,
then runs the timm network: `forward(x)` gives class logits, `features(x)` the pooled pre-logits features.

Student checkpoint (`save_student` / `load_student`): a `torch.save` of
{"arch", "num_classes", "small_input", "image_size", "state_dict", "meta"}, where `state_dict` is the
StudentModel's (the timm network under "net.").
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rakt.pipeline.io import InputError, save_torch

log = logging.getLogger("rakt")

CHECKPOINT_KEYS = ("arch", "num_classes", "small_input", "state_dict")


class StudentModel(nn.Module):
    """A timm classifier with its input normalization (and resize) inside the module."""

    def __init__(self, net: nn.Module, arch: str, num_classes: int, *, small_input: bool = False,
                 image_size: int = 0, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.net = net
        self.arch = arch
        self.num_classes = num_classes
        self.small_input = small_input
        self.image_size = image_size  # 0 = feed images at whatever size they come
        # size of features(): timm's head_hidden_size where a head has its own hidden layer (MobileNetV3)
        self.num_features: int = int(getattr(net, "head_hidden_size", 0) or net.num_features)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> resized (if needed) and normalized network input. Normalizing is per-channel affine and
        bilinear resizing averages with weights summing to 1, so the order does not change the result: whichever
        is smaller, the input or the output, is normalized."""
        if self.image_size and x.shape[-1] < self.image_size:
            return resize_input(self._normalize(x), self.image_size)
        return self._normalize(resize_input(x, self.image_size))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits features [B, num_features]."""
        return self.net.forward_head(self.net.forward_features(self.prepare(x)), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.net(self.prepare(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features) from one pass through the backbone."""
        pooled = self.net.forward_head(self.net.forward_features(self.prepare(x)), pre_logits=True)
        return self.net.get_classifier()(pooled), pooled


def resize_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] images -> size x size as the student resizes them (bilinear, antialiased when shrinking); 0 = as is."""
    if size and x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    return x


def create_student(name: str, num_classes: int, *, checkpoint: str = "", small_input: bool = False,
                   image_size: int = 0) -> StudentModel:
    """A randomly initialised timm model `name` wrapped as a StudentModel.

    small_input: adapt the stem to 32-px images (timm ResNets only) and feed 32-px input.
    image_size: the input side the student resizes to (0 = its timm default; 32 with small_input).
    checkpoint: a local file with weights for this architecture (a student checkpoint from `save_student`,
    a bare state_dict, or {"state_dict": ...}); another architecture's weights raise InputError.
    """
    if num_classes < 1:
        raise InputError(f"student {name}: num_classes must be at least 1, got {num_classes}")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise InputError(f"student {name}: {e}; list names with timm.list_models()") from None
    if small_input:
        adapt_small_input(net, name)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    size = image_size or (32 if small_input else int(cfg.get("input_size", (3, 224, 224))[-1]))
    model = StudentModel(net, name, num_classes, small_input=small_input, image_size=size,
                         mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                         std=tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def adapt_small_input(net: nn.Module, name: str = "") -> None:
    """CIFAR-style stem in place: first conv 3x3 stride 1, no max-pool. Only timm ResNets are handled."""
    if not isinstance(net, timm.models.resnet.ResNet):
        raise InputError(f"student {name or type(net).__name__}: small_input is implemented for timm ResNets "
                         f"(resnet18, resnet10t, ...), not {type(net).__name__}; use a ResNet or feed larger images")
    stem = net.conv1
    first = stem[0] if isinstance(stem, nn.Sequential) else stem
    if not isinstance(first, nn.Conv2d):
        raise InputError(f"student {name}: unexpected ResNet stem ({type(first).__name__}); small_input not applied")
    conv = nn.Conv2d(first.in_channels, first.out_channels, kernel_size=3, stride=1, padding=1,
                     bias=first.bias is not None)
    if isinstance(stem, nn.Sequential):
        stem[0] = conv
    else:
        net.conv1 = conv
    net.maxpool = nn.Identity()


def _state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: not a state_dict or a rakt student checkpoint")
    return obj


def load_weights(model: StudentModel, path: str) -> None:
    """Load weights into `model`, refusing a checkpoint of another architecture (key/shape mismatch)."""
    blob = _torch_load(path)
    if isinstance(blob, dict) and all(k in blob for k in CHECKPOINT_KEYS):  # a rakt student checkpoint
        saved = (blob["arch"], int(blob["num_classes"]), bool(blob["small_input"]))
        if saved != (model.arch, model.num_classes, model.small_input):
            raise InputError(f"{path}: a checkpoint of student {saved[0]} (num_classes={saved[1]}, "
                             f"small_input={saved[2]}), not of {model.arch} (num_classes={model.num_classes}, "
                             f"small_input={model.small_input}); create the student it was saved from")
    state = _state_dict_of(blob, path)
    if state and not any(k.startswith("net.") for k in state):
        state = {"net." + k: v for k, v in state.items()}  # a bare timm state_dict
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise InputError(f"{path}: weights do not fit student {model.arch} (num_classes={model.num_classes}, "
                         f"small_input={model.small_input}): {len(missing)} missing keys, {len(unexpected)} "
                         f"unexpected keys, {len(shapes)} shape mismatches (e.g. {example.removeprefix('net.')}); "
                         f"is it a checkpoint of another architecture?")
    model.load_state_dict(state)
    log.info("student %s: loaded weights from %s", model.arch, path)


def _torch_load(path: str) -> Any:
    if not Path(path).is_file():
        raise InputError(f"student checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors of a file that is not a torch checkpoint
        raise InputError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}: {e})") from None


def save_student(path: str | Path, model: StudentModel, meta: dict | None = None) -> None:
    """Write a student checkpoint atomically (arch, num_classes, small_input, image_size, state_dict, meta)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"arch": model.arch, "num_classes": model.num_classes, "small_input": model.small_input,
            "image_size": model.image_size, "state_dict": state, "meta": dict(meta or {})}
    save_torch(blob, path)


def load_student(path: str | Path, *, arch: str = "") -> tuple[StudentModel, dict]:
    """(model in eval mode, meta) from a `save_student` file; `arch` given and different -> InputError."""
    blob = _torch_load(str(path))
    if not isinstance(blob, dict) or any(k not in blob for k in CHECKPOINT_KEYS):
        raise InputError(f"{path}: not a rakt student checkpoint (needs keys {', '.join(CHECKPOINT_KEYS)})")
    if arch and blob["arch"] != arch:
        raise InputError(f"{path}: a checkpoint of {blob['arch']}, not of the requested student {arch}")
    model = create_student(blob["arch"], int(blob["num_classes"]), small_input=bool(blob["small_input"]),
                           image_size=int(blob.get("image_size", 0)))
    load_weights(model, str(path))
    return model.eval(), dict(blob.get("meta") or {})
