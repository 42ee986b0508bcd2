"""Benchmark: distill-like training steps/s alone and beside a busy process, with each thread setting.

    python bench/shared_cores.py                      # before/after x alone/one busy neighbour, 3 repeats, medians
    python bench/shared_cores.py --variants before after passive:2 default:1 --neighbours none busy pinned

Each measurement is a fresh child process (OpenMP reads its settings when torch loads): a ResNet-10t student at
64 px (32-px views upsampled inside), batch 64, KL at T=4 to fixed teacher logits, fused AdamW, bf16 autocast and
channels_last where `--precision auto` picks them, as `rakt distill` trains. A variant is
- `before`: what rakt did before it chose threads for a shared machine: torch loaded with no OpenMP setting,
  one intra-op thread per core this process may use;
- `after`: whatever rakt does now (`rakt.pipeline.device.set_threads()` after importing rakt, as every stage does);
- `POLICY:THREADS`: OMP_WAIT_POLICY (default = unset, passive, active) and a thread count, to explore.
A neighbour is `none`, `busy` (one python busy loop, placed by the scheduler) or `pinned` (the same loop pinned to
the first allowed core). Runs alternate variants within each repeat, so drift in the machine's load hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME")
BUSY_LOOP = "while True: pass"


def child(variant: str, seconds: float, warmup: int) -> dict:
    """One measurement in this process: steps/s of the training loop for `seconds` after `warmup` steps."""
    if variant == "after":
        import rakt.pipeline  # noqa: F401  rakt's package, as a stage imports it before torch
        import torch
        from rakt.pipeline.device import set_threads
        threads = set_threads()
    else:
        import torch
        from rakt.pipeline.device import cpu_cores, keep_freed_memory
        keep_freed_memory()
        threads = cpu_cores() if variant == "before" else int(variant.split(":")[1])
        torch.set_num_threads(threads)
    from rakt.distill.losses import kd_loss
    from rakt.distill.students import create_student
    from rakt.distill.train_loop import adamw
    from rakt.pipeline.device import adapt_threads, autocast, autocast_dtype, channels_last

    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = autocast_dtype(device, "auto")
    student = channels_last(create_student("resnet10t", 10, image_size=64)).train()
    optimizer = adamw([{"params": list(student.parameters())}], device, lr=2e-3, weight_decay=5e-4)
    images, teacher_logits = torch.rand(64, 3, 32, 32), torch.randn(64, 10)

    def step() -> None:
        with autocast(device, dtype):
            loss = kd_loss(student(channels_last(images)), teacher_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        adapt_threads()  # as rakt's trainer does; a no-op unless set_threads chose auto threads

    for _ in range(warmup):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return {"steps_per_s": steps / (time.perf_counter() - start), "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "torch_threads": torch.get_num_threads()}


def child_env(variant: str) -> dict:
    """The child's environment: no inherited OpenMP settings, then the variant's policy."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    if ":" in variant and variant.split(":")[0] != "default":
        env["OMP_WAIT_POLICY"] = variant.split(":")[0].upper()
    return env


def start_neighbour(kind: str) -> subprocess.Popen | None:
    """A python busy loop (pinned to the first allowed core for 'pinned'), or None for 'none'."""
    if kind == "none":
        return None
    first = min(os.sched_getaffinity(0))
    pin = (lambda: os.sched_setaffinity(0, {first})) if kind == "pinned" else None
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=pin)
    time.sleep(0.5)
    return proc


def measure(variant: str, neighbour: str, seconds: float, warmup: int) -> dict:
    busy = start_neighbour(neighbour)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--seconds", str(seconds),
                              "--warmup", str(warmup)], env=child_env(variant), capture_output=True, text=True,
                             check=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["before", "after"])
    parser.add_argument("--neighbours", nargs="+", default=["none", "busy"], choices=("none", "busy", "pinned"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seconds, args.warmup)))
        return
    from rakt.pipeline.device import cpu_bf16_native, device_name

    print(f"device: {device_name(None)}; bf16 autocast: {cpu_bf16_native()}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for neighbour in args.neighbours:
            for variant in (args.variants if repeat % 2 == 0 else args.variants[::-1]):
                res = measure(variant, neighbour, args.seconds, args.warmup)
                runs.setdefault((variant, neighbour), []).append(res)
                print(f"repeat {repeat} {variant:>12} beside {neighbour:<6} {res['steps_per_s']:6.2f} steps/s "
                      f"({res['threads']} threads, OMP_WAIT_POLICY {res['omp_wait_policy']})", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n| variant | threads | {' | '.join(f'steps/s, neighbour {n}' for n in args.neighbours)} |")
    print(f"|---|---:|{'---:|' * len(args.neighbours)}")
    for variant in args.variants:
        medians = [statistics.median(r["steps_per_s"] for r in runs[(variant, n)]) for n in args.neighbours]
        threads = sorted({r["threads"] for n in args.neighbours for r in runs[(variant, n)]})
        print(f"| {variant} | {'/'.join(map(str, threads))} | {' | '.join(f'{m:.2f}' for m in medians)} |")


if __name__ == "__main__":
    main()
