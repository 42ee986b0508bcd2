"""The KD modes: the one list of distillation objectives (`rakt distill --mode`, the arms' METHOD in `rakt run`).

A mode weighs the loss terms of rakt/distill/losses.py at each training step: "kd" (KL on the teacher's logits),
"feature" (projected student features vs the teacher's) and, added by the trainer, "ce" (hard labels). Torch-free,
so the config and the CLI read the names without loading torch.

To add a mode: one `KD_MODES` entry here (its weights at a step, whether it learns the classifier from the
teacher's logits, its help and report texts) plus its test; a new loss term is also computed in losses.py
(`DistillTask.forward`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from rakt.registry import Registry

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Weights:
    """The settings a mode's weights depend on (from the distill config)."""
    kd: float = 1.0
    feature: float = 1.0
    schedule: str = "linear"
    schedule_start: float = 0.0
    schedule_end: float = 1.0


@dataclass(frozen=True)
class KDMode:
    help: str                                            # one line for --help
    report: str                                          # how the report names it
    weights: Callable[[Weights, int, int], dict[str, float]]  # (settings, step, total steps) -> term weights
    learns_classifier: bool                              # the teacher's logits train the classifier (no CE needed)

    @property
    def terms(self) -> frozenset[str]:
        """The loss terms the mode weighs ("kd", "feature")."""
        return frozenset(self.weights(Weights(), 0, 1))


def progressive_weights(step: int, total_steps: int, schedule: str = "linear", start: float = 0.0,
                        end: float = 1.0) -> tuple[float, float]:
    """(w_feature, w_task) at `step` (0-based): w_task goes start -> end over the run, w_feature = 1 - w_task.

    Progress p = step / (total_steps - 1), clamped to [0, 1] (so step 0 gives `start` and the last step,
    total_steps - 1, gives `end`; total_steps <= 1 gives `end`). linear: w = start + (end - start) * p;
    cosine: w = start + (end - start) * (1 - cos(pi p)) / 2 (slow at both ends).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    p = 1.0 if total_steps <= 1 else min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "cosine":
        p = (1.0 - math.cos(math.pi * p)) / 2.0
    w_task = start + (end - start) * p
    return 1.0 - w_task, w_task


def _progressive(w: Weights, step: int, total: int) -> dict[str, float]:
    w_feature, w_task = progressive_weights(step, total, w.schedule, w.schedule_start, w.schedule_end)
    return {"feature": w.feature * w_feature, "kd": w.kd * w_task}


KD_MODES: Registry[KDMode] = Registry("KD mode", {
    "task": KDMode("KD on the adapted teacher's logits", "task-oriented KD",
                   lambda w, step, total: {"kd": w.kd}, learns_classifier=True),
    "agnostic": KDMode("feature KD (projected student features vs the teacher's)", "task-agnostic KD",
                       lambda w, step, total: {"feature": w.feature}, learns_classifier=False),
    "progressive": KDMode("TDMR schedule: feature KD handing over to logit KD", "progressive KD",
                          _progressive, learns_classifier=False),
})
MODES = tuple(KD_MODES)


def kd_mode(name: str) -> KDMode:
    """The registered mode `name`; an unknown name raises ValueError listing the modes."""
    return KD_MODES.lookup(name)


def modes_help() -> str:
    return " | ".join(f"{name}: {m.help}" for name, m in KD_MODES.items())
