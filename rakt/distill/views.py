"""Augmented views of image batches, drawn and rendered for the whole batch at once (no per-image Python work).

A view is an affine map from output to input coordinates, `theta` [N, 2, 3] in normalized [-1, 1] coordinates
(torch's affine_grid convention). `render` draws the views of a uint8 batch at any output size in one
`grid_sample` call, on whatever device the batch is on, so the same view can be shown to the student at its size
and to the teacher at its own. Kinds:

- none:  the whole image.
- shift: horizontal flip + a translation of up to 1/8 of the side (CIFAR's pad-and-crop, padded by reflection).
- crop:  horizontal flip + RandomResizedCrop (area fraction in (scale, 1), aspect ratio in (3/4, 4/3)).

Views come from a torch.Generator, so a seeded generator redraws them exactly (resume, teacher caches).
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

KINDS = ("none", "shift", "crop")
RATIO = (3 / 4, 4 / 3)
SHIFT = 1 / 8  # of the side


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text (no Python hash randomization)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded by `stable_seed(*parts)`."""
    return torch.Generator().manual_seed(stable_seed(*parts))


def draw_views(n: int, kind: str, gen: torch.Generator, *, scale: float = 0.6, side: int = 32) -> torch.Tensor:
    """theta [n, 2, 3] of n random views of `kind`; `side` (input px) sets the shift's pixel grid."""
    if kind not in KINDS:
        raise ValueError(f"view kind must be one of {', '.join(KINDS)}, got {kind!r}")
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if kind == "none" or n == 0:
        return theta
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    if kind == "shift":
        pad = max(1, round(side * SHIFT))
        px = torch.randint(-pad, pad + 1, (n, 2), generator=gen).float()
        theta[:, :, 2] = px * (2.0 / side)
    else:
        area = scale + (1.0 - scale) * torch.rand(n, generator=gen)
        log_ratio = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * torch.rand(n, generator=gen)
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        theta[:, 0, 0], theta[:, 1, 1] = w, h
        theta[:, 0, 2] = (1.0 - w) * (2 * torch.rand(n, generator=gen) - 1)
        theta[:, 1, 2] = (1.0 - h) * (2 * torch.rand(n, generator=gen) - 1)
    theta[:, 0, 0] *= flip
    return theta


def render(images: torch.Tensor, theta: torch.Tensor | None, size: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 (or [0, 1] float) images [B, 3, H, W] seen through `theta` at size x size -> float [B, 3, size, size]
    in [0, 1], sampled with `mode` (bilinear | bicubic). theta None = the whole image, resized (antialiased when
    shrinking)."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x.div_(255.0)
    if x.shape[-1] > 2 * size or x.shape[-2] > 2 * size:  # shrink first: bilinear sampling alone would alias
        x = F.interpolate(x, size=(2 * size, 2 * size), mode="bilinear", antialias=True, align_corners=False)
    if theta is None:
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode=mode, antialias=x.shape[-1] > size,
                             align_corners=False).clamp_(0, 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [x.shape[0], 3, size, size], align_corners=False)
    # reflection: what lies outside the image mirrors it (zeros would also darken every border pixel by a quarter)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False).clamp_(0, 1)
