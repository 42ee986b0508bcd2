"""results.json / results.csv of a `rakt run`: the adapted teacher and every experiment arm, with compute."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from rakt.pipeline.io import atomic_path, read_json, write_json
from rakt.report.deliverable import comparison_rows, export_figures
from rakt.rundir import SET_ORDER, arm_runs, record_path

ORDER = {name: i for i, name in enumerate(SET_ORDER)}


def _record(run_dir: Path, name: str) -> dict:
    path = record_path(run_dir, name)
    return read_json(path, "step record") if path.exists() else {}


def collect(run_dir: str | Path, cfg: dict) -> dict:
    """The results of the finished arms (an arm counts once its evaluate step is recorded)."""
    run_dir = Path(run_dir)
    teacher_rec = _record(run_dir, "teacher")
    teacher_json = run_dir / "teacher.pt.json"
    teacher = read_json(teacher_json, "teacher report") if teacher_json.exists() else {}
    out = {"task": (cfg.get("target") or {}).get("name", ""), "device": teacher_rec.get("device", ""), "classes": [],
           "teacher": {"accuracy": teacher.get("accuracy"), "mode": teacher.get("mode"),
                       "image_size": (teacher.get("config") or {}).get("image_size"),
                       "seconds": teacher_rec.get("seconds")}, "arms": []}
    for arm in arm_runs(cfg):
        tset, method, seed = arm
        ev = _record(run_dir, arm.step("evaluate"))
        if not ev:
            continue
        distill = _record(run_dir, arm.step("distill"))
        report = read_json(run_dir / "arms" / arm.name / "eval.json", "evaluation report")
        out["classes"] = out["classes"] or report.get("classes") or []
        out["device"] = out["device"] or ev.get("device", "")
        out["arms"].append({
            "arm": arm.name, "transfer_set": tset, "method": method, "seed": seed, "accuracy": report["accuracy"],
            "transfer_samples": (distill.get("result") or {}).get("transfer_samples", 0),
            "seconds": {k: _record(run_dir, arm.step(k)).get("seconds", 0.0)
                        for k in ("distill", "finetune", "evaluate")}})
    out["summary"] = summarize(out["arms"])
    out["export"] = export_figures(run_dir)
    return out


def summarize(arms: list[dict]) -> list[dict]:
    """Mean, std (over seeds, ddof 1), min and max accuracy and mean compute per (transfer set, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for a in arms:
        groups.setdefault((a["transfer_set"], a["method"]), []).append(a)
    rows = []
    for (tset, method), items in sorted(groups.items(), key=lambda kv: (ORDER.get(kv[0][0], 9), kv[0][1])):
        acc = [a["accuracy"] for a in items]
        mean = sum(acc) / len(acc)
        std = math.sqrt(sum((x - mean) ** 2 for x in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
        secs = [sum(a["seconds"].values()) for a in items]
        rows.append({"transfer_set": tset, "method": method, "seeds": len(items), "mean": round(mean, 6),
                     "std": round(std, 6), "min": min(acc), "max": max(acc),
                     "seconds_mean": round(sum(secs) / len(secs), 1)})
    return rows


def write_results(run_dir: str | Path, cfg: dict) -> dict:
    """Write RUN_DIR/results.json and results.csv (one row per arm); return the results."""
    run_dir = Path(run_dir)
    results = collect(run_dir, cfg)
    write_json(run_dir / "results.json", results)
    rows = [{**{k: v for k, v in a.items() if k != "seconds"}, **{f"{k}_seconds": v for k, v in a["seconds"].items()}}
            for a in results["arms"]]
    with atomic_path(run_dir / "results.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return results


def results_text(results: dict) -> str:
    """The results table for the terminal."""
    t = results.get("teacher") or {}
    lines = [f"task: {results['task']}"] if results.get("task") else []
    lines += [f"{'transfer set':<13} {'method':<12} {'seeds':>5} {'accuracy':>16} {'seconds':>8}"]
    if t.get("accuracy") is not None:
        lines.append(f"{'(teacher)':<13} {t.get('mode') or '':<12} {'':>5} {100 * t['accuracy']:>15.1f}% "
                     f"{t.get('seconds') or 0:>8.0f}")
    for r in results.get("summary", []):
        acc = f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}%" if r["seeds"] > 1 else f"{100 * r['mean']:.1f}%"
        lines.append(f"{r['transfer_set']:<13} {r['method']:<12} {r['seeds']:>5} {acc:>16} {r['seconds_mean']:>8.0f}")
    deploy = comparison_rows(results.get("export"), t.get("accuracy"))
    if deploy:
        lines.append(f"\n{'deliverable':<45} {'teacher':>30} {'student':>12} {'student/teacher':>15}")
    for what, teacher, student, ratio in deploy:
        lines.append(f"{what:<45} {teacher:>30} {student:>12} {ratio:>15}")
    return "\n".join(lines)
