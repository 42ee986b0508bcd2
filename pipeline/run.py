"""`rakt run CONFIG.yaml`: the whole pipeline from one config, as named steps in a run directory.

A step is one stage call (pipeline/cli.py RUNNERS) with a config built from the run config. Its identity is the
hash of that config (run-directory paths written as ${run_dir}) and of the steps it reads. `steps/NAME.json` is
written when a step finishes; a rerun skips a step whose record has the same hash, clears and reruns one whose
settings or inputs changed, and lets a step that was killed (`steps/NAME.started.json` without a record) resume
through its stage's own resume. Experiment arms (distill -> finetune -> evaluate per transfer set, method and
seed) are steps too; results.json, results.csv and the report are written at the end.
"""
from __future__ import annotations

import copy
import datetime as dt
import importlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import STAGES, ConfigError, from_dict, to_dict
from pipeline.io import InputError, atomic_path, json_hash, kit_dir, read_json, write_json

log = logging.getLogger("rakt.run")

STEPS_DIR = "steps"
ENCODER_KEYS = ("model", "pretrained", "image_size", "batch_size", "workers", "device", "precision")
TRANSFER_SETS = ("retrieved", "random", "target")
INTERNAL_STAGES = ("init", "labelled")
LABELLED_SHARD = "labelled/labelled-000000.tar"
METHODS = ("task", "agnostic", "progressive")
# Fault injection for the kill/resume tests: SIGKILL this process when a named step's work is done but before its
# record is written (comma-separated step names); fast steps can finish before an outside kill lands.
KILL_BEFORE_RECORD = "RAKT_FAULT_KILL_BEFORE_RECORD"
KEY = re.compile(r"[A-Za-z0-9_-]+")  # ids usable as WebDataset keys as they are


@dataclass
class Step:
    name: str                        # e.g. "target", "arms/retrieved-task-s0/distill"
    stage: str                       # a STAGES key, "init" (a fresh student) or "labelled" (the few-shot draw)
    config: Any                      # the stage's config dataclass
    deps: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # cleared when the step reruns with other settings


# ----------------------------------------------------------------------------------------------- the config

CONFIGS = Path(str(resources.files("pipeline") / "configs"))


def default_config_path() -> Path:
    return CONFIGS / "default.yaml"


