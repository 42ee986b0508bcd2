"""The run directory of `rakt run`: where the steps write, and the experiment arms, whose names are built and
parsed here only.

    run.yaml                      the resolved config of the last `rakt run`
    steps/NAME.json               a finished step's record (steps/NAME.started.json while it runs)
    task/                         with carve: the carved task's train/, test/ shards and pool/ (formats.md §5b)
    labelled/labelled-000000.tar  the few-shot draw          target/, eval/   embedding sets
    index/  candidates/           the pool index, the retrieved neighbours
    {set}-manifest/ {set}-shards/ a transfer set (TRANSFER_SETS; the retrieved one is manifest/ and shards/)
    teacher.pt                    the adapted teacher
    arms/{set}-{method}-s{seed}/  one experiment arm: init/ or distill/, finetune/, eval.json
    results.json results.csv report.md report.html
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rakt.pipeline.config import ConfigError
from rakt.pipeline.formats import LABELLED_SHARD as SHARD
from rakt.registry import Registry
from rakt.stages import kd_modes

STEPS_DIR = "steps"
LABELLED_SHARD = f"labelled/{SHARD}"
LABELLED = "labelled"   # the arm without a transfer set: the student trained on the labelled images only
NO_KD = "none"          # its method


@dataclass(frozen=True)
class TransferSet:
    manifest: str   # run-directory folder of its manifest
    shards: str     # run-directory folder of its shards
    text: str       # how the report names it


# in report order, after the labelled-only arm
TRANSFER_SETS: Registry[TransferSet] = Registry("transfer set", {
    "target": TransferSet("target-manifest", "target-shards", "the target's own unlabelled images"),
    "random": TransferSet("random-manifest", "random-shards", "a uniform random draw from the pool"),
    "retrieved": TransferSet("manifest", "shards", "the pool images retrieved for the target"),
})
SET_ORDER = (LABELLED, *TRANSFER_SETS)


def method_order() -> tuple[str, ...]:
    """The arms' methods in report order: no KD, then the KD modes as registered."""
    return (NO_KD, *kd_modes())


class Arm(NamedTuple):
    transfer_set: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.transfer_set}-{self.method}-s{self.seed}"

    def step(self, what: str) -> str:
        """The step name (and run-directory path) of this arm's `what`: init, distill, finetune, evaluate."""
        return f"arms/{self.name}/{what}"

    @classmethod
    def from_name(cls, name: str) -> dict:
        """'retrieved-task-s0' -> {"transfer_set", "method", "seed"} (seed None when the name has none)."""
        parts = name.split("-")
        seed = int(parts[-1][1:]) if len(parts) >= 3 and parts[-1][1:].isdigit() else None
        return {"transfer_set": parts[0], "method": parts[1] if len(parts) > 1 else "", "seed": seed}


def parse_arm(arm: str) -> tuple[str, str]:
    """'labelled' -> ('labelled', 'none'); 'retrieved/task' -> ('retrieved', 'task')."""
    if arm == LABELLED:
        return LABELLED, NO_KD
    tset, _, method = arm.partition("/")
    modes = kd_modes()
    if tset not in TRANSFER_SETS or method not in modes:
        raise ConfigError(f"experiment arm {arm!r}: expected '{LABELLED}' or SET/METHOD with SET in "
                          f"{', '.join(TRANSFER_SETS)} and METHOD a KD mode: {', '.join(modes)}")
    return tset, method


def arm_runs(cfg: dict) -> list[Arm]:
    """Every arm run of a run config, in run order: `arms` for every seed, then `extra_arms` (costly ablations)
    for the first seed only."""
    exp = cfg["experiment"]
    seeds = exp.get("seeds") or [0]
    runs = [Arm(*parse_arm(a), seed) for seed in seeds for a in exp.get("arms") or []]
    return runs + [Arm(*parse_arm(a), seeds[0]) for a in exp.get("extra_arms") or []]


def record_path(run_dir: str | Path, name: str, suffix: str = ".json") -> Path:
    """steps/NAME.json: a finished step's record; suffix .started.json: the marker of a step under way."""
    return Path(run_dir) / STEPS_DIR / (name + suffix)
