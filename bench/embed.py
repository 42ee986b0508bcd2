"""Benchmark: images/s of the embed stage's read -> decode -> preprocess -> encode path (no parquet writes).

    python bench/embed.py                                    # tiny open_clip, the kit's CIFAR-10 test shard
    python bench/embed.py --model ViT-B-32 --pretrained /path/open_clip_pytorch_model.bin --batch-size 512
    python bench/embed.py --model timm:tf_efficientnet_lite0 \
        --pretrained ../shared/data/teachers/tf_efficientnet_lite0.in1k.safetensors

Model loading is not timed; the clock starts at the first batch read. Prints the device and settings.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from rakt.pipeline.io import kit_dir

    default_shards = kit_dir() / "target" / "cifar10" / "cifar10-test-000000.tar.gz"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="open_clip name, JSON config path, or timm:NAME "
                                                     "(default: a tiny open_clip config, random init)")
    parser.add_argument("--pretrained", default="", help="open_clip tag or local checkpoint ('' = random init)")
    parser.add_argument("--source", nargs="+", default=[str(default_shards)],
                        help=f"WebDataset shards, folder or manifest (default: {default_shards})")
    parser.add_argument("--image-size", type=int, default=0, help="encoder input px (0 = the model's own)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader decode workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--limit", type=int, default=0, help="stop after this many images (0 = all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from rakt.pipeline.config import EncoderConfig
    from rakt.pipeline.embed import image_batches
    from rakt.pipeline.encoders import TINY_CLIP, load_image_encoder
    from rakt.pipeline.sources import open_source

    model = args.model or TINY_CLIP
    cfg = EncoderConfig(model=model, pretrained=args.pretrained, image_size=args.image_size, batch_size=args.batch_size,
                        workers=args.workers, device=args.device, precision=args.precision)
    encoder = load_image_encoder(cfg)
    source = open_source(args.source)

    images, start = 0, time.perf_counter()
    for partition in source.partitions:
        for item in image_batches(source, partition, encoder.preprocess, args.batch_size, args.workers):
            if item["rows"]:
                encoder.encode(item["pixels"])
                images += len(item["rows"])
            if args.limit and images >= args.limit:
                break
        if args.limit and images >= args.limit:
            break
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    device = torch.cuda.get_device_name(encoder.device) if encoder.device.type == "cuda" else "cpu"
    dtype = str(encoder.autocast_dtype or torch.float32).replace("torch.", "")
    print(f"device     {device} ({os.cpu_count()} CPU cores, torch {torch.__version__})")
    print(f"model      {encoder.model_id} (dim {encoder.dim})")
    print(f"batch      {args.batch_size}")
    print(f"dtype      {dtype}")
    print(f"workers    {args.workers}")
    print(f"images     {images}")
    print(f"seconds    {seconds:.2f}")
    print(f"images/s   {images / seconds:.1f}" if seconds > 0 else "images/s   n/a")


if __name__ == "__main__":
    main()
