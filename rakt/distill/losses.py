"""Distillation losses and the distillation task object (in the style of open_clip's DistillCLIPTask).

Losses (each a scalar, mean over the batch):
- kd_loss:         KL(softmax(t/T) || softmax(s/T)) * T^2 — task-oriented KD on adapted-teacher logits.
- hard_label_loss: cross-entropy on labels; label -1 (unlabelled) is ignored; 0 when no label in the batch.
- feature_loss:    task-agnostic KD on features: "cosine" = 1 - cos(s, t) (0 same direction, 2 opposite),
                   "l2" = squared Euclidean distance per sample / dim (= MSE); the student features are
                   first mapped to the teacher dimension by a learnable FeatureProjector.
How a KD mode weighs these terms at each step is registered in rakt/distill/kd_modes.py.

Teacher outputs are dicts {"logits": [B, C], "features": [B, D]} (either key may be missing when a mode does
not need it); `teacher_outputs(teacher, images)` turns a teacher's return value into that dict, so a cache
of teacher outputs can store exactly what `DistillTask.forward(teacher_out=...)` takes.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rakt.distill.kd_modes import Weights, kd_mode

log = logging.getLogger("rakt")

FEATURE_KINDS = ("cosine", "l2")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch (Hinton et al.)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -1,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled samples (label == ignore_index skipped); 0 if none is labelled."""
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP) happy without a NaN mean over nothing
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing)


class FeatureProjector(nn.Module):
    """Learnable linear map student_dim -> teacher_dim; starts as the identity when the dims are equal."""

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias)
        if student_dim == teacher_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(student_dim))
                if bias:
                    self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Feature matching of (projected) student features to teacher features: "cosine" or "l2" (see module doc)."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student_feat.shape)} vs teacher "
                         f"{tuple(teacher_feat.shape)}; project the student features to the teacher's dim")
    s, t = student_feat.float(), teacher_feat.detach().float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "l2":
        return F.mse_loss(s, t)
    raise ValueError(f"feature loss kind must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")


def teacher_outputs(teacher: Callable[[torch.Tensor], Any], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run a frozen teacher without grad and return {"logits", "features"} (what it provides).

    A teacher with `features(x)` and `logits_from_features(f)` (distill.teacher.model.AdaptedTeacher) gives
    both from one backbone pass; any other callable may return logits, (logits, features) or such a dict.
    """
    with torch.no_grad():
        if hasattr(teacher, "features") and hasattr(teacher, "logits_from_features"):
            feats = teacher.features(images)
            return {"logits": teacher.logits_from_features(feats), "features": feats}
        out = teacher(images)
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return {k: v for k, v in zip(("logits", "features"), out) if v is not None}
    if isinstance(out, dict) and out.keys() & {"logits", "features"}:
        return {k: out[k] for k in ("logits", "features") if out.get(k) is not None}
    raise TypeError(f"teacher returned {type(out).__name__}; expected logits, (logits, features) or a dict "
                    f"with 'logits'/'features'")


class DistillTask(nn.Module):
    """Student (+ feature projector) trained against a frozen teacher; `forward` returns named losses + "loss".

    `mode` names a distill.kd_modes entry, which weighs the terms "kd" (student logits vs teacher logits) and
    "feature" (projected student features vs teacher features) at each step. In every mode, labels (>= 0) add
    hard_weight * ce. The teacher is held outside the module tree (so `parameters()`/`state_dict()` are the
    student's and the projector's only), frozen and kept in eval mode; move it to the device yourself. teacher may
    be None when every batch brings `teacher_out`.
    """

    def __init__(self, student: nn.Module, teacher: Callable[[torch.Tensor], Any] | None = None, *,
                 mode: str = "task", temperature: float = 4.0, kd_weight: float = 1.0, hard_weight: float = 0.0,
                 feature_kind: str = "cosine", feature_weight: float = 1.0, teacher_dim: int = 0,
                 schedule: str = "linear", schedule_start: float = 0.0, schedule_end: float = 1.0) -> None:
        super().__init__()
        self.kd_mode = kd_mode(mode)
        if feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {', '.join(FEATURE_KINDS)}, got {feature_kind!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student = student
        self.mode = mode
        self.temperature = temperature
        self.kd_weight, self.hard_weight, self.feature_weight = kd_weight, hard_weight, feature_weight
        self.feature_kind = feature_kind
        self.schedule, self.schedule_start, self.schedule_end = schedule, schedule_start, schedule_end
        self.projector: FeatureProjector | None = None
        if "feature" in self.kd_mode.terms:
            if teacher_dim < 1:
                raise ValueError(f"mode {mode!r} needs teacher_dim (the teacher feature size) >= 1")
            self.projector = FeatureProjector(int(student.num_features), teacher_dim)
        self._teacher = [teacher]  # a list hides it from nn.Module registration
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)

    @property
    def teacher(self) -> Callable[[torch.Tensor], Any] | None:
        return self._teacher[0]

    def train(self, mode: bool = True) -> "DistillTask":
        super().train(mode)
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()  # frozen teacher: BN statistics and dropout stay in eval mode
        return self

    @property
    def leaves_parameters_unused(self) -> bool:
        """Some parameters get no gradient in a step: the classifier under a feature-only mode (agnostic) without
        hard labels. DDP must be told (find_unused_parameters), or its second step fails."""
        return "kd" not in self.kd_mode.terms and self.hard_weight <= 0

    def loss_weights(self, step: int = 0, total_steps: int = 1) -> dict[str, float]:
        """Weight of each named loss in the total at this step (hard-label weight included when > 0)."""
        weights = self.kd_mode.weights(Weights(self.kd_weight, self.feature_weight, self.schedule,
                                               self.schedule_start, self.schedule_end), step, total_steps)
        if self.hard_weight > 0:
            weights["ce"] = self.hard_weight
        return weights

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                teacher_out: dict[str, torch.Tensor] | None = None, step: int = 0,
                total_steps: int = 1) -> dict[str, torch.Tensor]:
        """Named losses ("kd", "feature", "ce" as the mode uses them) and "loss", their weighted sum."""
        if teacher_out is None:
            if self.teacher is None:
                raise ValueError("DistillTask has no teacher: pass teacher_out (cached teacher outputs)")
            teacher_out = teacher_outputs(self.teacher, images)
        weights = self.loss_weights(step, total_steps)
        need_features = "feature" in weights
        if need_features and hasattr(self.student, "forward_both"):
            logits, feats = self.student.forward_both(images)
        elif need_features:
            feats = self.student.features(images)
            logits = self.student(images) if ("kd" in weights or "ce" in weights) else None
        else:
            logits, feats = self.student(images), None
        losses: dict[str, torch.Tensor] = {}
        if "kd" in weights:
            losses["kd"] = kd_loss(logits, _need(teacher_out, "logits", self.mode), self.temperature)
        if need_features:
            losses["feature"] = feature_loss(self.projector(feats), _need(teacher_out, "features", self.mode),
                                             self.feature_kind)
        if "ce" in weights:
            losses["ce"] = (hard_label_loss(logits, labels) if labels is not None else logits.sum() * 0.0)
        losses["loss"] = sum(weights[k] * losses[k] for k in weights)
        return losses


def _need(teacher_out: dict[str, torch.Tensor], key: str, mode: str) -> torch.Tensor:
    if key not in teacher_out:
        raise ValueError(f"mode {mode!r} needs teacher {key}, but the teacher outputs hold only "
                         f"{', '.join(teacher_out) or 'nothing'}")
    return teacher_out[key]
