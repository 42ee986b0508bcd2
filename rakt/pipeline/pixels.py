"""An encoder's eval transform (resize the shorter side, center crop, normalize) on batches of tensors.

`PixelPipeline.from_transform` reads the sizes and the normalization from an open_clip/timm transform; `exact`
does so only when the transform holds nothing else, so that a whole batch can go through `__call__` in place of
the per-image PIL transform (`rakt embed`, the adapted teacher). Resampling is torch's bicubic with antialiasing,
PIL's kernel: on uint8 images within two levels of PIL's result, on [0, 1] floats within a few levels.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from rakt.pipeline.io import InputError

# steps of an eval transform that `exact` accepts besides resize, crop and normalize: PIL image -> [0, 1] tensor
TO_TENSOR = {"ToTensor", "MaybeToTensor", "MaybeConvertMode", "_convert_to_rgb"}


@dataclasses.dataclass
class PixelPipeline:
    """The tensor version of an encoder's eval transform."""
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, preprocess: Callable) -> "PixelPipeline":
        steps = getattr(preprocess, "transforms", [])
        resize = next((t.size for t in steps if isinstance(t, T.Resize)), None)
        crop = next((t.size for t in steps if isinstance(t, T.CenterCrop)), None)
        norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
        if crop is None or norm is None:
            raise InputError(f"cannot read the input size and normalization from the encoder's transform {preprocess}")
        crop = int(crop[0] if isinstance(crop, (tuple, list)) else crop)
        resize = int(resize[0] if isinstance(resize, (tuple, list)) else resize or crop)
        mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten())
        std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten())
        return cls(resize, crop, mean, std)

    @classmethod
    def exact(cls, preprocess: Callable) -> "PixelPipeline | None":
        """The pipeline when `preprocess` is exactly a shorter-side bicubic resize, a center crop, a conversion to
        a tensor and a normalization (in that order); None for anything else (run it per image instead)."""
        steps = list(getattr(preprocess, "transforms", None) or [])
        kinds = [_kind(t) for t in steps]
        if [k for k in kinds if k != "tensor"] != ["resize", "crop", "norm"] or "tensor" not in kinds \
                or kinds.index("tensor") > kinds.index("norm"):
            return None
        resize = next(t for t in steps if isinstance(t, T.Resize))
        one_side = isinstance(resize.size, int) or len(resize.size) == 1
        if not one_side or resize.max_size or resize.interpolation != T.InterpolationMode.BICUBIC:
            return None
        return cls.from_transform(preprocess)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] (resized as uint8, as PIL does: fastest channels_last), or [0, 1] floats ->
        the normalized [B, 3, crop, crop] the encoder takes."""
        x = center_crop(resize_short(x, self.resize), self.crop)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _kind(step: Callable) -> str:
    if isinstance(step, T.Resize):
        return "resize"
    if isinstance(step, T.CenterCrop):
        return "crop"
    if isinstance(step, T.Normalize):
        return "norm"
    return "tensor" if getattr(step, "__name__", type(step).__name__) in TO_TENSOR else "other"


def resize_short(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side is `size` (bicubic, antialiased; floats clamped to [0, 1], uint8 rounded
    and saturated as PIL does)."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # torchvision's rounding
    out = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
    return out if x.dtype == torch.uint8 else out.clamp(0, 1)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision's CenterCrop
    return x[..., top:top + size, left:left + size]
