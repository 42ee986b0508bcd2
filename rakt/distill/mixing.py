"""Mixup and CutMix of training batches for function matching (`rakt distill --mix`; Beyer et al., "Knowledge
distillation: a good teacher is patient and consistent", CVPR'22): the student and the teacher see the same mixed
image, so the student learns the teacher's function between images, not only on them.

A mix is drawn once per batch (rakt/distill/batches.py, from a generator seeded by (seed, "mix", epoch), so a resumed run
redraws it) as parameters {"kind", "perm", "lam" | "box"} that `apply_mix` applies to the batch's views at any
resolution: the student's and the teacher's images get the same partner and the same relative CutMix box.
Each image keeps the share `mix_weight` of its own content and takes the rest from its partner images[perm].

With a cached teacher its output on the mixed image is unknown; `mix_teacher_outputs` then mixes the teacher's
tempered class distributions (and features) of the two images instead: an approximation, not function matching.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rakt.distill.config import MIXES


@dataclass(frozen=True)
class MixSpec:
    """How batches are mixed: a kind of MIXES ("both": mixup or cutmix, 1/2 each per batch), the Beta(alpha, alpha)
    parameter of the mixing weight and the probability that a batch is mixed."""
    kind: str = "none"
    alpha: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {self.kind!r}")
        if not self.alpha > 0 or not 0 <= self.prob <= 1:
            raise ValueError(f"mix alpha must be > 0 and mix prob in [0, 1], got {self.alpha} and {self.prob}")

    def draw(self, n: int, gen: torch.Generator) -> dict | None:
        return draw_mix(n, self.kind, self.alpha, self.prob, gen) if self.kind != "none" else None


def draw_mix(n: int, kind: str, alpha: float, prob: float, gen: torch.Generator) -> dict | None:
    """The mix of one batch of n images, or None (not mixed: probability 1 - prob). {"kind": "mixup", "perm": [n],
    "lam"} or {"kind": "cutmix", "perm": [n], "box": [x0, y0, x1, y1] in [0, 1]} (the box takes 1 - lam of the area
    before clipping to the image, as in CutMix)."""
    if kind not in MIXES[1:]:
        raise ValueError(f"mix kind must be one of {', '.join(MIXES[1:])}, got {kind!r}")
    u = torch.rand(2, generator=gen).tolist()
    if u[0] >= prob:
        return None
    if kind == "both":
        kind = "mixup" if u[1] < 0.5 else "cutmix"
    lam = float(np.random.default_rng(int(torch.randint(1 << 62, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(n, generator=gen)
    if kind == "mixup":
        return {"kind": kind, "perm": perm, "lam": lam}
    cut = (1.0 - lam) ** 0.5
    centre = torch.rand(2, generator=gen)
    box = torch.cat([centre - cut / 2, centre + cut / 2]).clamp(0.0, 1.0)
    return {"kind": kind, "perm": perm, "box": box}


def _box_mask(box: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """bool [height, width]: the pixels inside the box, its edges rounded to this pixel grid."""
    x0, y0, x1, y1 = (box * torch.tensor([width, height, width, height])).round().long().tolist()
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def mix_weight(params: dict, size: int | tuple[int, int]) -> float:
    """lambda: the share of each image's own content; cutmix: the area outside the box at `size` px."""
    if params["kind"] == "mixup":
        return params["lam"]
    height, width = (size, size) if isinstance(size, int) else size
    return 1.0 - _box_mask(params["box"], height, width, torch.device("cpu")).float().mean().item()


def apply_mix(images: torch.Tensor, params: dict) -> torch.Tensor:
    """Float images [B, 3, H, W] mixed with their partners images[perm] (any resolution, one batched op)."""
    other = images[params["perm"].to(images.device)]
    if params["kind"] == "mixup":
        return images * params["lam"] + other * (1.0 - params["lam"])
    return torch.where(_box_mask(params["box"], *images.shape[-2:], images.device), other, images)


def mix_teacher_outputs(outputs: dict[str, torch.Tensor], params: dict, lam: float,
                        temperature: float) -> dict[str, torch.Tensor]:
    """Targets for a mixed batch from the teacher's outputs on the unmixed images (a cached teacher): logits
    T * log(lam * softmax(t_a / T) + (1 - lam) * softmax(t_b / T)), so that kd_loss's softmax(logits / T) is that
    mixture, and features mixed linearly; b = perm(a). An approximation of the teacher on the mixed image."""
    perm = params["perm"]
    out = {}
    if "logits" in outputs:
        p = torch.softmax(outputs["logits"].float() / temperature, dim=-1)
        q = lam * p + (1.0 - lam) * p[perm.to(p.device)]
        out["logits"] = temperature * q.clamp_min(torch.finfo(q.dtype).tiny).log()
    if "features" in outputs:
        f = outputs["features"].float()
        out["features"] = lam * f + (1.0 - lam) * f[perm.to(f.device)]
    return out
