"""Mixup / CutMix for function matching (rakt/distill/mixing.py): seeded draws, the mix at any resolution, the
interpolated targets of a cached teacher, the batches that carry the mix, and the config checks."""
from __future__ import annotations

import pytest
import torch

from rakt.distill.image_bank import bank_from_tensors
from rakt.distill.config import DistillConfig
from rakt.distill.batches import ViewSpec, bank_batches
from rakt.distill.distill import run as run_distill
from rakt.distill.losses import kd_loss
from rakt.distill.mixing import MixSpec, apply_mix, draw_mix, mix_teacher_outputs, mix_weight
from rakt.distill.views import generator
from rakt.pipeline.config import ConfigError


def draws(seed: int, epoch: int, kind: str = "both", count: int = 6) -> list[dict]:
    gen = generator(seed, "mix", epoch)
    return [draw_mix(8, kind, 1.0, 1.0, gen) for _ in range(count)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) if k != "kind"
                                        else a[k] == b[k] for k in a)


def test_draws_are_seeded_and_differ_across_epochs():
    a, b, c = draws(0, 1), draws(0, 1), draws(0, 2)
    assert all(same(x, y) for x, y in zip(a, b))
    assert not all(same(x, y) for x, y in zip(a, c))
    assert {d["kind"] for d in draws(0, 1, count=40)} == {"mixup", "cutmix"}  # "both" picks either
    assert {d["kind"] for d in draws(0, 1, "cutmix")} == {"cutmix"}
    assert all(draw_mix(8, "mixup", 1.0, 0.0, generator(i)) is None for i in range(20))  # prob 0: never mixed
    assert 5 < sum(draw_mix(8, "mixup", 1.0, 0.5, generator(i)) is None for i in range(40)) < 35
    d = draws(3, 0, "mixup")[0]
    assert sorted(d["perm"].tolist()) == list(range(8)) and 0 <= d["lam"] <= 1


def test_mix_with_lambda_one_leaves_the_images_unchanged():
    x = torch.rand(4, 3, 16, 16)
    perm = torch.tensor([3, 2, 1, 0])
    assert torch.equal(apply_mix(x, {"kind": "mixup", "perm": perm, "lam": 1.0}), x)
    empty = {"kind": "cutmix", "perm": perm, "box": torch.tensor([0.5, 0.5, 0.5, 0.5])}
    assert torch.equal(apply_mix(x, empty), x) and mix_weight(empty, 16) == 1.0


def test_mixup_is_the_convex_combination():
    x = torch.rand(8, 3, 8, 8)
    params = draws(1, 0, "mixup")[0]
    lam, perm = params["lam"], params["perm"]
    assert torch.allclose(apply_mix(x, params), lam * x + (1 - lam) * x[perm])
    assert mix_weight(params, 8) == lam


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_box_matches_lambda_and_is_the_same_box_at_every_resolution(seed):
    params = draws(seed, 0, "cutmix")[0]
    perm = params["perm"]
    moved = perm != torch.arange(8)
    assert moved.any()
    for side in (64, 96):
        x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, side, side)  # image i is all i
        mixed = apply_mix(x, params)
        box = mixed[moved, 0] == perm[moved].view(-1, 1, 1).float()  # where the partner shows
        assert (box == box[0]).all() and ((mixed[:, 0] == x[:, 0]) | box[0]).all()  # one box, the rest unchanged
        assert box[0].float().mean().item() == pytest.approx(1 - mix_weight(params, side), abs=1e-6)
        rows, cols = box[0].any(dim=1).nonzero(), box[0].any(dim=0).nonzero()
        if len(rows):  # its pixel edges lie within half a pixel of the same relative box at each side
            edges = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]) / side
            assert torch.allclose(edges, params["box"], atol=0.5 / side + 1e-6)
    assert abs(mix_weight(params, 64) - mix_weight(params, 96)) < 4 / 64


def test_cached_target_is_the_mixture_of_tempered_distributions():
    torch.manual_seed(0)
    logits, feats, temperature = torch.randn(8, 10) * 3, torch.randn(8, 4), 4.0
    params = draws(2, 0, "mixup")[0]
    lam, perm = 0.3, params["perm"]
    out = mix_teacher_outputs({"logits": logits, "features": feats}, params, lam, temperature)
    p = torch.softmax(logits / temperature, dim=-1)
    assert torch.allclose(torch.softmax(out["logits"] / temperature, dim=-1), lam * p + (1 - lam) * p[perm], atol=1e-6)
    assert torch.allclose(out["features"], lam * feats + (1 - lam) * feats[perm])
    student = torch.randn(8, 10)
    direct = torch.nn.functional.kl_div(torch.log_softmax(student / temperature, -1), lam * p + (1 - lam) * p[perm],
                                        reduction="batchmean") * temperature ** 2
    assert kd_loss(student, out["logits"], temperature).item() == pytest.approx(direct.item(), rel=1e-5)


def test_batches_carry_a_seeded_mix_only_when_asked():
    bank = bank_from_tensors(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8), -torch.ones(20), None)
    views = ViewSpec("shift")

    def epoch(e, mix):
        return list(bank_batches(bank, batch_size=8, seed=0, epoch=e, views=views, mix=mix))

    spec = MixSpec("both", 0.5, 1.0)
    a, b, c = epoch(1, spec), epoch(1, spec), epoch(2, spec)
    assert all(same(x["mix"], y["mix"]) for x, y in zip(a, b))
    assert not all(same(x["mix"], y["mix"]) for x, y in zip(a, c))
    assert [len(x["mix"]["perm"]) for x in a] == [8, 8, 4]
    plain = epoch(1, None)
    assert all("mix" not in x and torch.equal(x["theta"], y["theta"]) for x, y in zip(plain, a))  # views unchanged
    assert all("mix" not in x for x in epoch(1, MixSpec("cutmix", 1.0, 0.0)))


@pytest.mark.parametrize("settings, flag", [({"mix": "blend"}, "--mix must be one of"),
                                            ({"mix": "both", "mix_alpha": 0.0}, "--mix-alpha must be > 0"),
                                            ({"mix": "both", "mix_prob": 1.5}, r"--mix-prob must be in \[0, 1\]")])
def test_bad_mix_settings_are_config_errors(tmp_path, settings, flag):
    with pytest.raises(ConfigError, match=flag):
        run_distill(DistillConfig(transfer=["x"], teacher="t.pt", out=str(tmp_path), **settings))
    with pytest.raises(ValueError):
        MixSpec(settings["mix"], settings.get("mix_alpha", 1.0), settings.get("mix_prob", 1.0))
