"""The ceiling benchmark: each hot stage of the main job run through rakt's own code on real images, against the
compute-only speed of the same model, batch and dtype on synthetic tensors, measured in the same run on the same
device; prints the ratio (rakt / best compute-only). Then, unless --no-precision-check, what bf16 changes: recall@10
of retrieval over a bf16-embedded pool against the fp32-embedded one (same query images), and the adapted
teacher's test accuracy in bf16 against fp32.

    python bench/ceiling.py                  # the main job's models on this machine (kit teacher, resnet10t)
    python bench/ceiling.py --tiny           # seconds: tiny models on generated images (CI runs it)
    python bench/ceiling.py --teacher-model ViT-B-32 --teacher-pretrained '' --teacher-size 224 \\
        --student resnet18 --student-size 224 --batch-size 256 --images 8192          # GPU sizes

Stages: embed (shards -> embedding set, `embed_partition`), teacher cache (`build_cache`, one view per image),
distill (one `rakt distill` epoch from the cache), finetune (`rakt finetune` on the labelled images), evaluate
(`rakt evaluate`). Model building is not timed. `--out FILE` also writes the table as JSON.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TARGET = 0.7  # the ratio every stage should reach


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from rakt.pipeline.io import kit_dir

    kit = kit_dir()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(kit), help="the data kit (pool, CIFAR-10, teacher)")
    p.add_argument("--teacher-model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--teacher-pretrained", default=str(kit / "teachers" / "tf_efficientnet_lite0.in1k.safetensors"))
    p.add_argument("--teacher-size", type=int, default=96)
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--student-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64,
                   help="distill batch, as the default's (embed/cache/evaluate use 256)")
    p.add_argument("--finetune-batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=4096, help="pool images embedded, cached and distilled")
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--steps", type=int, default=0, help="compute-only timed steps (0 = enough for ~10 s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny models and generated images: a smoke run for CI")
    p.add_argument("--precision-check", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="", help="also write the results as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ compute only

def rate(step, items: int, device, seconds: float = 8.0, steps: int = 0, warmup: int = 2) -> float:
    """items/s of `step()` (warm-up first; as many steps as fit in `seconds`, or `steps`)."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    done, start = 0, time.perf_counter()
    while (steps and done < steps) or (not steps and time.perf_counter() - start < seconds) or done < 2:
        step()
        done += 1
    sync()
    return done * items / (time.perf_counter() - start)


def layouts(device):
    """(column name, channels_last, autocast dtype) of the compute-only columns. The low-precision column only where
    `--precision auto` picks it: a CPU without native bf16 emulates it at a fraction of fp32's speed."""
    from rakt.pipeline.device import autocast_dtype, dtype_name

    columns = [("fp32", False, None), ("channels_last", True, None)]
    low = autocast_dtype(device, "auto")
    return columns + [(f"channels_last+{dtype_name(low)}", True, low)] if low is not None else columns


