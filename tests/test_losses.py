"""Distillation losses, the progressive schedule and the DistillTask object (tiny tensors, CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rakt.distill.kd_modes import progressive_weights
from rakt.distill.losses import (DistillTask, FeatureProjector, feature_loss, hard_label_loss, kd_loss,
                                 teacher_outputs)


def _logits(seed: int, n: int = 8, c: int = 5, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_kd_equals_soft_target_cross_entropy_minus_teacher_entropy():
    """Exact identity at any T: kd/T^2 = CE(s/T, p_t) - H(p_t), with p_t = softmax(t/T)."""
    s, t = _logits(0), _logits(1)
    for temp in (0.5, 1.0, 4.0):
        p_t = F.softmax(t / temp, dim=-1)
        ce = -(p_t * F.log_softmax(s / temp, dim=-1)).sum(-1).mean()
        entropy = -(p_t * F.log_softmax(t / temp, dim=-1)).sum(-1).mean()
        assert torch.allclose(kd_loss(s, t, temp) / temp ** 2, ce - entropy, rtol=1e-5, atol=1e-6)


def test_kd_at_small_temperature_is_hard_label_ce_on_teacher_argmax():
    """T -> 0: softmax(t/T) becomes one-hot at argmax t, so kd(s, t, T) / T^2 -> CE(s / T, argmax t).

    Checked at T = 0.05 and T = 0.02 with a teacher whose top logit leads the runner-up by >= 1 (so the
    teacher's non-argmax mass is < 4 * e^-20): relative difference below 1e-4. Also checked: kd itself
    carries the T^2 factor, i.e. kd(s, t, T) = T^2 * CE(s/T, argmax t) up to the same tolerance.
    """
    s = _logits(2)
    t = torch.zeros(8, 5)
    t[torch.arange(8), torch.arange(8) % 5] = 1.0  # margin exactly 1 over every other class
    target = t.argmax(-1)
    for temp in (0.05, 0.02):
        ce = F.cross_entropy(s / temp, target)
        kd = kd_loss(s, t, temp)
        assert torch.allclose(kd / temp ** 2, ce, rtol=1e-4)
        assert torch.allclose(kd, temp ** 2 * ce, rtol=1e-4)
    assert torch.allclose(hard_label_loss(s, target), F.cross_entropy(s, target))


def test_kd_zero_for_equal_logits_positive_otherwise():
    s = _logits(3)
    assert kd_loss(s, s.clone(), 4.0).abs().item() < 1e-6
    assert kd_loss(s, s + 7.0, 2.0).abs().item() < 1e-5  # softmax is shift-invariant
    assert kd_loss(s, _logits(4), 4.0).item() > 1e-3
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, 0.0)


def test_kd_gradient_pulls_student_toward_teacher():
    s = _logits(5).requires_grad_(True)
    t = _logits(6)
    before = kd_loss(s, t, 2.0)
    before.backward()
    with torch.no_grad():
        stepped = s - 0.1 * s.grad
        assert kd_loss(stepped, t, 2.0) < before
        # the step moves the student's distribution toward the teacher's (L1 distance shrinks)
        dist = lambda x: (F.softmax(x / 2.0, -1) - F.softmax(t / 2.0, -1)).abs().sum()  # noqa: E731
        assert dist(stepped) < dist(s)
    assert t.grad is None


def test_hard_label_loss_ignores_unlabelled():
    s = _logits(7, n=4)
    labels = torch.tensor([1, -1, 3, -1])
    assert torch.allclose(hard_label_loss(s, labels), F.cross_entropy(s[[0, 2]], labels[[0, 2]]))
    assert hard_label_loss(s, torch.full((4,), -1)).item() == 0.0


def test_cosine_feature_loss_zero_identical_two_opposite():
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(8))
    proj = FeatureProjector(16, 16)  # equal dims: starts as the identity
    assert torch.allclose(proj(x), x)
    assert feature_loss(proj(x), x, "cosine").abs().item() < 1e-6
    assert abs(feature_loss(proj(x), -x, "cosine").item() - 2.0) < 1e-6
    assert feature_loss(x, x, "l2").item() == 0.0
    assert torch.allclose(feature_loss(x, x + 1.0, "l2"), torch.tensor(1.0))
    assert FeatureProjector(16, 32)(x).shape == (6, 32)
    with pytest.raises(ValueError, match="shapes differ"):
        feature_loss(x, torch.zeros(6, 8))
    with pytest.raises(ValueError, match="kind"):
        feature_loss(x, x, "l1")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_progressive_weights_monotone_with_endpoints(schedule):
    total = 11
    ws = [progressive_weights(step, total, schedule) for step in range(total)]
    tasks = [w[1] for w in ws]
    assert ws[0] == (1.0, 0.0) and ws[-1] == (0.0, 1.0)
    assert all(b > a for a, b in zip(tasks, tasks[1:]))  # strictly growing task weight
    assert all(abs(wf + wt - 1.0) < 1e-12 for wf, wt in ws)
    assert math.isclose(progressive_weights(5, total, schedule)[1], 0.5)  # both are symmetric at mid-run
    assert progressive_weights(100, total, schedule) == (0.0, 1.0)  # clamped past the end
    w_f, w_t = progressive_weights(total - 1, total, schedule, start=0.2, end=0.8)
    assert math.isclose(w_t, 0.8) and math.isclose(w_f, 0.2)
    assert progressive_weights(0, 1, schedule) == (0.0, 1.0)
    with pytest.raises(ValueError):
        progressive_weights(0, 10, "step")


class TinyStudent(nn.Module):
    """Logits and pooled features from a linear map of the mean colour (StudentModel's interface)."""
    num_features = 4

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x):
        return self.body(x.mean(dim=(2, 3)))

    def forward(self, x):
        return self.head(self.features(x))


class TinyTeacher(nn.Module):
    """Returns (logits, features); has dropout so train/eval mode is observable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.feat = nn.Linear(3, 6)
        self.cls = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        f = self.feat(x.mean(dim=(2, 3)))
        return self.cls(self.drop(f)), f


@pytest.mark.parametrize("mode,hard,expected", [
    ("task", 0.0, {"kd", "loss"}), ("task", 0.5, {"kd", "ce", "loss"}),
    ("agnostic", 0.0, {"feature", "loss"}), ("agnostic", 0.5, {"feature", "ce", "loss"}),
    ("progressive", 0.0, {"kd", "feature", "loss"}), ("progressive", 0.5, {"kd", "feature", "ce", "loss"}),
])
def test_distill_task_keys_and_weighted_total(mode, hard, expected):
    teacher = TinyTeacher()
    task = DistillTask(TinyStudent(), teacher, mode=mode, hard_weight=hard, teacher_dim=6, temperature=2.0)
    teacher.train()  # e.g. by code that shares it; task.train() puts the frozen teacher back in eval mode
    task.train()
    assert task.student.training and not teacher.training
    assert {id(p) for p in task.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([0, 1, 2, -1, 1])
    out = task(images, labels, step=3, total_steps=10)
    assert set(out) == expected
    weights = task.loss_weights(3, 10)
    assert set(weights) == expected - {"loss"}
    assert torch.allclose(out["loss"], sum(weights[k] * out[k] for k in weights))
    if mode == "progressive":
        assert weights["kd"] == pytest.approx(1 / 3) and weights["feature"] == pytest.approx(2 / 3)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert task.student.head.weight.grad is not None or mode == "agnostic"


def test_distill_task_accepts_precomputed_teacher_outputs():
    teacher = TinyTeacher()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    cached = teacher_outputs(teacher.eval(), images)
    assert set(cached) == {"logits", "features"}
    live = DistillTask(TinyStudent(), teacher, mode="progressive", teacher_dim=6)
    offline = DistillTask(TinyStudent(), None, mode="progressive", teacher_dim=6)
    offline.load_state_dict(live.state_dict())
    a = live(images, step=2, total_steps=5)
    b = offline(images, teacher_out=cached, step=2, total_steps=5)
    assert all(torch.allclose(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="no teacher"):
        offline(images)
    with pytest.raises(ValueError, match="needs teacher features"):
        offline(images, teacher_out={"logits": cached["logits"]})
    with pytest.raises(ValueError, match="teacher_dim"):
        DistillTask(TinyStudent(), teacher, mode="agnostic")
    with pytest.raises(ValueError, match="mode"):
        DistillTask(TinyStudent(), teacher, mode="both")


def test_teacher_outputs_from_an_adapted_teacher_style_object():
    """features(x) + logits_from_features(f): one backbone pass gives both; plain logits teachers give logits."""
    calls = []

    class Adapted(nn.Module):
        def features(self, x):
            calls.append("features")
            return F.normalize(x.mean(dim=(2, 3)), dim=-1)

        def logits_from_features(self, f):
            return 5.0 * f

    images = torch.rand(3, 3, 4, 4)
    out = teacher_outputs(Adapted(), images)
    assert calls == ["features"] and torch.allclose(out["logits"], 5.0 * out["features"])
    assert set(teacher_outputs(lambda x: x.mean(dim=(2, 3)), images)) == {"logits"}
    with pytest.raises(TypeError, match="teacher returned str"):
        teacher_outputs(lambda x: "logits", images)


def test_a_new_kd_mode_is_one_registry_entry(monkeypatch, capsys):
    """Registering a mode in rakt/distill/kd_modes.py is all it takes: DistillTask trains with it, `rakt distill --mode`
    accepts it and `rakt run` plans an arm with it (distilling the labelled images as transfer images)."""
    from rakt.distill.config import DistillConfig
    from rakt.distill.kd_modes import KD_MODES, KDMode
    from rakt.cli import build_parser
    from rakt.pipeline.config import from_dict
    from rakt.run import load_run_config, plan

    monkeypatch.setitem(KD_MODES, "blend", KDMode(
        "half logit KD, half feature KD", "blended KD",
        lambda w, step, total: {"kd": 0.5 * w.kd, "feature": 0.5 * w.feature}, learns_classifier=True))
    task = DistillTask(TinyStudent(), TinyTeacher(), mode="blend", teacher_dim=6)
    out = task(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    assert set(out) == {"kd", "feature", "loss"}
    assert torch.allclose(out["loss"], 0.5 * out["kd"] + 0.5 * out["feature"])
    assert from_dict(DistillConfig, {"mode": "blend", "out": "x"}).mode == "blend"
    assert build_parser().parse_args(["distill", "--mode", "blend", "--out", "x"]).mode == "blend"
    cfg = load_run_config(None, ["run_dir=/tmp/rakt-plan-only", "experiment.arms=['retrieved/blend']"])
    step = next(s for s in plan(cfg) if s.name == "arms/retrieved-blend-s0/distill")
    assert step.config.mode == "blend" and step.config.target_mix == "transfer"
    with pytest.raises(Exception, match="KD mode"):
        load_run_config(None, ["experiment.arms=['retrieved/blended']"])