def load_run_config(path: str | None, overrides: list[str] = (), run_dir: str = "") -> dict:
    """The run config: the embedded default (or `base:`) deep-merged with the file, then `--set` overrides."""
    base = _read_yaml(default_config_path())
    if path and not os.path.exists(path) and (CONFIGS / f"{path}.yaml").exists():
        path = str(CONFIGS / f"{path}.yaml")  # an embedded config by name: default, experiment
    if path:
        own = _read_yaml(Path(path))
        parent = own.pop("base", "default")
        if parent and parent != "default":
            base = load_run_config(str(Path(path).parent / parent))
        base = _merge(base, own)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. --set distill.epochs=3")
        _set_key(base, key.strip().split("."), yaml.safe_load(value))
    if run_dir:
        base["run_dir"] = run_dir
    _check_keys(base)
    return base


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"run config not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_key(cfg: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        cfg = cfg.setdefault(key, {})
        if not isinstance(cfg, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{key}' is not a section")
    cfg[keys[-1]] = value


def _check_keys(cfg: dict) -> None:
    known = set(_read_yaml(default_config_path()))
    unknown = sorted(set(cfg) - known)
    if unknown:
        import difflib
        hint = difflib.get_close_matches(unknown[0], known, n=1)
        raise ConfigError(f"run config: unknown key '{unknown[0]}'" + (f"; did you mean '{hint[0]}'?" if hint else
                                                                        f"; known keys: {', '.join(sorted(known))}"))
    arm_runs(cfg)  # checks every arm name


def arm_runs(cfg: dict) -> list[tuple[str, str, int]]:
    """(transfer set, method, seed) of every arm run, in run order: `arms` for every seed, then `extra_arms`
    (costly ablations) for the first seed only."""
    exp = cfg["experiment"]
    seeds = exp.get("seeds") or [0]
    runs = [(*parse_arm(a), seed) for seed in seeds for a in exp.get("arms") or []]
    return runs + [(*parse_arm(a), seeds[0]) for a in exp.get("extra_arms") or []]


def parse_arm(arm: str) -> tuple[str, str]:
    """'labelled' -> ('labelled', 'none'); 'retrieved/task' -> ('retrieved', 'task')."""
    if arm == "labelled":
        return "labelled", "none"
    tset, _, method = arm.partition("/")
    if tset not in TRANSFER_SETS or method not in METHODS:
        raise ConfigError(f"experiment arm {arm!r}: expected 'labelled' or SET/METHOD with SET in "
                          f"{', '.join(TRANSFER_SETS)} and METHOD in {', '.join(METHODS)}")
    return tset, method


def _expand(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for key, sub in subs.items():
            value = value.replace("${" + key + "}", sub)
        return value
    if isinstance(value, list):
        return [_expand(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, subs) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------------- the plan

def plan(cfg: dict) -> list[Step]:
    """Every step of the run config, in order (each step's deps come before it)."""
    run = Path(cfg["run_dir"])
    data = cfg.get("data") or str(kit_dir())
    cfg = _expand(cfg, {"data": data})
    t, enc = cfg["target"], {k: v for k, v in cfg["teacher"].items() if k in ENCODER_KEYS}
    p = lambda name: str(run / name)  # noqa: E731
    steps: list[Step] = []

    def add(name, stage, values, deps=(), outputs=None):
        internal = stage in INTERNAL_STAGES
        section = {} if internal else cfg.get(stage) or {}
        where = f"run config, step '{name}'"
        config = values if internal else from_dict(STAGES[stage], {**section, **values}, where=where)
        steps.append(Step(name, stage, config, list(deps), outputs or [values["out"]]))

    # the few-shot draw, read once from the target's train shards and written as one small shard that every later
    # step reads (a per-class draw re-reads all of the target's shards: ~10 s for CIFAR-10 train)
    add("labelled", "labelled", {"source": t["train"], "per_class": t["per_class"], "seed": t["seed"],
                                 "out": p("labelled")})
    add("target", "embed", {**enc, "source": [p(LABELLED_SHARD)], "split": "train", "out": p("target")},
        ["labelled"])
    add("eval", "embed", {**enc, "source": t["test"], "split": "test", "out": p("eval")})
    index = cfg.get("index_spec") or f"faiss:{p('index')}"
    if not cfg.get("index_spec"):
        add("index", "index", {**enc, "source": cfg["pool"], "out": p("index")})
    index_deps = [] if cfg.get("index_spec") else ["index"]
    add("candidates", "retrieve", {"embeddings": p("target"), "index": index, "out": p("candidates")},
        ["target", *index_deps])
    add("manifest", "curate", {"candidates": p("candidates"), "eval_embeddings": p("eval"), "out": p("manifest")},
        ["candidates", "eval"])
    collect = cfg.get("collect", "materialize")
    if collect not in ("materialize", "download"):
        raise ConfigError(f"run config: collect must be materialize or download, got {collect!r}")
    add("shards", collect, {"manifest": p("manifest"), "out": p("shards")}, ["manifest"])

    adapt = {**enc, "seed": t["seed"], "out": p("teacher.pt")}
    if (cfg.get("adapt") or {}).get("mode", "linear") in ("linear", "zeroshot"):
        adapt.update(embeddings=p("target"), eval=[p("eval")])  # the embeddings of `target`, not recomputed
    else:
        adapt.update(train=[p(LABELLED_SHARD)], per_class=0, eval=t["test"])
    add("teacher", "adapt", adapt, ["target", "eval", "labelled"], [p("teacher.pt"), p("teacher.pt.json")])

    arms = arm_runs(cfg)
    sets = {"retrieved": "shards"}
    if any(s == "random" for s, _, _ in arms):
        pool = index.removeprefix("faiss:").split("?")[0]
        add("random-manifest", "sample", {"source": [pool], "like": p("manifest"), "out": p("random-manifest")},
            ["manifest", *index_deps])
        add("random-shards", collect, {"manifest": p("random-manifest"), "out": p("random-shards")},
            ["random-manifest"])
        sets["random"] = "random-shards"
    if any(s == "target" for s, _, _ in arms):
        add("target-manifest", "sample", {"source": t["train"], "like": p("manifest"), "exclude": [p("target")],
                                          "out": p("target-manifest")}, ["manifest", "target"])
        add("target-shards", "materialize", {"manifest": p("target-manifest"), "out": p("target-shards")},
            ["target-manifest"])
        sets["target"] = "target-shards"

    labelled = {"target": [p(LABELLED_SHARD)], "per_class": 0}
    for tset, method, seed in arms:
        arm = f"arms/{tset}-{method}-s{seed}"
        if tset == "labelled":
            d = cfg.get("distill") or {}
            add(f"{arm}/init", "init", {"student": d.get("student", "resnet18"), "seed": seed,
                                        "small_input": d.get("small_input", False),
                                        "image_size": d.get("image_size", 0), "embeddings": p("target"),
                                        "out": p(f"{arm}/init/student.pt")}, ["target"])
            ft = {**(cfg.get("finetune") or {}), **cfg["experiment"].get("labelled", {})}
            steps.append(Step(f"{arm}/finetune", "finetune", from_dict(
                STAGES["finetune"], {**ft, **labelled, "student": p(f"{arm}/init/student.pt"), "seed": seed,
                                     "out": p(f"{arm}/finetune")}, where=f"run config, arm {arm}"),
                [f"{arm}/init", "labelled"], [p(f"{arm}/finetune")]))
        else:
            # task KD: the labelled images are distilled as transfer images; feature KD (agnostic, progressive)
            # learns no classifier from the teacher, so the labelled images join every step with hard-label CE
            add(f"{arm}/distill", "distill", {"transfer": [p(sets[tset])], "teacher": p("teacher.pt"),
                                              "mode": method, "seed": seed, "target": [p(LABELLED_SHARD)],
                                              "target_mix": "transfer" if method == "task" else "step",
                                              "target_per_class": 0, "out": p(f"{arm}/distill")},
                [sets[tset], "teacher", "labelled"])
            add(f"{arm}/finetune", "finetune", {**labelled, "student": p(f"{arm}/distill/student.pt"),
                                                "seed": seed, "out": p(f"{arm}/finetune")},
                [f"{arm}/distill", "labelled"])
        add(f"{arm}/evaluate", "evaluate", {"source": t["test"], "checkpoint": p(f"{arm}/finetune/student.pt"),
                                            "out": p(f"{arm}/eval.json")}, [f"{arm}/finetune"])
    return steps


# -------------------------------------------------------------------------------------------- the execution

def step_hashes(steps: list[Step], run_dir: str) -> dict[str, str]:
    """Each step's hash: its config (run-dir paths relative) and its deps' hashes."""
    prefix = str(Path(run_dir))
    hashes: dict[str, str] = {}
    for s in steps:
        values = s.config if isinstance(s.config, dict) else to_dict(s.config)
        values = json.loads(json.dumps(values, default=str).replace(prefix, "${run_dir}"))
        hashes[s.name] = json_hash({"stage": s.stage, "config": values, "deps": [hashes[d] for d in s.deps]})
    return hashes


def record_path(run_dir: str | Path, name: str, suffix: str = ".json") -> Path:
    return Path(run_dir) / STEPS_DIR / (name + suffix)


def step_state(run_dir: str | Path, name: str, digest: str) -> str:
    """done | started (running now, or killed: a rerun resumes it) | changed (finished with other settings or
    inputs) | pending."""
    rec, started = record_path(run_dir, name), record_path(run_dir, name, ".started.json")
    if started.exists() and read_json(started, "step marker").get("config_hash") == digest:
        return "started"
    if rec.exists():
        return "done" if read_json(rec, "step record").get("config_hash") == digest else "changed"
    return "started" if started.exists() else "pending"


def execute(cfg: dict, *, only: str = "") -> dict:
    """Run (or skip) every step of the run config; returns {"run_dir", "ran", "skipped", "results"}."""
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / "run.yaml") as tmp:
        Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=False))
    steps = plan(cfg)
    hashes = step_hashes(steps, str(run_dir))
    wanted = needed(steps, only) if only else {s.name for s in steps}
    ran, skipped = [], []
    for i, step in enumerate(steps, 1):
        if step.name not in wanted:
            continue
        digest, state = hashes[step.name], step_state(run_dir, step.name, hashes[step.name])
        label = f"[{i}/{len(steps)}] {step.name} ({step.stage})"
        if state == "done":
            log.info("%s: done, unchanged; skipped", label)
            skipped.append(step.name)
            continue
        started = record_path(run_dir, step.name, ".started.json")
        if state == "changed" or (state == "started" and
                                  read_json(started, "step marker").get("config_hash") != digest):
            log.info("%s: settings or inputs changed; clearing %s", label, ", ".join(step.outputs))
            record_path(run_dir, step.name).unlink(missing_ok=True)  # its outputs go: so does the claim they exist
            _clear(step.outputs)
        elif state == "started":
            log.info("%s: resuming an interrupted run", label)
        log.info("%s: running", label)
        began = time.time()
        write_json(started, {"step": step.name, "config_hash": digest, "started": _now()})
        result = run_step(step)
        if step.name in os.environ.get(KILL_BEFORE_RECORD, "").split(","):
            _kill_self(step.name)
        write_json(record_path(run_dir, step.name), {
            "step": step.name, "stage": step.stage, "config_hash": digest, "status": "done",
            "started": dt.datetime.fromtimestamp(began, dt.timezone.utc).isoformat(timespec="seconds"),
            "finished": _now(), "seconds": round(time.time() - began, 2), "device": device_name(),
            "config": step.config if isinstance(step.config, dict) else to_dict(step.config), "result": result})
        started.unlink(missing_ok=True)
        ran.append(step.name)
    from pipeline.results import write_results
    results = write_results(run_dir, cfg)
    if cfg["experiment"].get("report", True) and results.get("arms"):
        from pipeline.report import write_report
        results["report"] = write_report(run_dir)
    return {"run_dir": str(run_dir), "ran": ran, "skipped": skipped, "results": results}