def inference_ceiling(model, batch: int, size: int, device, args) -> dict[str, float]:
    import torch

    from rakt.pipeline.device import autocast

    out = {}
    for name, cl, dtype in layouts(device):
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        x = torch.rand(batch, 3, size, size, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()

        def step():
            with torch.inference_mode(), autocast(device, dtype):
                m(x)
        out[name] = rate(step, batch, device, steps=args.steps)
    model.to(memory_format=torch.channels_last)
    return out


def training_ceiling(student_factory, batch: int, size: int, classes: int, device, args, kd: bool) -> dict[str, float]:
    import torch

    from rakt.distill.losses import kd_loss
    from rakt.distill.train_loop import adamw
    from rakt.pipeline.device import autocast

    out = {}
    for name, cl, dtype in layouts(device):
        student = student_factory().to(device).train()
        student = student.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        opt = adamw([{"params": list(student.parameters())}], device, lr=1e-3)
        x = torch.rand(batch, 3, size, size, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
        target = torch.randn(batch, classes, device=device)
        labels = torch.randint(0, classes, (batch,), device=device)

        def step():
            with autocast(device, dtype):
                logits = student(x)
            loss = kd_loss(logits, target, 4.0) if kd else torch.nn.functional.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
        out[name] = rate(step, batch, device, steps=args.steps)
    return out


# ------------------------------------------------------------------------------------------------ the data

def write_pool_slice(args, root: Path) -> tuple[list[str], list[str], list[str]]:
    """(transfer shards, labelled shards, test shards): `--images` pool images, 10 labelled per class, test images."""
    import numpy as np
    import webdataset as wds

    from rakt.pipeline.sources import open_source

    out = root / "data"
    (out / "pool").mkdir(parents=True, exist_ok=True)
    (out / "labelled").mkdir(exist_ok=True)
    (out / "test").mkdir(exist_ok=True)
    classes = [f"c{i}" for i in range(10)]
    if args.tiny:
        from PIL import Image
        import io
        rng = np.random.default_rng(0)

        def jpg(i):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
            return buf.getvalue()
        pool = [(f"p{i:06d}", jpg(i), None) for i in range(args.images)]
        labelled = [(f"l{i:04d}", jpg(i), i % 10) for i in range(100)]
        test = [(f"t{i:05d}", jpg(i), i % 10) for i in range(args.test_images)]
    else:
        data = Path(args.data)
        classes = (data / "target" / "cifar10" / "classes.txt").read_text().split()
        stats: collections.Counter = collections.Counter()

        def take(specs, n, per_class=0):
            src = open_source(specs, per_class=per_class)
            got = []
            for part in src.partitions:
                for s in src.read(part, stats):
                    got.append((s.id, s.image, s.label))
                    if len(got) >= n:
                        return got
            return got
        pool = take([str(data / "pool" / f"pool-{i:06d}.tar.gz") for i in range(13)], args.images)
        labelled = take([str(data / "target" / "cifar10" / f"cifar10-train-{i:06d}.tar.gz") for i in range(5)], 100,
                        per_class=10)
        test = take([str(data / "target" / "cifar10" / "cifar10-test-000000.tar.gz")], args.test_images)
    for name, rows in (("pool", pool), ("labelled", labelled), ("test", test)):
        with wds.TarWriter(str(out / name / f"{name}-000000.tar"), encoder=False) as sink:
            for key, image, label in rows:
                sample = {"__key__": key, "jpg": image}
                if label is not None:
                    sample["cls"] = str(label).encode()
                sink.write(sample)
        (out / name / "classes.txt").write_text("\n".join(classes) + "\n")
    return [str(out / "pool" / "pool-000000.tar")], [str(out / "labelled" / "labelled-000000.tar")], \
        [str(out / "test" / "test-000000.tar")]


# ------------------------------------------------------------------------------------------------ the stages

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rakt-ceiling-") as tmp:  # ~250 MB of shards and checkpoints
        return measure(args, Path(tmp))


def measure(args, root: Path) -> dict:
    """Run every stage through rakt's code and its compute-only ceiling; working files go under `root`."""
    import torch

    from rakt.distill import distill, evaluate, finetune
    from rakt.distill.image_bank import open_bank
    from rakt.distill.batches import ViewSpec
    from rakt.distill.students import create_student
    from rakt.distill.teacher.checkpoint import save_teacher
    from rakt.pipeline.pixels import PixelPipeline
    from rakt.distill.teacher.modes import build_teacher
    from rakt.distill.teacher_cache import build_cache
    from rakt.pipeline.config import EncoderConfig, from_dict
    from rakt.stages import STAGES
    from rakt.pipeline.device import autocast_dtype, device_name, dtype_name, resolve_device, set_threads
    from rakt.pipeline.embed import embed_partition
    from rakt.pipeline.encoders import load_image_encoder
    from rakt.pipeline.encoders import TINY_CLIP
    from rakt.pipeline.sources import open_source

    device = resolve_device(args.device)
    threads = set_threads()
    if args.tiny:
        args.teacher_model, args.teacher_pretrained, args.teacher_size = TINY_CLIP, "", 32
        args.student_size = 32
        args.images, args.test_images = min(args.images, 512), min(args.test_images, 256)
        args.steps = args.steps or 3
        args.precision_check = False
    transfer, labelled, test = write_pool_slice(args, root)
    low = autocast_dtype(device, "auto")
    print(f"device   {device_name(device)}, torch {torch.__version__}, {threads} threads; --precision auto -> "
          f"{dtype_name(low)}")
    rows = []

    def report(stage, what, ours, ceiling):
        best = max(ceiling.values())
        row = {"stage": stage, "what": what, "rakt": round(ours, 1), **{k: round(v, 1) for k, v in ceiling.items()},
               "ratio": round(ours / best, 2)}
        rows.append(row)
        print(f"{stage:<12} {what:<44} rakt {ours:8.1f} img/s   " +
              "   ".join(f"{k} {v:8.1f}" for k, v in ceiling.items()) + f"   ratio {row['ratio']:.2f}", flush=True)

    # 1. embed: shards -> embedding set through embed_partition (decode + preprocess + encode + parquet)
    enc_cfg = EncoderConfig(model=args.teacher_model, pretrained=args.teacher_pretrained, image_size=args.teacher_size,
                            device=str(device), batch_size=256)
    encoder = load_image_encoder(enc_cfg)
    source = open_source(transfer)
    out = root / "emb"
    out.mkdir()
    from rakt.pipeline.device import loader_workers
    start = time.perf_counter()
    stats = embed_partition(encoder, source, source.partitions[0], out, batch_size=256,
                            workers=loader_workers(-1, device))
    ours = stats["count"] / (time.perf_counter() - start)
    crop = PixelPipeline.from_transform(encoder.preprocess).crop
    report("embed", f"{encoder.model_id.split(':')[1]} @{crop}px, batch 256", ours,
           inference_ceiling(encoder.model, 256, crop, device, args))

    # 2. teacher cache: the teacher on every image of the decoded transfer set (one view)
    teacher = build_teacher(enc_cfg, 10, "linear", encoder=encoder)
    teacher_path = root / "teacher.pt"
    save_teacher(teacher_path, teacher, {"encoder": {"model": args.teacher_model, "pretrained": args.teacher_pretrained,
                                                     "image_size": args.teacher_size},
                                         "model_id": teacher.model_id, "mode": "linear",
                                         "classes": [f"c{i}" for i in range(10)]})
    bank = open_bank(transfer, args.student_size)
    start = time.perf_counter()
    build_cache(teacher, bank, str(teacher_path), kind="same", views=1, spec=ViewSpec("crop"), seed=0,
                features=False, device=device, batch_size=256, folder=None)
    ours = len(bank) / (time.perf_counter() - start)
    report("cache", f"teacher @{teacher.input_size}px, batch 256", ours,
           inference_ceiling(teacher, 256, teacher.input_size, device, args))
    del encoder

    # 3. distill: one epoch of `rakt distill` from the teacher cache
    common = {"device": str(device), "checkpoint_every": 0, "resume": False, "seed": 0}
    summary = distill.run(from_dict(STAGES["distill"].config, {
        **common, "transfer": transfer, "teacher": str(teacher_path), "student": args.student,
        "image_size": args.student_size, "epochs": 1, "batch_size": args.batch_size, "cache_teacher": True,
        "cache_views": 1, "out": str(root / "distill")}))
    factory = lambda: create_student(args.student, 10, image_size=args.student_size)  # noqa: E731
    report("distill", f"{args.student} @{args.student_size}px, batch {args.batch_size}, KD from cache",
           summary["images_per_s"], training_ceiling(factory, args.batch_size, args.student_size, 10, device, args,
                                                     kd=True))
    print(f"             distill wall time by part: {summary['seconds_by_part']}")
    student_ceiling = rows[-1]

    # 3b. distill with the online teacher (no cache): student step + teacher forward on the same views
    summary = distill.run(from_dict(STAGES["distill"].config, {
        **common, "transfer": transfer, "teacher": str(teacher_path), "student": args.student,
        "image_size": args.student_size, "epochs": 1, "batch_size": args.batch_size, "cache_teacher": False,
        "out": str(root / "distill-online")}))
    forward = inference_ceiling(teacher, args.batch_size, teacher.input_size, device, args)
    both = {k: 1 / (1 / student_ceiling[k] + 1 / forward[k]) for k in forward}
    report("distill", f"{args.student} @{args.student_size}px, batch {args.batch_size}, online teacher",
           summary["images_per_s"], both)
    print(f"             distill wall time by part: {summary['seconds_by_part']}")
    del teacher

    # 4. finetune: `rakt finetune` on the labelled images
    epochs = 4 if args.tiny else 40
    summary = finetune.run(from_dict(STAGES["finetune"].config, {
        **common, "student": str(root / "distill" / "student.pt"), "target": labelled, "epochs": epochs,
        "batch_size": args.finetune_batch_size, "out": str(root / "finetune")}))
    report("finetune", f"{args.student} @{args.student_size}px, batch {args.finetune_batch_size}, CE",
           summary["images_per_s"], training_ceiling(factory, args.finetune_batch_size, args.student_size, 10, device,
                                                     args, kd=False))

    # 5. evaluate: `rakt evaluate` on test images
    start = time.perf_counter()
    got = evaluate.run(from_dict(STAGES["evaluate"].config, {"source": test, "checkpoint": str(root / "finetune" / "student.pt"),
                                                      "device": str(device), "out": str(root / "eval.json")}))
    ours = got["count"] / (time.perf_counter() - start)
    student = factory().to(device).eval()
    report("evaluate", f"{args.student} @{args.student_size}px, batch 256", ours,
           inference_ceiling(student, 256, args.student_size, device, args))

    worst = min(r["ratio"] for r in rows)
    print(f"lowest ratio {worst:.2f} (target >= {TARGET})")
    result = {"device": device_name(device), "torch": torch.__version__, "precision": dtype_name(low), "rows": rows}
    if args.precision_check and low is None:
        print("precision: --precision auto runs fp32 on this device, so there is no bf16 answer to check")
    elif args.precision_check:
        result["precision_check"] = precision_check(args, device, root)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------------ bf16 vs fp32

def precision_check(args, device, root: Path) -> dict:
    """recall@10 of bf16 retrieval against fp32, and the adapted teacher's test accuracy, bf16 vs fp32."""
    import numpy as np

    from rakt.distill.teacher import adapt
    from rakt.pipeline import embed
    from rakt.pipeline.config import from_dict
    from rakt.stages import STAGES
    from rakt.pipeline.formats import embedding_matrix, read_embedding_set

    data = Path(args.data)
    pool = [str(data / "pool" / "pool-000000.tar.gz")]
    queries = [str(data / "target" / "cifar10" / "cifar10-test-000000.tar.gz")]
    train = [str(data / "target" / "cifar10" / f"cifar10-train-{i:06d}.tar.gz") for i in range(5)]
    enc = {"model": args.teacher_model, "pretrained": args.teacher_pretrained, "image_size": args.teacher_size,
           "device": str(device)}
    pools, queries_at, accuracy = {}, {}, {}
    for precision in ("fp32", "bf16"):
        vectors = {}
        for name, spec in (("pool", pool), ("queries", queries)):
            out = root / f"{name}-{precision}"
            embed.run(from_dict(STAGES["embed"].config, {**enc, "precision": precision, "source": spec, "out": str(out)}))
            vectors[name] = embedding_matrix(read_embedding_set(out)[1])[:1000 if name == "queries" else None]
        pools[precision], queries_at[precision] = vectors["pool"], vectors["queries"]
        got = adapt.run(from_dict(STAGES["adapt"].config, {**enc, "precision": precision, "mode": "finetune",
                                                    "train": train, "per_class": 10, "eval": queries,
                                                    "out": str(root / f"teacher-{precision}.pt")}))
        accuracy[precision] = got["accuracy"]
    def top10(q, pool):
        return np.argsort(-(q @ pool.T), axis=1)[:, :10]

    def recall_of(a, b):
        return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]))

    exact = top10(queries_at["fp32"], pools["fp32"])
    recall = recall_of(top10(queries_at["fp32"], pools["bf16"]), exact)  # the same (fp32) queries, the pool varies
    both = recall_of(top10(queries_at["bf16"], pools["bf16"]), exact)  # queries at the pool's precision too
    check = {"pool_images": 10000, "queries": 1000, "recall_at_10_bf16_vs_fp32": round(recall, 4),
             "recall_at_10_bf16_queries_too": round(both, 4),
             "teacher_accuracy_fp32": accuracy["fp32"], "teacher_accuracy_bf16": accuracy["bf16"],
             "teacher_accuracy_diff_points": round(100 * (accuracy["bf16"] - accuracy["fp32"]), 2)}
    print(f"precision: recall@10 of bf16 retrieval vs fp32 over {check['pool_images']} pool images, "
          f"{check['queries']} test-image queries (fp32, the same for both pools): {recall:.3f} (target >= 0.95); "
          f"with the queries embedded in bf16 too: {both:.3f}; adapted teacher (finetune) test "
          f"accuracy fp32 {100 * accuracy['fp32']:.2f}%, bf16 {100 * accuracy['bf16']:.2f}% "
          f"({check['teacher_accuracy_diff_points']:+.2f} points; target within 0.5)")
    return check


if __name__ == "__main__":
    main()
