"""The stage registry: every stage's name, config class, module and one-line help, read by the CLI (`rakt NAME`)
and by `rakt run` (its steps). A stage module's `run(cfg) -> dict` takes its config and returns the summary that
the CLI prints and `rakt run` records; its `check(cfg)`, if any, checks the settings alone (no input read).

Config classes and modules are named as strings and loaded when used, as entry points are: the packages depend
downward only (distill uses pipeline, never the reverse), and pipeline reaches distill's stages and KD modes
through this registry alone.

To add a stage: its config dataclass, its module, and one entry here.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.io import output_lock


@dataclass(frozen=True)
class Stage:
    config_name: str  # "module:Class" of the config dataclass (its fields: the CLI flags, the run config's section)
    module: str       # the module that runs the stage (imported when it runs)
    help: str         # one line for `rakt --help`

    @property
    def config(self) -> type:
        return _load(self.config_name)

    def runner(self) -> Callable[[Any], dict]:
        return importlib.import_module(self.module).run

    def check(self, cfg: Any) -> None:
        """The module's `check(cfg)`, if it has one: the checks of the settings alone, reading no input; `run`
        calls it first, and `rakt run` for every step before the first step runs."""
        check = getattr(importlib.import_module(self.module), "check", None)
        if check is not None:
            check(cfg)


def run_stage(name: str, cfg: Any) -> dict:
    """Run stage `name` with its config while holding the lock of its output (`cfg.out`): one writer at a time.
    Under torchrun the job's rank 0 holds it for every rank (the ranks of one job share one output)."""
    out = getattr(cfg, "out", "")
    if not out or os.environ.get("RANK", "0") != "0":
        return STAGES[name].runner()(cfg)
    with output_lock(out, f"output of `rakt {name}`"):
        return STAGES[name].runner()(cfg)


def _load(name: str) -> Any:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def kd_modes() -> dict:
    """The KD modes of `rakt distill` (distill/kd_modes.py: name -> KDMode), which are also the arms' methods."""
    return _load("distill.kd_modes:KD_MODES")


def adapt_modes() -> dict:
    """The adapt modes of `rakt adapt` (distill/teacher/modes.py: name -> AdaptMode, with the inputs each fits on)."""
    return _load("distill.teacher.modes:ADAPT_MODES")


STAGES: dict[str, Stage] = {
    "labelled": Stage("pipeline.config:LabelledConfig", "pipeline.labelled",
                      "write the few-shot draw of labelled target images as one WebDataset shard"),
    "carve": Stage("pipeline.config:CarveConfig", "pipeline.carve",
                   "carve a labelled target task (train + test shards) and the pool without it out of a pool by its "
                   "evaluation-only source/orig_label, e.g. Fashion-MNIST"),
    "embed": Stage("pipeline.config:EmbedConfig", "pipeline.embed",
                   "embed images with an open_clip (or timm) image encoder into an embedding set"),
    "index": Stage("pipeline.config:IndexBuildConfig", "pipeline.index",
                   "build a FAISS index directory from a pool of images or embeddings"),
    "retrieve": Stage("pipeline.config:RetrieveConfig", "pipeline.retrieve",
                      "query an index with a target embedding set: top-k neighbours per query"),
    "curate": Stage("pipeline.config:CurateConfig", "pipeline.curate.curate",
                    "turn candidates into a transfer manifest under a budget"),
    "sample": Stage("pipeline.config:SampleConfig", "pipeline.sample",
                    "draw a uniform random transfer manifest from an index's pool or from shards (random-pool and "
                    "target-unlabelled baselines)"),
    "materialize": Stage("pipeline.config:MaterializeConfig", "pipeline.materialize",
                         "write a transfer manifest over a local pool into WebDataset shards"),
    "download": Stage("pipeline.config:DownloadConfig", "pipeline.download.download",
                      "download a transfer manifest's URLs into WebDataset shards (img2dataset)"),
    "adapt": Stage("distill.config:AdaptConfig", "distill.teacher.adapt",
                   "adapt the teacher to the target task: linear probe, zero-shot head, reprogram, finetune"),
    "score": Stage("distill.config:ScoreConfig", "distill.teacher.score",
                   "the adapted teacher's class and probability for every retrieved candidate (teacher-aware "
                   "curation: `rakt curate --teacher-scores`)"),
    "init": Stage("distill.config:InitConfig", "distill.init",
                  "a randomly initialised student checkpoint (the labelled-only arm)"),
    "distill": Stage("distill.config:DistillConfig", "distill.distill",
                     "distill the adapted teacher into a small timm student on the transfer set"),
    "finetune": Stage("distill.config:FinetuneConfig", "distill.finetune",
                      "finetune a distilled student on the labelled target images"),
    "evaluate": Stage("distill.config:EvaluateConfig", "distill.evaluate",
                      "accuracy, per-class accuracy and confusion matrix of a student on labelled target test images"),
    "export": Stage("distill.config:ExportConfig", "distill.export",
                    "write the student as ONNX and TorchScript, check their accuracy, time them on the CPU"),
}
