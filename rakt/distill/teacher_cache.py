"""Teacher-output cache (`rakt distill --cache-teacher`): the teacher runs once per image and view, not per epoch.

Two kinds (`--teacher-view`):
- same:  V views of every image (view v drawn by generator(seed, "cache-view", v) over the bank, so it can be
         redrawn exactly); epoch e trains the student on view e mod V and reads the teacher's outputs on that
         very view (the same crop at each model's own resolution).
- clean: the teacher's outputs on the whole, un-augmented image (one view); the student trains on fresh views
         every epoch (light augmentations such as flips and small shifts barely move the teacher's answer).

Outputs (logits, and features when the mode needs them; float32) are written per view to
`{bank's decoded folder}/teacher-cache/{cache_id}/view-{v}.npz`, atomically; a view whose file exists is not
recomputed (the resume marker). cache_id hashes the teacher checkpoint, the bank's content (its decoded uint8
images, keys and labels: a rewritten shard can never meet outputs computed on its old images), the views and what
is stored.
A bank held only in memory (the labelled images) gets an in-memory cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from rakt.distill.image_bank import ImageBank, content_hash
from rakt.distill.batches import ViewSpec
from rakt.distill.losses import teacher_outputs
from rakt.distill.views import draw_views, generator, render, stable_seed
from rakt.pipeline.device import adapt_threads
from rakt.pipeline.io import atomic_path, file_hash, json_hash
from rakt.pipeline.progress import Progress

log = logging.getLogger("rakt")

CACHE_DIR = "teacher-cache"
TEACHER_VIEWS = ("same", "clean")


def teacher_input(teacher, source: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """The view `theta` of uint8 images rendered for the teacher: at its own resize side, bicubic (as its eval
    transform resizes); the teacher then center-crops and normalizes itself."""
    side = getattr(getattr(teacher, "pixels", None), "resize", 0) or source.shape[-1]
    return render(source, theta, side, mode="bicubic")


class TeacherCache:
    """Cached teacher outputs of a bank: `outputs(index, epoch)` -> {"teacher_logits", "teacher_features"}."""

    def __init__(self, kind: str, views: int, seed: int, spec: ViewSpec, side: int, logits: np.ndarray,
                 features: np.ndarray | None, ident: str) -> None:
        self.kind, self.views, self.seed, self.spec, self.side = kind, views, seed, spec, side
        self.logits, self.features, self.ident = logits, features, ident

    @property
    def shares_views(self) -> bool:
        """The student trains on the cached views themselves."""
        return self.kind == "same"

    def view_of(self, epoch: object) -> int:
        return epoch % self.views if isinstance(epoch, int) else stable_seed(epoch) % self.views

    def theta(self, view: int) -> torch.Tensor:
        return cache_views(self.kind, self.spec, view, self.seed, len(self.logits[0]), self.side)

    def outputs(self, index: torch.Tensor, epoch: object) -> dict[str, torch.Tensor]:
        v = self.view_of(epoch) if self.shares_views else 0
        rows = index.numpy()
        out = {"teacher_logits": torch.from_numpy(self.logits[v][rows])}
        if self.features is not None:
            out["teacher_features"] = torch.from_numpy(self.features[v][rows])
        return out


def cache_views(kind: str, spec: ViewSpec, view: int, seed: int, n: int, side: int) -> torch.Tensor | None:
    """theta of cached view `view` for all n bank rows (None: the whole image)."""
    if kind == "clean":
        return None
    return draw_views(n, spec.kind, generator(seed, "cache-view", view), scale=spec.scale, side=side)


def cache_id(teacher_path: str, bank: ImageBank, kind: str, views: int, spec: ViewSpec, seed: int,
             features: bool) -> str:
    """Short hash naming one cache: teacher file, bank, view kind and count, view seed, what is stored."""
    return json_hash({"teacher": file_hash(teacher_path), "bank": content_hash(bank), "rows": len(bank), "kind": kind,
                      "views": views, "spec": [spec.kind, spec.scale], "seed": seed, "features": features})


@torch.no_grad()
def _view_outputs(teacher, bank: ImageBank, theta: torch.Tensor | None, device: torch.device, batch_size: int,
                  features: bool, progress: Progress) -> tuple[np.ndarray, np.ndarray | None]:
    logits, feats = [], []
    for start in range(0, len(bank), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(bank)))
        images = teacher_input(teacher, bank.take(rows).to(device), None if theta is None else theta[rows])
        got = teacher_outputs(teacher, images)
        logits.append(got["logits"].float().cpu().numpy())
        if features:
            feats.append(got["features"].float().cpu().numpy())
        progress.update(len(rows))
        adapt_threads()
    return np.concatenate(logits), (np.concatenate(feats) if features else None)


def build_cache(teacher, bank: ImageBank, teacher_path: str, *, kind: str, views: int, spec: ViewSpec, seed: int,
                features: bool, device: torch.device, batch_size: int = 256, folder: Path | None = None) -> TeacherCache:
    """Teacher outputs for every cached view of the bank: read from `folder`/teacher-cache when there, else
    computed (and written there when `folder` is given). Under DDP every rank computes what is missing."""
    if kind not in TEACHER_VIEWS:
        raise ValueError(f"teacher view must be one of {', '.join(TEACHER_VIEWS)}, got {kind!r}")
    views = 1 if kind == "clean" else views
    ident = cache_id(teacher_path, bank, kind, views, spec, seed, features)
    where = folder / CACHE_DIR / ident if folder is not None else None
    logits, feats = [], []
    todo = [v for v in range(views) if where is None or not (where / f"view-{v}.npz").is_file()]
    progress = Progress(len(todo) * len(bank), "teacher cache", unit="img")
    for v in range(views):
        path = where / f"view-{v}.npz" if where is not None else None
        if v not in todo:
            with np.load(path) as z:
                logits.append(z["logits"])
                feats.append(z["features"] if features else None)
            continue
        theta = cache_views(kind, spec, v, seed, len(bank), bank.side)
        lv, fv = _view_outputs(teacher, bank, theta, device, batch_size, features, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, logits=lv, **({"features": fv} if features else {}))
        logits.append(lv)
        feats.append(fv)
    progress.close()
    if todo:
        log.info("teacher cache %s: %d view(s) x %d images computed (%s)", ident, len(todo), len(bank), kind)
    return TeacherCache(kind, views, seed, spec, bank.side, np.stack(logits),
                        np.stack(feats) if features else None, ident)