def needed(steps: list[Step], only: str) -> set[str]:
    """The steps named `only` (or under it, e.g. arms/retrieved-task-s0) and every step they read from."""
    by_name = {s.name: s for s in steps}
    todo = [s.name for s in steps if s.name == only or s.name.startswith(only.rstrip("/") + "/")]
    if not todo:
        raise ConfigError(f"--only {only!r}: no such step; steps: {', '.join(by_name)}")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += by_name[name].deps
    return seen


def run_step(step: Step) -> dict:
    if step.stage == "init":
        return init_student(**step.config)
    if step.stage == "labelled":
        return write_labelled(**step.config)
    from pipeline.cli import RUNNERS
    module = importlib.import_module(RUNNERS[step.stage][0])
    return module.run(step.config)


def init_student(student: str, seed: int, small_input: bool, image_size: int, embeddings: str, out: str) -> dict:
    """A randomly initialised student checkpoint for the labelled-only arm (classes from the embedding set)."""
    from distill.students import create_student, save_student
    from distill.trainer import seed_everything
    classes = read_json(Path(embeddings) / "embeddings.json", "embedding set").get("classes") or []
    if not classes:
        raise InputError(f"{embeddings}: the embedding set records no classes; the student needs the class count")
    seed_everything(seed)
    model = create_student(student, len(classes), small_input=small_input, image_size=image_size or None)
    save_student(out, model, {"stage": "init", "classes": classes, "seed": seed})
    return {"student": out, "classes": len(classes)}


