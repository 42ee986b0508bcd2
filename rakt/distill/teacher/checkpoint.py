"""The adapted teacher's checkpoint: what was learned (head, prompt, finetuned backbone) and the meta needed to
rebuild the rest (encoder config, mode, classes); the backbone comes back through pipeline.encoders."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rakt.distill.teacher.model import FORMAT, AdaptedTeacher
from rakt.distill.teacher.modes import build_teacher
from rakt.pipeline.config import EncoderConfig
from rakt.pipeline.encoders import encoder_model_id
from rakt.pipeline.io import InputError, save_torch

log = logging.getLogger("rakt")


def save_teacher(path: str | Path, teacher: AdaptedTeacher, meta: dict) -> None:
    """Write meta (encoder config, mode, classes, ...) + the trainable state atomically to `path`."""
    payload = {"format": FORMAT, "meta": dict(meta), "state": teacher.trainable_state()}
    save_torch(payload, path)
    log.info("saved %s teacher (%d classes) to %s", teacher.mode, teacher.head.out_features, path)


def read_teacher_meta(path: str | Path) -> dict:
    """The meta dict of a teacher checkpoint (loads no backbone)."""
    return _read(path)["meta"]


def _read(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise InputError(f"teacher checkpoint {path} not found; write one with `rakt adapt --out {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors alike: one clear message
        raise InputError(f"{path}: not a readable teacher checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a rakt teacher checkpoint (written by `rakt adapt`)")
    return payload


def load_teacher(path: str | Path, device: str = "auto", classes: list[str] | None = None,
                 precision: str = "auto") -> AdaptedTeacher:
    """Rebuild a teacher from its checkpoint: the backbone through pipeline.encoders, then the saved state.

    The result is in eval mode with every parameter frozen (a teacher to distill from). With `classes`,
    a checkpoint made for another class list is refused."""
    payload = _read(path)
    meta, state = payload["meta"], payload["state"]
    enc = meta["encoder"]
    saved = meta.get("classes") or []
    if classes is not None and list(classes) != list(saved):
        raise InputError(f"teacher {path} was adapted to {len(saved)} classes ({', '.join(saved[:4])}, ...) but "
                         f"{len(classes)} classes ({', '.join(classes[:4])}, ...) were asked for; adapt a teacher "
                         f"on this class list")
    for key in ("model", "pretrained"):
        value = enc.get(key) or ""
        if (value.endswith((".json", ".safetensors", ".pt", ".pth", ".bin")) or os.sep in value) \
                and not os.path.exists(value):
            raise InputError(f"teacher {path} was built on {key} {value}, which no longer exists; the checkpoint "
                             f"stores only the adapted parts, so restore that file (or adapt again)")
    cfg = EncoderConfig(model=enc["model"], pretrained=enc["pretrained"], image_size=int(enc["image_size"]),
                        device=device, precision=precision)
    model_id = encoder_model_id(cfg)
    if meta.get("model_id") and model_id != meta["model_id"]:
        raise InputError(f"teacher {path} was adapted on backbone {meta['model_id']}, but {model_id} is what those "
                         f"settings load now (the checkpoint file changed?); adapt again")
    teacher = build_teacher(cfg, len(saved), meta["mode"], prompt_size=int(meta.get("prompt_size") or 0),
                            bias="head.bias" in state)
    missing, unexpected = teacher.load_state_dict(state, strict=False)
    expected = set(teacher.trainable_state())
    if unexpected or expected - set(state):
        raise InputError(f"teacher {path}: its state does not fit the rebuilt model "
                         f"(missing {sorted(expected - set(state))[:3]}, unexpected {unexpected[:3]})")
    teacher.requires_grad_(False)
    return teacher.eval()
