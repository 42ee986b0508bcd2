"""The distillation recipe, measured on a validation split: variants of `rakt distill` (+ `rakt finetune`) on the
transfer set and teacher of a finished `rakt run` whose "test" set is the validation split (bench/val_split.py),
each scored on that split after distillation and after the finetune step, with its wall time.

    python bench/val_split.py --out runs/val
    rakt run --set 'target.test=["runs/val/val-000000.tar"]' --run-dir runs/dev
    python bench/recipe.py --run-dir runs/dev --variants base no-ce clean-shift plain
    python bench/recipe.py --run-dir runs/dev --budget 5000 --epochs 20 --variants plain   # another transfer set

Variants are named sets of `rakt distill` settings over the run's own distill config (see VARIANTS); the test set
is never read. Prints one row per variant and appends it to RUN_DIR/recipe.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# name -> distill settings over the run config's distill section ("labelled_in_transfer": the labelled images join
# the transfer set as unlabelled images instead of a per-step labelled stream with hard-label CE)
VARIANTS: dict[str, dict] = {
    "base": {},
    "no-ce": {"hard_weight": 0.0},
    "no-labelled": {"labelled": "none"},
    "labelled-in-transfer": {"labelled": "transfer"},
    "shift": {"augment": "shift"},
    "clean": {"teacher_view": "clean"},
    "clean-shift": {"teacher_view": "clean", "augment": "shift"},
    "plain": {"teacher_view": "clean", "augment": "shift", "labelled": "transfer", "weight_decay": 5e-4},
    "plain-wd05": {"teacher_view": "clean", "augment": "shift", "labelled": "transfer"},
    "views1": {"cache_views": 1},
    "views8": {"cache_views": 8},
    "online": {"cache_teacher": False},
    "online-shift": {"cache_teacher": False, "augment": "shift"},
    # function matching (--mix): the online teacher on the student's mixed views; mix-cached: interpolated targets
    "fm-shift": {"cache_teacher": False, "augment": "shift", "mix": "both"},
    "fm-crop": {"cache_teacher": False, "augment": "crop", "mix": "both"},
    "mix-cached": {"cache_teacher": True, "teacher_view": "clean", "augment": "shift", "mix": "both"},
    "crop08": {"crop_scale": 0.8},
    "t2": {"temperature": 2.0},
    "t1": {"temperature": 1.0},
    "lr4": {"lr": 4e-3},
    "lr1": {"lr": 1e-3},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished `rakt run` directory (test = validation split)")
    parser.add_argument("--variants", nargs="+", default=["base"], help=f"any of: {', '.join(VARIANTS)}; "
                        "KEY=VALUE,KEY=VALUE for an ad-hoc one")
    parser.add_argument("--budget", type=int, default=0, help="curate another transfer set of this size (0 = the run's)")
    parser.add_argument("--curate", default="", help="KEY=VALUE,... curate settings of that set (with --budget)")
    parser.add_argument("--epochs", type=int, default=0, help="distill epochs (0 = the run config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default="", help="another adapted teacher checkpoint (default: the run's)")
    parser.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the finetune step and score it")
    return parser.parse_args(argv)


def transfer_set(run: Path, cfg: dict, budget: int, settings: str = "") -> str:
    """The run's transfer shards, or those of a set curated at `budget` (and `settings`) from the run's candidates."""
    if not budget:
        return str(run / "shards")
    from rakt.pipeline import materialize
    from rakt.pipeline.curate import curate
    from rakt.pipeline.config import from_dict
    from rakt.stages import STAGES

    out = run / f"recipe-sets/b{budget}{'-' + settings.replace(',', '+').replace('=', '') if settings else ''}"
    if not (out / "shards").exists():
        section = {**(cfg.get("curate") or {}), "budget": budget, **(variant(settings) if settings else {})}
        curate.run(from_dict(STAGES["curate"].config, {**section, "candidates": str(run / "candidates"),
                                                 "eval_embeddings": str(run / "eval"), "out": str(out / "manifest")}))
        materialize.run(from_dict(STAGES["materialize"].config, {"manifest": str(out / "manifest"),
                                                           "out": str(out / "shards")}))
    return str(out / "shards")


def variant(spec: str) -> dict:
    """Settings of a variant: comma-separated names of VARIANTS and KEY=VALUE items, later ones winning."""
    import yaml

    settings: dict = {}
    for item in spec.split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            settings[key] = yaml.safe_load(value)
        elif item in VARIANTS:
            settings.update(VARIANTS[item])
        else:
            raise SystemExit(f"unknown variant {item!r}; known: {', '.join(VARIANTS)}")
    return settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from rakt.distill import distill, evaluate, finetune
    from rakt.pipeline.config import from_dict
    from rakt.stages import STAGES
    from rakt.pipeline.device import device_name
    from rakt.run import read_run_config
    from rakt.rundir import LABELLED_SHARD

    run = Path(args.run_dir)
    cfg = read_run_config(run)
    test = cfg["target"]["test"]
    shards = transfer_set(run, cfg, args.budget, args.curate)
    labelled = str(run / LABELLED_SHARD)
    print(f"device {device_name()}, torch {torch.__version__}; transfer {shards}; scored on {test}")
    for spec in args.variants:
        settings = variant(spec)
        mode = settings.pop("labelled", "step")
        dcfg = {**(cfg.get("distill") or {}), **settings, "seed": args.seed,
                "teacher": args.teacher or str(run / "teacher.pt")}
        if args.epochs:
            dcfg["epochs"] = args.epochs
        dcfg["transfer"] = [shards] + ([labelled] if mode == "transfer" else [])
        dcfg["target"] = [labelled] if mode == "step" else []
        dcfg["target_per_class"] = 0
        name = spec.replace("/", "_").replace(",", "+").replace("=", "")
        tag = f"b{args.budget or 'run'}{'-' + args.curate.replace(',', '+').replace('=', '') if args.curate else ''}"
        tag += f"-{Path(args.teacher).stem}" if args.teacher else ""
        out = run / "recipe" / f"{name}-{tag}-e{dcfg['epochs']}-s{args.seed}"
        dcfg["out"] = str(out / "distill")
        dcfg["resume"] = False
        start = time.perf_counter()
        summary = distill.run(from_dict(STAGES["distill"].config, dcfg))
        seconds = time.perf_counter() - start
        score = lambda ckpt, where: evaluate.run(from_dict(STAGES["evaluate"].config, {  # noqa: E731
            "source": test, "checkpoint": ckpt, "out": str(out / where)}))["accuracy"]
        row = {"variant": spec, "teacher": args.teacher or "run", "budget": args.budget, "curate": args.curate,
               "epochs": dcfg["epochs"], "seed": args.seed,
               "transfer_samples": summary["transfer_samples"], "distill_s": round(seconds, 1),
               "images_per_s": summary["images_per_s"], "val_distilled": score(summary["student"], "eval-distill.json")}
        if args.finetune:
            fcfg = {**(cfg.get("finetune") or {}), "student": summary["student"], "target": [labelled],
                    "seed": args.seed, "out": str(out / "finetune"), "resume": False}
            ft = finetune.run(from_dict(STAGES["finetune"].config, fcfg))
            row["val_finetuned"] = score(ft["student"], "eval-finetune.json")
        with open(run / "recipe.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