def write_labelled(source: list[str], per_class: int, seed: int, out: str) -> dict:
    """The labelled images of `source` (few-shot draw of `per_class` with `seed`, as every stage draws it), in
    source order, as one WebDataset shard OUT/labelled-000000.tar (original bytes, KEY.cls, KEY.json) + classes.txt.
    KEY is the sample's own id where it is a plain WebDataset key (so embeddings and queries keep the ids), else its
    position."""
    import collections
    import io as _io

    from PIL import Image
    from webdataset import TarWriter

    from pipeline.sources import open_source
    src = open_source(source, per_class=per_class, seed=seed)
    if not src.classes:
        raise InputError(f"{', '.join(source)}: no class names (classes.txt beside the shards or folders of classes)")
    stats: collections.Counter = collections.Counter()
    dest = Path(out, Path(LABELLED_SHARD).name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(out, "classes.txt")) as tmp:
        tmp.write_text("".join(f"{c}\n" for c in src.classes))
    count, per_label, keys = 0, collections.Counter(), set()
    with atomic_path(dest) as tmp, TarWriter(str(tmp), encoder=False, mtime=946684800) as sink:
        for partition in src.partitions:
            for sample in src.read(partition, stats):
                if sample.label is None:
                    continue
                try:
                    with Image.open(_io.BytesIO(sample.image)) as img:
                        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(img.format or "", "png")
                except (OSError, ValueError, SyntaxError) as e:  # counted and skipped, as load_images does
                    stats["undecodable_image"] += 1
                    log.warning("%s: undecodable image (%s); skipped", sample.id, e)
                    continue
                meta = {"id": sample.id, "split": sample.split, "source": sample.locator}
                key = sample.id if KEY.fullmatch(sample.id) and sample.id not in keys else f"{count:06d}"
                keys.add(key)
                sink.write({"__key__": key, ext: sample.image, "cls": str(sample.label).encode(),
                            "json": json.dumps(meta, sort_keys=True).encode()})
                count += 1
                per_label[src.classes[sample.label]] += 1
    if not count:
        raise InputError(f"{', '.join(source)}: no labelled images ({dict(stats) or 'no samples'})")
    return {"shard": str(dest), "images": count, "per_class": dict(sorted(per_label.items())), "skipped": dict(stats)}


