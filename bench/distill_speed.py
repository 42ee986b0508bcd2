"""Benchmark: distillation training steps/s as images/s — the student alone (CE), with the online teacher, and
with cached teacher outputs (what `rakt distill --cache-teacher` does after its first pass).

    python bench/distill.py                                   # kit teacher (tf_efficientnet_lite0), resnet18
    python bench/distill.py --student resnet10t --small-input --image-size 32 --batch-size 64   # CPU-sized

Images are random [0, 1] tensors already on the device, so data loading and decoding are not measured; the
"cache" figure feeds precomputed teacher outputs (the cache's npz read happens in DataLoader workers).
Each mode runs --warmup untimed steps, then --steps timed ones (bf16 autocast + channels_last on CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.io import kit_dir

    teacher = kit_dir() / "teachers" / "tf_efficientnet_lite0.in1k.safetensors"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-model", default="timm:tf_efficientnet_lite0")
    parser.add_argument("--teacher-weights", default=str(teacher))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--small-input", action="store_true")
    parser.add_argument("--image-size", type=int, default=0, help="0 = 224 on CUDA, 64 on CPU")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = 256 on CUDA, 16 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0 = 30 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from bench._device import cpu_name
    from distill.losses import DistillTask, teacher_outputs
    from distill.students import create_student
    from distill.teacher_model import build_teacher
    from distill.trainer import FinetuneTask, resolve_device
    from pipeline.config import EncoderConfig

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = args.image_size or (224 if cuda else 64)
    batch = args.batch_size or (256 if cuda else 16)
    steps = args.steps or (30 if cuda else 3)
    teacher = build_teacher(EncoderConfig(model=args.teacher_model, pretrained=args.teacher_weights,
                                          device=str(device)), args.classes, "linear").eval()
    student = create_student(args.student, args.classes, small_input=args.small_input, image_size=size).to(device)
    if cuda:
        student.to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, size, size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (batch,), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        cached = teacher_outputs(teacher, images)

    def timed(task: torch.nn.Module, **kw) -> float:
        model = torch.compile(task) if args.compile else task
        opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
        task.train()
        for i in range(args.warmup + steps):
            if i == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(images, labels=labels, **kw)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({cpu_name()})"
    print(f"device: {name}; torch {torch.__version__}; compile={args.compile}")
    print(f"student {args.student} (small_input={args.small_input}), teacher {args.teacher_model}, "
          f"{size} px, batch {batch}, {steps} timed steps, {'bf16 autocast' if cuda else 'fp32'}")
    figures = {
        "student alone (CE)": timed(FinetuneTask(student)),
        "online teacher (KD)": timed(DistillTask(student, teacher, mode="task")),
        "cached teacher (KD)": timed(DistillTask(student, None, mode="task"), teacher_out=cached),
    }
    for label, rate in figures.items():
        print(f"{label:>22}: {rate:10.1f} images/s")


if __name__ == "__main__":
    main()
