"""The encoders' eval transform on batches of tensors (rakt/pipeline/pixels.py) and its use in `rakt embed`: real
open_clip and timm transforms, real JPEG shards."""
from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import image_array, jpeg_bytes, write_shard
from rakt.pipeline.config import EncoderConfig
from rakt.pipeline.embed import PartitionImages
from rakt.pipeline.encoders import load_image_encoder
from rakt.pipeline.pixels import PixelPipeline
from rakt.pipeline.sources import open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_exact_takes_open_clip_and_timm_transforms_and_nothing_else(tiny_clip, kit):
    clip = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=""))
    assert PixelPipeline.exact(clip.preprocess) == PixelPipeline.from_transform(clip.preprocess)
    lite = load_image_encoder(EncoderConfig(model="timm:tf_efficientnet_lite0", image_size=96,
                                            pretrained=str(kit / "teachers" / "tf_efficientnet_lite0.in1k.safetensors")))
    assert PixelPipeline.exact(lite.preprocess).crop == 96
    norm = T.Normalize((0.5,) * 3, (0.5,) * 3)
    for other in ([T.Resize(32), T.CenterCrop(32), T.RandomHorizontalFlip(), T.ToTensor(), norm],  # an extra step
                  [T.Resize((32, 32)), T.CenterCrop(32), T.ToTensor(), norm],  # squash, not the shorter side
                  [T.Resize(32, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(32), T.ToTensor(), norm],
                  [T.Resize(32), T.CenterCrop(32), norm, T.ToTensor()]):
        assert PixelPipeline.exact(T.Compose(other)) is None


def test_batch_pipeline_matches_the_per_image_transform(tiny_clip):
    """Up- and downsampling, square and not: uint8 input within two levels of PIL's result (0.1 on average),
    float input within a few levels, one on average."""
    preprocess = T.Compose([T.Resize(48, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(48), T.ToTensor(),
                            T.Normalize((0.5,) * 3, (0.25,) * 3)])
    pixels = PixelPipeline.exact(preprocess)
    for h, w in ((32, 32), (40, 64), (96, 96), (120, 80), (75, 101)):
        arrays = [image_array(i, 128)[:h, :w] for i in range(4)]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        theirs = torch.stack([preprocess(Image.fromarray(a)) for a in arrays])
        for ours, mean, most in ((pixels(batch), 0.1, 2.01), (pixels(batch.float().div(255)), 1.0, 8)):
            assert ours.shape == theirs.shape == (4, 3, 48, 48)
            diff = (ours - theirs).abs() * 0.25 * 255  # in levels of 255
            assert diff.mean() < mean and diff.max() < most, (h, w, ours.dtype, float(diff.mean()), float(diff.max()))


def test_embed_batches_mixed_sizes_in_source_order(tmp_path, tiny_clip):
    """A chunk with images of three sizes goes through the tensor pipeline a size at a time; every row gets its
    own image's pixels, in the source's order, and an undecodable image is a counted skip."""
    encoder = load_image_encoder(EncoderConfig(model=tiny_clip, pretrained=""))
    sizes = [32, 48, 32, 20, 48, 32]
    arrays = [image_array(i, s) for i, s in enumerate(sizes)]
    samples = [{"__key__": f"k{i}", "jpg": jpeg_bytes(a)} for i, a in enumerate(arrays)]
    samples.insert(3, {"__key__": "broken", "jpg": b"not an image"})
    source = open_source([str(write_shard(tmp_path / "s" / "mixed-000000.tar", samples))])
    images = PartitionImages(source, source.partitions[0], encoder.preprocess, 16, "")
    assert images.pixels is not None
    [item] = list(images)
    assert [row[0] for row in item["rows"]] == [f"k{i}" for i in range(len(sizes))]
    assert item["skipped"] == {"undecodable_image": 1}
    decoded = [np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
               for s in samples if s["__key__"] != "broken"]
    one_by_one = torch.cat([images.pixels(torch.from_numpy(a).permute(2, 0, 1)[None])
                            for a in decoded])
    assert torch.allclose(item["pixels"], one_by_one, atol=1e-6)
    assert collections.Counter(tuple(a.shape) for a in decoded) == {(32, 32, 3): 3, (48, 48, 3): 2, (20, 20, 3): 1}
