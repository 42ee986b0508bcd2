"""The stage registry: every stage's name, config class, module and one-line help, read by the CLI (`rakt NAME`)
and by `rakt run` (its steps). A stage module has `run(cfg) -> dict` (the summary it prints and records).

To add a stage: its config dataclass, its module with `run`, and one entry here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from distill.config import DistillConfig, EvaluateConfig, FinetuneConfig, InitConfig
from pipeline.config import (AdaptConfig, CurateConfig, DownloadConfig, EmbedConfig, IndexBuildConfig, LabelledConfig,
                             MaterializeConfig, RetrieveConfig, SampleConfig)


@dataclass(frozen=True)
class Stage:
    config: type    # the config dataclass (its fields are the CLI flags and the run config's section)
    module: str     # the module whose `run(cfg)` runs the stage (imported when the stage runs)
    help: str       # one line for `rakt --help`
    function: str = "run"

    def runner(self) -> Callable[[Any], dict]:
        return getattr(importlib.import_module(self.module), self.function)


STAGES: dict[str, Stage] = {
    "labelled": Stage(LabelledConfig, "pipeline.labelled", "write the few-shot draw of labelled target images as "
                                                           "one WebDataset shard"),
    "embed": Stage(EmbedConfig, "pipeline.embed", "embed images with an open_clip (or timm) image encoder into an "
                                                  "embedding set"),
    "index": Stage(IndexBuildConfig, "pipeline.index_build", "build a FAISS index directory from a pool of images "
                                                             "or embeddings"),
    "retrieve": Stage(RetrieveConfig, "pipeline.retrieve", "query an index with a target embedding set: top-k "
                                                           "neighbours per query"),
    "curate": Stage(CurateConfig, "pipeline.curate", "turn candidates into a transfer manifest under a budget"),
    "sample": Stage(SampleConfig, "pipeline.sample", "draw a uniform random transfer manifest from an index's pool or "
                                                     "from shards (random-pool and target-unlabelled baselines)"),
    "materialize": Stage(MaterializeConfig, "pipeline.materialize", "write a transfer manifest over a local pool "
                                                                    "into WebDataset shards"),
    "download": Stage(DownloadConfig, "pipeline.download", "download a transfer manifest's URLs into WebDataset "
                                                           "shards (img2dataset)"),
    "adapt": Stage(AdaptConfig, "distill.teacher", "adapt the teacher to the target task: linear probe, zero-shot "
                                                   "head, reprogram, finetune"),
    "init": Stage(InitConfig, "distill.init", "a randomly initialised student checkpoint (the labelled-only arm)"),
    "distill": Stage(DistillConfig, "distill.distill_stage", "distill the adapted teacher into a small timm student "
                                                             "on the transfer set", "run_distill"),
    "finetune": Stage(FinetuneConfig, "distill.distill_stage", "finetune a distilled student on the labelled "
                                                               "target images", "run_finetune"),
    "evaluate": Stage(EvaluateConfig, "distill.evaluate", "accuracy, per-class accuracy and confusion matrix of a "
                                                          "student on labelled target test images"),
}
