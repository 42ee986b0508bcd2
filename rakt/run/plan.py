"""The plan of `rakt run`: every step of a run config, in order, each a stage call (rakt/stages.py) with a
config built from the run config's section for that stage plus the step's run-directory paths."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rakt.indexes.registry import index_spec, spec_location
from rakt.pipeline.config import ConfigError, EncoderConfig, from_dict
from rakt.pipeline.formats import CARVE_POOL, CARVE_TEST, CARVE_TRAIN
from rakt.pipeline.io import kit_dir
from rakt.run.config import expand
from rakt.rundir import LABELLED, LABELLED_SHARD, TRANSFER_SETS, Arm, arm_runs
from rakt.stages import STAGES, adapt_modes, kd_modes

ENCODER_KEYS = tuple(f.name for f in fields(EncoderConfig))  # the teacher keys that embed and index build take
COLLECT = ("materialize", "download")  # the stages that turn a manifest into shards


@dataclass
class Step:
    name: str                        # e.g. "target", "arms/retrieved-task-s0/distill"
    stage: str                       # a pipeline.stages.STAGES key
    config: Any                      # the stage's config dataclass
    deps: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # cleared when the step reruns with other settings


def plan(cfg: dict, check: bool = True) -> list[Step]:
    """Every step of the run config, in order (each step's deps come before it); with `check`, each step's stage
    checks its settings now (`Stage.check`), so that a bad one fails before the first step, not hours later."""
    run = Path(cfg["run_dir"])
    cfg = expand(cfg, {"data": cfg.get("data") or str(kit_dir())})
    t, enc = cfg["target"], {k: v for k, v in cfg["teacher"].items() if k in ENCODER_KEYS}
    p = lambda name: str(run / name)  # noqa: E731
    steps: list[Step] = []

    def add(name, stage, values, deps=(), outputs=None, section=None):
        section = (cfg.get(stage) or {}) if section is None else section
        config = from_dict(STAGES[stage].config, {**section, **values}, where=f"run config, step '{name}'")
        if check:
            try:
                STAGES[stage].check(config)
            except ConfigError as e:
                raise ConfigError(f"run config, step '{name}': {e}") from None
        steps.append(Step(name, stage, config, list(deps), outputs or [values["out"]]))

    pool, task = cfg["pool"], carve_task(cfg)
    if task:  # the target task carved out of the pool: its train/test shards and the pool without them
        add("task", "carve", {"pool": pool, "train_per_class": t["per_class"], "seed": t["seed"], "out": p("task")})
        t = {**t, "train": [p(f"task/{CARVE_TRAIN}")], "test": [p(f"task/{CARVE_TEST}")]}
        pool = [p(f"task/{CARVE_POOL}")]
    add("labelled", "labelled", {"source": t["train"], "per_class": t["per_class"], "seed": t["seed"],
                                 "out": p("labelled")}, task)
    add("target", "embed", {**enc, "source": [p(LABELLED_SHARD)], "split": "train", "out": p("target")},
        ["labelled"])
    add("eval", "embed", {**enc, "source": t["test"], "split": "test", "out": p("eval")}, task)
    index = cfg.get("index_spec") or index_spec(p("index"))
    if not cfg.get("index_spec"):
        add("index", "index", {**enc, "source": pool, "out": p("index")}, task)
    index_deps = [] if cfg.get("index_spec") else ["index"]
    add("candidates", "retrieve", {"embeddings": p("target"), "index": index, "out": p("candidates")},
        ["target", *index_deps])
    retrieved = TRANSFER_SETS["retrieved"]
    curate = {"candidates": p("candidates"), "eval_embeddings": p("eval"), "require_leakage_guard": True,
              "out": p(retrieved.manifest)}
    teacher_aware = teacher_aware_curation(cfg)
    if teacher_aware:  # the adapted teacher scores the candidates before curation
        add_teacher(cfg, add, enc, t, p)
        add("scores", "score", {"candidates": p("candidates"), "teacher": p("teacher.pt"), "out": p("scores")},
            ["candidates", "teacher"])
        curate["teacher_scores"] = p("scores")
    add("manifest", "curate", curate, ["candidates", "eval", *(["scores"] if teacher_aware else [])])
    collect = cfg.get("collect", "materialize")
    if collect not in COLLECT:
        raise ConfigError(f"run config: collect must be materialize or download, got {collect!r}")
    add(retrieved.shards, collect, {"manifest": p(retrieved.manifest), "out": p(retrieved.shards)}, ["manifest"])

    if not teacher_aware:
        add_teacher(cfg, add, enc, t, p)

    arms = arm_runs(cfg)
    used = {a.transfer_set for a in arms}
    if "random" in used:
        pool, tset = spec_location(index), TRANSFER_SETS["random"]
        add(tset.manifest, "sample", {"source": [pool], "like": p(retrieved.manifest), "out": p(tset.manifest)},
            ["manifest", *index_deps])
        add(tset.shards, collect, {"manifest": p(tset.manifest), "out": p(tset.shards)}, [tset.manifest])
    if "target" in used:
        if task:
            raise ConfigError("experiment arm target/...: a carved task (carve:) has no unlabelled target train "
                              "images of its own (they stay in the pool); drop the target arms")
        tset = TRANSFER_SETS["target"]
        add(tset.manifest, "sample", {"source": t["train"], "like": p(retrieved.manifest), "exclude": [p("target")],
                                      "out": p(tset.manifest)}, ["manifest", "target"])
        add(tset.shards, "materialize", {"manifest": p(tset.manifest), "out": p(tset.shards)}, [tset.manifest])

    labelled = {"target": [p(LABELLED_SHARD)], "per_class": 0}
    for arm in arms:
        step = arm.step
        if arm.transfer_set == LABELLED:
            d = cfg.get("distill") or {}
            add(step("init"), "init", {"student": d.get("student", "resnet18"), "seed": arm.seed,
                                       "small_input": d.get("small_input", False),
                                       "image_size": d.get("image_size", 0), "embeddings": p("target"),
                                       "out": p(f"{step('init')}/student.pt")}, ["target"])
            ft = {**(cfg.get("finetune") or {}), **cfg["experiment"].get("labelled", {})}
            add(step("finetune"), "finetune", {**labelled, "student": p(f"{step('init')}/student.pt"),
                                               "seed": arm.seed, "out": p(step("finetune"))},
                [step("init"), "labelled"], section=ft)
        else:
            # a mode whose teacher logits train the classifier distils the labelled images as transfer images;
            # feature KD learns no classifier from the teacher, so the labelled images join every step with CE
            learns = kd_modes()[arm.method].learns_classifier
            shards = TRANSFER_SETS[arm.transfer_set].shards
            add(step("distill"), "distill", {"transfer": [p(shards)], "teacher": p("teacher.pt"),
                                             "mode": arm.method, "seed": arm.seed, "target": [p(LABELLED_SHARD)],
                                             "target_mix": "transfer" if learns else "step",
                                             "target_per_class": 0, "out": p(step("distill"))},
                [shards, "teacher", "labelled"])
            add(step("finetune"), "finetune", {**labelled, "student": p(f"{step('distill')}/student.pt"),
                                               "seed": arm.seed, "out": p(step("finetune"))},
                [step("distill"), "labelled"])
        add(step("evaluate"), "evaluate", {"source": t["test"], "checkpoint": p(f"{step('finetune')}/student.pt"),
                                           "out": p(f"arms/{arm.name}/eval.json")}, [step("finetune")])
        if arm == main_arm(arms):  # the deliverable: exported, checked and timed beside the teacher
            add(step("export"), "export", {"source": t["test"], "checkpoint": p(f"{step('finetune')}/student.pt"),
                                           "teacher": p("teacher.pt"), "out": p(step("export"))},
                [step("finetune"), "teacher"])
    return steps


def add_teacher(cfg: dict, add, enc: dict, t: dict, p) -> None:
    """The "teacher" step: `rakt adapt` on the labelled images (linear/zeroshot: on their embeddings). A mode that
    runs the encoder (finetune, reprogram) sees `teacher.image_size` raised to `adapt.image_size`, never lowered
    (`--set teacher.image_size=224` on a GPU adapts at 224 too), while embed and index keep `teacher.image_size`."""
    section = cfg.get("adapt") or {}
    mode = adapt_modes().get(section.get("mode", "linear"))  # an unknown name fails in the step, with the choices
    adapt = {**enc, "seed": t["seed"], "out": p("teacher.pt")}
    if mode and mode.inputs == "embeddings":
        adapt.update(embeddings=p("target"), eval=[p("eval")])  # the embeddings of `target`, not recomputed
    else:
        size, raised = enc.get("image_size", 0), section.get("image_size") or 0
        if not isinstance(raised, int) or (size and raised > size):  # size 0 = the model's own: left as it is
            size = raised  # (a value that is no whole number meets the stage config's own check, naming the step)
        adapt.update(train=[p(LABELLED_SHARD)], per_class=0, eval=t["test"], image_size=size)
    add("teacher", "adapt", adapt, ["target", "eval", "labelled"], [p("teacher.pt"), p("teacher.pt.json")])


def teacher_aware_curation(cfg: dict) -> bool:
    """Whether curate uses the adapted teacher's scores (curate.teacher_agree or curate.teacher_min_prob set)."""
    section = cfg.get("curate") or {}
    if section.get("teacher_scores"):
        raise ConfigError("run config: curate.teacher_scores is set by the run (its `scores` step); set "
                          "curate.teacher_agree and/or curate.teacher_min_prob instead")
    return bool(section.get("teacher_agree")) or float(section.get("teacher_min_prob") or 0) > 0


def carve_task(cfg: dict) -> list[str]:
    """["task"] when the run config carves its target task out of the pool (a non-empty `carve:` section; the
    carve step then reads `pool`, `target.per_class` and `target.seed`), else []."""
    section = cfg.get("carve") or {}
    if not section:
        return []
    if not isinstance(section, dict):
        raise ConfigError(f"run config: carve must be a mapping of `rakt carve` settings, got {section!r}")
    fixed = sorted(set(section) & {"pool", "train_per_class", "seed", "out"})
    if fixed:
        raise ConfigError(f"run config: carve.{fixed[0]} is set by the run (pool, target.per_class, target.seed, "
                          "the run directory); set those instead")
    return ["task"]


def main_arm(arms: list[Arm]) -> Arm | None:
    """The run's student: the first transfer arm of the first seed (the labelled-only arm when it is alone)."""
    return next((a for a in arms if a.transfer_set != LABELLED), arms[0] if arms else None)
