"""`init`: a randomly initialised student checkpoint for the labelled-only arm (classes from an embedding set)."""
from __future__ import annotations

from pathlib import Path

from rakt.distill.config import InitConfig
from rakt.distill.students import create_student, save_student
from rakt.distill.train_loop import seed_everything
from rakt.pipeline.formats import EMBEDDINGS_JSON
from rakt.pipeline.io import InputError, read_json


def run(cfg: InitConfig) -> dict:
    classes = read_json(Path(cfg.embeddings) / EMBEDDINGS_JSON, "embedding set").get("classes") or []
    if not classes:
        raise InputError(f"{cfg.embeddings}: the embedding set records no classes; the student needs the class count")
    seed_everything(cfg.seed)
    model = create_student(cfg.student, len(classes), small_input=cfg.small_input, image_size=cfg.image_size or None)
    save_student(cfg.out, model, {"stage": "init", "classes": classes, "seed": cfg.seed})
    return {"student": cfg.out, "classes": len(classes)}
