"""The stage registry: every stage's name, config class, module and one-line help, read by the CLI (`rakt NAME`)
and by `rakt run` (its steps). A stage module's `run(cfg) -> dict` takes its config and returns the summary that
the CLI prints and `rakt run` records; its `check(cfg)`, if any, checks the settings alone (no input read).

This is the app layer: it imports the stage packages (rakt.pipeline, rakt.distill) as ordinary imports. A stage's
module is imported when the stage is used (its loader below), so that `rakt --help` does not load torch and the
models; the config classes are light and imported here.

To add a stage: its config dataclass, its module, a loader and one entry here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from rakt.distill.config import (AdaptConfig, DistillConfig, EvaluateConfig, ExportConfig, FinetuneConfig,
                                 InitConfig, ScoreConfig)
from rakt.pipeline.config import (CarveConfig, CurateConfig, DownloadConfig, EmbedConfig, IndexBuildConfig,
                                  LabelledConfig, MaterializeConfig, RetrieveConfig, SampleConfig)
from rakt.pipeline.io import output_lock
from rakt.registry import Registry


@dataclass(frozen=True)
class Stage:
    config: type                    # the config dataclass (its fields: the CLI flags, the run config's section)
    load: Callable[[], ModuleType]  # imports the module that runs the stage
    help: str                       # one line for `rakt --help`

    @property
    def module(self) -> str:
        """The dotted name of the stage's module (imports it)."""
        return self.load().__name__

    def runner(self) -> Callable[[Any], dict]:
        return self.load().run

    def check(self, cfg: Any) -> None:
        """The module's `check(cfg)`, if it has one: the checks of the settings alone, reading no input; `run`
        calls it first, and `rakt run` for every step before the first step runs."""
        check = getattr(self.load(), "check", None)
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


def kd_modes() -> dict:
    """The KD modes of `rakt distill` (rakt/distill/kd_modes.py: name -> KDMode), which are also the arms' methods."""
    from rakt.distill.kd_modes import KD_MODES
    return KD_MODES


def adapt_modes() -> dict:
    """The adapt modes of `rakt adapt` (rakt/distill/teacher/modes.py: name -> AdaptMode, with the inputs each fits
    on)."""
    from rakt.distill.teacher.modes import ADAPT_MODES
    return ADAPT_MODES


# the stages' modules, each imported when its stage is used
def _labelled() -> ModuleType:
    from rakt.pipeline import labelled
    return labelled


def _carve() -> ModuleType:
    from rakt.pipeline import carve
    return carve


def _embed() -> ModuleType:
    from rakt.pipeline import embed
    return embed


def _index() -> ModuleType:
    from rakt.pipeline import index_build
    return index_build


def _retrieve() -> ModuleType:
    from rakt.pipeline import retrieve
    return retrieve


def _curate() -> ModuleType:
    from rakt.pipeline.curate import curate
    return curate


def _sample() -> ModuleType:
    from rakt.pipeline import sample
    return sample


def _materialize() -> ModuleType:
    from rakt.pipeline import materialize
    return materialize


def _download() -> ModuleType:
    from rakt.pipeline.download import download
    return download


def _adapt() -> ModuleType:
    from rakt.distill.teacher import adapt
    return adapt


def _score() -> ModuleType:
    from rakt.distill.teacher import score
    return score


def _init() -> ModuleType:
    from rakt.distill import init
    return init


def _distill() -> ModuleType:
    from rakt.distill import distill
    return distill


def _finetune() -> ModuleType:
    from rakt.distill import finetune
    return finetune


def _evaluate() -> ModuleType:
    from rakt.distill import evaluate
    return evaluate


def _export() -> ModuleType:
    from rakt.distill import export
    return export


STAGES: Registry[Stage] = Registry("stage", {
    "labelled": Stage(LabelledConfig, _labelled,
        "write the few-shot draw of labelled target images as one WebDataset shard"),
    "carve": Stage(CarveConfig, _carve,
        "carve a labelled target task (train + test shards) and the pool without it out of a pool by its "
        "evaluation-only source/orig_label, e.g. Fashion-MNIST"),
    "embed": Stage(EmbedConfig, _embed,
        "embed images with an open_clip (or timm) image encoder into an embedding set"),
    "index": Stage(IndexBuildConfig, _index,
        "build a FAISS index directory from a pool of images or embeddings"),
    "retrieve": Stage(RetrieveConfig, _retrieve,
        "query an index with a target embedding set: top-k neighbours per query"),
    "curate": Stage(CurateConfig, _curate,
        "turn candidates into a transfer manifest under a budget"),
    "sample": Stage(SampleConfig, _sample,
        "draw a uniform random transfer manifest from an index's pool or from shards (random-pool and "
        "target-unlabelled baselines)"),
    "materialize": Stage(MaterializeConfig, _materialize,
        "write a transfer manifest over a local pool into WebDataset shards"),
    "download": Stage(DownloadConfig, _download,
        "download a transfer manifest's URLs into WebDataset shards (img2dataset)"),
    "adapt": Stage(AdaptConfig, _adapt,
        "adapt the teacher to the target task: linear probe, zero-shot head, reprogram, finetune"),
    "score": Stage(ScoreConfig, _score,
        "the adapted teacher's class and probability for every retrieved candidate (teacher-aware "
        "curation: `rakt curate --teacher-scores`)"),
    "init": Stage(InitConfig, _init,
        "a randomly initialised student checkpoint (the labelled-only arm)"),
    "distill": Stage(DistillConfig, _distill,
        "distill the adapted teacher into a small timm student on the transfer set"),
    "finetune": Stage(FinetuneConfig, _finetune,
        "finetune a distilled student on the labelled target images"),
    "evaluate": Stage(EvaluateConfig, _evaluate,
        "accuracy, per-class accuracy and confusion matrix of a student on labelled target test images"),
    "export": Stage(ExportConfig, _export,
        "write the student as ONNX and TorchScript, check their accuracy, time them on the CPU"),
})