def _clear(paths: list[str]) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)


def _kill_self(step_name: str) -> None:
    import signal
    log.warning("%s=%s: killing this run before step %s is recorded", KILL_BEFORE_RECORD,
                os.environ[KILL_BEFORE_RECORD], step_name)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def device_name() -> str:
    """'cuda: NVIDIA H100 ...' or 'cpu: MODEL (N cores)'."""
    import torch
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu: {model or 'unknown'} ({os.cpu_count()} cores)"


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved config a run directory was last run with (its run.yaml)."""
    if not (Path(run_dir) / "run.yaml").exists():
        raise InputError(f"{run_dir}: no run.yaml; is this a run directory of `rakt run`?")
    return {**_read_yaml(Path(run_dir) / "run.yaml"), "run_dir": str(run_dir)}


def status(run_dir: str | Path) -> list[dict]:
    """Every step of the run recorded in RUN_DIR/run.yaml with its state, seconds and a short result."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    steps = plan(cfg)
    hashes = step_hashes(steps, str(run_dir))
    rows = []
    for s in steps:
        state = step_state(run_dir, s.name, hashes[s.name])
        rec = read_json(record_path(run_dir, s.name), "step record") if state in ("done", "changed") else {}
        rows.append({"step": s.name, "stage": s.stage, "state": state, "seconds": rec.get("seconds"),
                     "result": _short(rec.get("result") or {})})
    return rows


def _short(result: dict) -> str:
    keys = ("accuracy", "samples", "selected", "count", "n_candidates", "steps", "images_per_s", "kind")
    return ", ".join(f"{k}={result[k]}" for k in keys if k in result)


def status_text(run_dir: str | Path) -> str:
    rows = status(run_dir)
    width = max(len(r["step"]) for r in rows)
    lines = [f"{'step':<{width}}  {'stage':<11} {'state':<11} {'seconds':>8}  result"]
    for r in rows:
        secs = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        lines.append(f"{r['step']:<{width}}  {r['stage']:<11} {r['state']:<11} {secs:>8}  {r['result']}")
    done = sum(r["state"] == "done" for r in rows)
    lines.append(f"{done} of {len(rows)} steps done")
    results = Path(run_dir) / "results.csv"
    if results.exists():
        lines.append(f"results: {results}" + (f", report: {Path(run_dir) / 'report.html'}"
                                              if (Path(run_dir) / "report.html").exists() else ""))
    return "\n".join(lines)

