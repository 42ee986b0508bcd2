"""timm students: small-input stem, normalization, checkpoints, and a few real distillation steps (CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rakt.distill.losses import DistillTask
from rakt.distill.students import StudentModel, create_student, load_student, save_student
from rakt.pipeline.io import InputError

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def colour_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32-px images whose class is their dominant colour (plus noise): linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = COLOURS[labels][:, :, None, None] + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return images.clamp(0, 1), labels


class ColourTeacher(nn.Module):
    """An 'adapted teacher' that knows the rule: logits from the mean colour, features = the mean colour."""

    def forward(self, x):
        mean = x.mean(dim=(2, 3))
        return 10.0 * (mean - mean.mean(dim=1, keepdim=True)), mean


def test_small_input_stem_shapes():
    torch.manual_seed(0)
    model = create_student("resnet10t", 3, small_input=True)
    assert isinstance(model, StudentModel) and model.image_size == 32
    stem = model.net.conv1[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(model.net.maxpool, nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    assert model.features(x).shape == (2, model.num_features) == (2, 512)
    # the stem keeps 32x32: layer4 (three stride-2 stages) ends at 4x4, not 1x1 as the stock stem gives
    assert model.net.forward_features(model.prepare(x)).shape[-2:] == (4, 4)
    stock = create_student("resnet10t", 3, image_size=32)
    assert stock.net.forward_features(stock.prepare(x)).shape[-2:] == (1, 1)
    plain = create_student("resnet18", 5, small_input=True)
    assert plain.net.conv1.kernel_size == (3, 3) and plain(x).shape == (2, 5)


def test_small_input_refused_for_other_architectures():
    with pytest.raises(InputError, match="timm ResNets.*MobileNetV3"):
        create_student("mobilenetv3_small_050", 3, small_input=True)
    with pytest.raises(InputError, match="Unknown model"):
        create_student("no_such_model_xyz", 3)


def test_student_normalizes_and_resizes_itself():
    model = create_student("mobilenetv3_small_050", 4, image_size=64)
    assert model.num_features == model.features(torch.rand(1, 3, 40, 40)).shape[-1]
    grey = torch.full((1, 3, 40, 40), 0.5)
    prepared = model.prepare(grey)
    assert prepared.shape == (1, 3, 64, 64)
    expected = (0.5 - torch.tensor(model.net.pretrained_cfg["mean"])) / torch.tensor(model.net.pretrained_cfg["std"])
    assert torch.allclose(prepared[0, :, 0, 0], expected, atol=1e-5)
    mean, std = model.mean, model.std
    for side in (32, 40, 100):  # up- and downsampling: normalized on the smaller side, the same result
        x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        reference = (F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=side > 64)
                     - mean) / std
        assert torch.allclose(model.prepare(x), reference, atol=1e-5), side


def test_checkpoint_round_trip_and_wrong_architecture(tmp_path):
    torch.manual_seed(1)
    model = create_student("resnet10t", 3, small_input=True).eval()
    path = tmp_path / "student.pt"
    save_student(path, model, {"epoch": 2})
    loaded, meta = load_student(path)
    x = torch.rand(2, 3, 32, 32)
    assert meta == {"epoch": 2} and loaded.arch == "resnet10t" and loaded.small_input
    assert torch.equal(loaded(x), model(x))
    same = create_student("resnet10t", 3, small_input=True, checkpoint=str(path)).eval()
    assert torch.equal(same(x), model(x))
    torch.save(model.net.state_dict(), tmp_path / "bare.pt")  # bare timm weights load too
    assert torch.equal(create_student("resnet10t", 3, small_input=True, checkpoint=str(tmp_path / "bare.pt"))
                       .eval()(x), model(x))
    torch.save(create_student("resnet18", 3).net.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(InputError, match=r"\d+ missing keys, \d+ unexpected keys.*another architecture"):
        create_student("resnet10t", 3, small_input=True, checkpoint=str(tmp_path / "r18.pt"))
    with pytest.raises(InputError, match="shape mismatches"):  # bare weights, 3 classes, into a 10-class head
        create_student("resnet10t", 10, small_input=True, checkpoint=str(tmp_path / "bare.pt"))
    with pytest.raises(InputError, match="a checkpoint of student resnet10t .*not of resnet18"):
        create_student("resnet18", 3, small_input=True, checkpoint=str(path))
    with pytest.raises(InputError, match="small_input=True.*small_input=False"):
        create_student("resnet10t", 3, checkpoint=str(path))  # same shapes (3x3 stem) but another stride
    with pytest.raises(InputError, match="checkpoint of resnet10t, not of the requested student resnet18"):
        load_student(path, arch="resnet18")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read it"):
        load_student(tmp_path / "junk.pt")



@pytest.mark.parametrize("mode,kwargs,steps", [
    ("task", {"small_input": True}, 5),      # the 32-px stem (slower: full-resolution layer1)
    ("progressive", {"image_size": 32}, 10),  # the stock stem on 32-px input
])
def test_real_student_distills_and_loss_drops(mode, kwargs, steps):
    torch.manual_seed(2)
    student = create_student("resnet10t", 3, **kwargs)
    task = DistillTask(student, ColourTeacher(), mode=mode, temperature=2.0, teacher_dim=3)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    fixed, _ = colour_images(8, seed=100)

    def fixed_loss() -> float:  # the last step's weighting, so both ends measure the same objective
        with torch.no_grad():
            return task(fixed, step=steps - 1, total_steps=steps)["loss"].item()

    task.train()
    before = fixed_loss()
    for step in range(steps):
        images, _ = colour_images(8, seed=step)
        out = task(images, step=step, total_steps=steps)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = fixed_loss()
    print(f"{mode}: fixed-batch loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)
