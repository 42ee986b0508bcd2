"""The steps of `rakt run`: run, skip, clear or resume each step of the plan, and report their state.

A step's identity is the hash of its config (run-directory paths written as ${run_dir}) and of the steps it reads.
`steps/NAME.json` is written when a step finishes, with a fresh `run_id` and the run_ids of the steps it read
(`inputs`); a rerun skips a step whose record has the same hash and whose inputs did not run again since, clears
and reruns one whose settings or inputs changed (an upstream step rerun, e.g. after its record was deleted, counts
as changed input), and lets a step that was killed (`steps/NAME.started.json` without a record) resume through its
stage's own resume. results.json, results.csv and the report are written at the end.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path


from rakt.pipeline.config import ConfigError, to_dict
from rakt.pipeline.config_yaml import dump_yaml
from rakt.pipeline.io import atomic_path, json_hash, output_lock, read_json, write_json
from rakt.report import write_report
from rakt.report.results import write_results
from rakt.run.config import read_run_config
from rakt.run.plan import Step, plan
from rakt.rundir import record_path
from rakt.stages import run_stage

log = logging.getLogger("rakt.run")

# Fault injection for the kill/resume tests: SIGKILL this process when a named step's work is done but before its
# record is written (comma-separated step names); fast steps can finish before an outside kill lands.
KILL_BEFORE_RECORD = "RAKT_FAULT_KILL_BEFORE_RECORD"


def step_hashes(steps: list[Step], run_dir: str) -> dict[str, str]:
    """Each step's hash: its config (run-dir paths relative) and its deps' hashes."""
    prefix = str(Path(run_dir))
    hashes: dict[str, str] = {}
    for s in steps:
        values = to_dict(s.config)
        values = json.loads(json.dumps(values, default=str).replace(prefix, "${run_dir}"))
        hashes[s.name] = json_hash({"stage": s.stage, "config": values, "deps": [hashes[d] for d in s.deps]})
    return hashes


def step_state(run_dir: str | Path, name: str, digest: str, deps: list[str] = ()) -> str:
    """done | started (running now, or killed: a rerun resumes it) | changed (finished with other settings, or
    before one of its `deps` ran again) | pending."""
    rec, started = record_path(run_dir, name), record_path(run_dir, name, ".started.json")
    if started.exists() and read_json(started, "step marker").get("config_hash") == digest:
        return "started"
    if rec.exists():
        record = read_json(rec, "step record")
        inputs = record.get("inputs")  # absent in records written before run_ids: trusted as they are
        if record.get("config_hash") != digest or (
                inputs is not None and any(inputs.get(d) != run_id(run_dir, d) for d in deps)):
            return "changed"
        return "done"
    return "started" if started.exists() else "pending"


def run_id(run_dir: str | Path, name: str) -> str | None:
    """The run_id of a step's record (None: no record, or one written before run_ids)."""
    rec = record_path(run_dir, name)
    return read_json(rec, "step record").get("run_id") if rec.exists() else None


def execute(cfg: dict, *, only: str = "") -> dict:
    """Run (or skip) every step of the run config; returns {"run_dir", "ran", "skipped", "results"}."""
    run_dir = Path(cfg["run_dir"])
    steps = plan(cfg)  # every step's config is built (and validated) before anything is written
    hashes = step_hashes(steps, str(run_dir))
    wanted = needed(steps, only) if only else {s.name for s in steps}
    with output_lock(run_dir, "run directory"):  # one `rakt run` per run directory; dies with its process
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "run.yaml") as tmp:
            Path(tmp).write_text(dump_yaml(cfg))
        return _execute(cfg, run_dir, steps, hashes, wanted)


def _execute(cfg: dict, run_dir: Path, steps: list[Step], hashes: dict[str, str], wanted: set[str]) -> dict:
    ran, skipped = [], []
    for i, step in enumerate(steps, 1):
        if step.name not in wanted:
            continue
        digest, state = hashes[step.name], step_state(run_dir, step.name, hashes[step.name], step.deps)
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
        from rakt.pipeline.device import device_name  # torch is imported once a step has run, not by `rakt --help`

        write_json(record_path(run_dir, step.name), {
            "step": step.name, "stage": step.stage, "config_hash": digest, "status": "done",
            "run_id": uuid.uuid4().hex, "inputs": {d: run_id(run_dir, d) for d in step.deps},
            "started": dt.datetime.fromtimestamp(began, dt.timezone.utc).isoformat(timespec="seconds"),
            "finished": _now(), "seconds": round(time.time() - began, 2), "device": device_name(),
            "config": to_dict(step.config), "result": result})
        started.unlink(missing_ok=True)
        ran.append(step.name)
    results = write_results(run_dir, cfg)
    if cfg["experiment"].get("report", True) and results.get("arms"):
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
    return run_stage(step.stage, step.config)


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


def status(run_dir: str | Path) -> list[dict]:
    """Every step of the run recorded in RUN_DIR/run.yaml with its state, seconds and a short result."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    steps = plan(cfg, check=False)  # what was planned; its checks ran when it ran
    hashes = step_hashes(steps, str(run_dir))
    rows = []
    for s in steps:
        state = step_state(run_dir, s.name, hashes[s.name], s.deps)
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

