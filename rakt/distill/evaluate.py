"""`rakt evaluate`: accuracy, per-class accuracy and confusion matrix of a student checkpoint on the labelled target
test set (rakt/distill/accuracy.py computes them); it loads the checkpoint (rakt/distill/students.py) and writes the
report JSON atomically.
"""
from __future__ import annotations

import collections
import logging

from rakt.distill.accuracy import evaluate_model, labelled_batches
from rakt.distill.config import EvaluateConfig
from rakt.pipeline.config import to_dict
from rakt.pipeline.device import channels_last, resolve_device, set_threads
from rakt.pipeline.progress import Progress
from rakt.pipeline.io import InputError, prefetched, timed, write_json
from rakt.pipeline.sources import open_source

log = logging.getLogger("rakt")


def _load_model(cfg: EvaluateConfig, num_classes: int):
    """The student of cfg.checkpoint: a rakt student checkpoint, or bare weights for cfg.model."""
    from rakt.distill.students import create_student, load_student

    if cfg.model:
        if num_classes < 1:
            raise InputError("--model with bare weights needs the class count: pass --classes classes.txt")
        model = create_student(cfg.model, num_classes, checkpoint=cfg.checkpoint, small_input=cfg.small_input)
        return model.eval(), {}
    return load_student(cfg.checkpoint)


def run(cfg: EvaluateConfig) -> dict:
    """`rakt evaluate`: accuracy of a student checkpoint on labelled target images; writes cfg.out (JSON)."""
    if not cfg.checkpoint:
        raise InputError("rakt evaluate: a student checkpoint is required (from the trainer or save_student)")
    with timed("evaluate"):
        source = open_source(cfg.source, classes_file=cfg.classes)
        classes = source.classes
        model, meta = _load_model(cfg, len(classes) if classes else 0)
        num_classes = model.num_classes
        if classes is not None and len(classes) != num_classes:
            raise InputError(f"the source has {len(classes)} classes but the student {model.arch} predicts "
                             f"{num_classes}; evaluate on the target task it was trained for")
        set_threads(cfg.threads)
        device = resolve_device(cfg.device)
        model = channels_last(model.to(device))
        skipped: collections.Counter = collections.Counter()
        batches = prefetched(labelled_batches(source, cfg.split, model.image_size, cfg.batch_size, skipped))
        with Progress(None, "evaluate", unit="img") as bar:
            metrics = evaluate_model(model, batches, num_classes, device=device, precision=cfg.precision, progress=bar)
        if metrics["count"] == 0:
            raise InputError(f"{', '.join(cfg.source)}: no labelled images"
                             f"{' in split ' + repr(cfg.split) if cfg.split else ''} to evaluate on "
                             f"(skipped: {dict(skipped) or 'none'})")
    report = {**metrics, "classes": classes, "arch": model.arch, "checkpoint": cfg.checkpoint,
              "checkpoint_meta": meta, "source": cfg.source, "split": cfg.split, "skipped": dict(skipped),
              "config": to_dict(cfg)}
    write_json(cfg.out, report)
    log.info("evaluate: accuracy %.4f on %d images (%s)", metrics["accuracy"], metrics["count"], cfg.out)
    return {"accuracy": metrics["accuracy"], "count": metrics["count"], "skipped": dict(skipped), "out": cfg.out}
