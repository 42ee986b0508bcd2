"""Image encoders: tiny open_clip (random / checkpoint), the offline guard, and the real timm teacher."""
from __future__ import annotations

import collections
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from rakt.pipeline.config import EncoderConfig
from rakt.pipeline.encoders import load_image_encoder
from rakt.pipeline.io import InputError, file_hash
from rakt.pipeline.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "tf_efficientnet_lite0.in1k.safetensors"


def batch(encoder, images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([encoder.preprocess(img) for img in images])


@pytest.fixture
def pictures(make_images) -> list[Image.Image]:
    return [Image.fromarray(make_images(i, size=48)) for i in range(4)]


def test_tiny_open_clip_random_init(tiny_clip, pictures):
    enc = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"))
    assert enc.model_id == "open_clip:rakt-tiny-clip:random"
    assert enc.dim == 32 and enc.device == torch.device("cpu")
    out = enc.encode(batch(enc, pictures))
    assert out.shape == (4, 32) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    again = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cpu"))
    assert torch.equal(again.encode(batch(again, pictures)), out)  # seeded init: the same space every run


def test_local_checkpoint_round_trip(tiny_clip, pictures, tmp_path):
    random_init = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=""))
    with torch.no_grad():
        for p in random_init.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # weights no random init reproduces
    expected = random_init.encode(batch(random_init, pictures))
    ckpt = tmp_path / "tiny.pt"
    torch.save(random_init.model.state_dict(), ckpt)

    enc = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=str(ckpt)))
    assert enc.model_id == f"open_clip:rakt-tiny-clip:file:tiny.pt:{file_hash(ckpt)[:12]}"
    assert torch.allclose(enc.encode(batch(enc, pictures)), expected, atol=1e-6)
    assert load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=str(ckpt))).model_id == enc.model_id
    fresh = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=""))
    assert not torch.allclose(fresh.encode(batch(fresh, pictures)), expected, atol=1e-3)


def test_offline_tag_fails_fast_with_the_fix(tmp_path, folder_of_two):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "rakt.cli", "embed", str(folder_of_two), "--model", "ViT-B-32",
                           "--pretrained", "laion2b_s34b_b79k", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "weights for open_clip model ViT-B-32 tag laion2b_s34b_b79k are not available offline" in proc.stderr
    assert "--pretrained /path/to/open_clip_pytorch_model.bin" in proc.stderr
    assert elapsed < 30, elapsed  # the hub retry it avoids takes ~46 s; imports take ~8 s


def test_cached_tag_weights_are_used_without_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants
    snapshot = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"not really weights")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="cached weights of tag laion2b_s34b_b79k .*abc123.* does not load"):
        load_image_encoder(EncoderConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))


@pytest.fixture
def folder_of_two(tmp_path, make_folder, make_images):
    return make_folder(tmp_path / "imgs", {"a": [make_images(1), make_images(2)]})


def test_unknown_names_and_tags(tiny_clip):
    with pytest.raises(InputError, match=r"unknown open_clip model 'ViT-Q-99'.*open_clip.list_models\(\)"):
        load_image_encoder(EncoderConfig(model="ViT-Q-99", pretrained=""))
    with pytest.raises(InputError, match="neither a file nor a known tag.*laion2b_s34b_b79k"):
        load_image_encoder(EncoderConfig(model="ViT-B-32", pretrained="no_such_tag"))
    with pytest.raises(InputError, match="unknown timm model"):
        load_image_encoder(EncoderConfig(model="timm:not_a_net", pretrained=""))
    with pytest.raises(InputError, match="local checkpoint file"):
        load_image_encoder(EncoderConfig(model="timm:tf_efficientnet_lite0", pretrained="in1k"))


def test_real_timm_teacher_from_the_kit(kit):
    path = kit / "teachers" / TEACHER
    enc = load_image_encoder(EncoderConfig(model="timm:tf_efficientnet_lite0", pretrained=str(path), precision="fp32"))
    assert enc.dim == 1280
    assert enc.model_id == f"timm:tf_efficientnet_lite0:file:{TEACHER}:{file_hash(path)[:12]}"
    source = open_source([str(kit / "target" / "cifar10" / "cifar10-test-000000.tar.gz")])
    stats: collections.Counter = collections.Counter()
    samples = [s for _, s in zip(range(3), source.read(source.partitions[0], stats))]
    images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in samples]
    x = batch(enc, images)
    assert x.shape == (3, 3, 224, 224)
    features = enc.encode(x)
    assert features.shape == (3, 1280)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    # the same features as the full teacher (head included) loaded strictly, before its classifier
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        reference = full.eval().forward_head(full.forward_features(x), pre_logits=True)
    assert torch.allclose(features, torch.nn.functional.normalize(reference, dim=1), atol=1e-5)
    # bf16 autocast (the default on CPUs with native bf16, and on GPUs) points the same way
    enc.autocast_dtype = torch.bfloat16
    assert torch.nn.functional.cosine_similarity(enc.encode(x), features).min() > 0.99


def test_wrong_architecture_checkpoint(tmp_path, tiny_clip):
    other = timm.create_model("resnet10t", pretrained=False)
    ckpt = tmp_path / "resnet10t.safetensors"
    save_file(other.state_dict(), ckpt)
    with pytest.raises(InputError, match=r"not a checkpoint of timm tf_efficientnet_lite0: \d+ missing keys"):
        load_image_encoder(EncoderConfig(model="timm:tf_efficientnet_lite0", pretrained=str(ckpt)))
    with pytest.raises(InputError, match="does not load into open_clip rakt-tiny-clip"):
        load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=str(ckpt)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error(tiny_clip):
    with pytest.raises(InputError, match="no CUDA GPU"):
        load_image_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cuda"))


def test_image_size_sets_the_input_resolution_and_the_model_id(kit, tiny_clip):
    teacher = str(kit / "teachers/tf_efficientnet_lite0.in1k.safetensors")
    img = Image.new("RGB", (32, 32), (120, 30, 200))
    native = load_image_encoder(EncoderConfig(model="timm:tf_efficientnet_lite0", pretrained=teacher, device="cpu"))
    small = load_image_encoder(EncoderConfig(model="timm:tf_efficientnet_lite0", pretrained=teacher,
                                             device="cpu", image_size=64))
    assert native.preprocess(img).shape == (3, 224, 224)
    assert small.preprocess(img).shape == (3, 64, 64)
    assert small.model_id == native.model_id + "@64px"  # another resolution is another embedding space
    assert small.encode(small.preprocess(img)[None]).shape == (1, 1280)
    vit = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained="", device="cpu", image_size=48))
    assert vit.preprocess(img).shape == (3, 48, 48)
    assert vit.encode(vit.preprocess(img)[None]).shape == (1, 32)
