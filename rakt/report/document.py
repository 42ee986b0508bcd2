"""`rakt run`'s report: RUN_DIR/report.md, report.html and report/*.png, from whatever the run directory holds."""
from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from rakt.pipeline.io import atomic_path
import rakt.report.plots as plots
from rakt.report.deliverable import comparison_rows, verdict
from rakt.report.gather import KEY_SETTINGS, UNKNOWN, flatten, gather, pool_shares, summary_rows
from rakt.rundir import NO_KD
from rakt.stages import kd_modes

log = logging.getLogger("rakt.report")

def _mean_std(row: dict) -> str:
    """'37.2 ± 0.5%' over several seeds; '39.4%' for one (a spread of one seed is no spread)."""
    if (row.get("seeds") or 0) > 1:
        return f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}%"
    return f"{100 * row['mean']:.1f}%"


def _range(row: dict) -> str:
    """'36.8% – 37.8%' over several seeds; '—' for one."""
    if (row.get("seeds") or 0) > 1:
        return f"{_pct(row.get('min'))} – {_pct(row.get('max'))}"
    return "—"


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return f"{x:,}" if isinstance(x, (int, np.integer)) else ("—" if x is None else str(x))


def _method_text(method: str) -> str:
    modes = kd_modes()
    return "no distillation" if method == NO_KD else modes[method].report if method in modes else method


def _what_happened(ctx: dict, rows: list[dict], shares: dict) -> str:
    config, res, out = ctx["config"] or {}, ctx["results"], []
    teacher, target = config.get("teacher") or {}, config.get("target") or {}
    student = (config.get("distill") or {}).get("student")
    task = target.get("name")
    if task:
        carve = config.get("carve") or {}
        out.append(f"Target task: {task}" + (f", carved out of the pool (its '{carve.get('source', '?')}' images; "
                                             "the rest of them stay in the pool, unlabelled)" if carve else "") + ".")
    if teacher or target or student:  # run.yaml's own keys: teacher.*, target.per_class, distill.student
        n_cls = f" ({len(ctx['classes'])} classes)" if ctx["classes"] else ""
        size, adapted = teacher.get("image_size", "?"), ((res or {}).get("teacher") or {}).get("image_size")  # ckpt
        size = f"{size} px (adapted at {adapted} px)" if adapted and adapted != size else f"{size} px"
        out.append(f"Teacher {teacher.get('model', '?')} at {size}, "
                   f"{target.get('per_class', '?')} labelled images per class{n_cls}, "
                   f"student {student or '?'}.")
    if "retrieved" in ctx["manifests"]:
        m = ctx["manifests"]["retrieved"]
        c = m["meta"].get("counts", {})
        pool = ctx["index"].get("count")
        text = (f"The retrieved transfer set holds {len(m['df']):,} images"
                f"{f' chosen from a pool of {pool:,}' if pool else ''} ({_num(c.get('dedup_merged'))} duplicate "
                f"hits merged, {_num(c.get('near_dup_removed'))} near-duplicates and "
                f"{_num(c.get('leakage_removed'))} images too close to the test set removed)")
        if shares.get("retrieved"):
            top = sorted(shares["retrieved"].items(), key=lambda kv: -kv[1])[:3]
            text += "; they come " + ", ".join(f"{_pct(v)} from {k}" for k, v in top)
        out.append(text + ".")
    best = max((r for r in rows if r.get("transfer_set") != "labelled"), key=lambda r: r["mean"], default=None)
    base = next((r for r in rows if r.get("transfer_set") == "labelled"), None)
    if best:
        text = (f"The best student, trained on the {best['transfer_set']} transfer set with "
                f"{_method_text(best['method'])}, reached {_mean_std(best)} over "
                f"{best['seeds']} seed{'s' if best['seeds'] != 1 else ''}")
        if base:
            text += f" vs {100 * base['mean']:.1f}% for the labelled-only student"
        rand = max((r for r in rows if r.get("transfer_set") == "random"), key=lambda r: r["mean"], default=None)
        if rand and best is not rand:
            text += f" and {100 * rand['mean']:.1f}% with a random pool sample of the same size"
        out.append(text + ".")
    elif base:
        out.append(f"The labelled-only student reached {100 * base['mean']:.1f}%.")
    teacher = res.get("teacher") or {}
    if teacher.get("accuracy") is not None:
        out.append(f"The adapted teacher ({teacher.get('mode', '?')}) reaches {100 * teacher['accuracy']:.1f}%.")
    steps = ctx["steps"]
    if steps:
        done = sum(s.get("status") == "done" for s in steps)
        secs = sum(s.get("seconds") or 0 for s in steps)
        out.append(f"{done} of {len(steps)} recorded steps are done, {secs / 60:.1f} min of compute in all"
                   f"{' on ' + res['device'] if res.get('device') else ''}.")
        other = [f"{s.get('step')} ({s.get('status')})" for s in steps if s.get("status") != "done"]
        if other:
            out.append("Not done: " + ", ".join(other) + ".")
    if not res:
        out.append("There is no results.json yet: the run has not finished (or not reached) evaluation.")
    return " ".join(out)


class _Doc:
    """Report blocks, rendered as Markdown and as HTML."""

    def __init__(self, run: Path):
        self.run, self.blocks, self.plots = run, [], []

    def add(self, kind: str, *payload) -> None:
        self.blocks.append((kind, *payload))

    def plot(self, name: str, alt: str, fn, *args, **kwargs) -> None:
        """Make report/NAME.png with `fn(*args, path, **kwargs)`; a failure becomes a line in the report."""
        try:
            self.plots.append(fn(*args, self.run / "report" / f"{name}.png", **kwargs))
            self.add("img", f"report/{name}.png", alt)
        except Exception as e:  # noqa: BLE001 - one odd input must not cost the whole report
            log.warning("plot %s failed: %s", name, e, exc_info=True)
            self.add("missing", f"plot {name} failed: {e}")

    def markdown(self) -> str:
        def md(x) -> str:
            return str(x).replace("*", "\\*").replace("|", "\\|")

        out = []
        for kind, *a in self.blocks:
            if kind == "table":
                out += ["| " + " | ".join(map(md, a[0])) + " |", "|" + "---|" * len(a[0])]
                out += ["| " + " | ".join(map(md, row)) + " |" for row in a[1]]
                out.append("")
            else:
                text = [a[0], a[1]] if kind == "img" else [md(a[0])]
                out.append({"h1": "# {}", "h2": "## {}", "p": "{}", "missing": "_Missing: {}_",
                            "img": "![{1}]({0})"}[kind].format(*text) + "\n")
        return "\n".join(out)

    def html(self) -> str:
        e, out = html.escape, []
        for kind, *a in self.blocks:
            if kind == "table":
                head = "".join(f"<th>{e(str(c))}</th>" for c in a[0])
                body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in a[1])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "img":
                out.append(f'<p><img src="{e(a[0])}" alt="{e(a[1])}"></p>')
            elif kind == "missing":
                out.append(f'<p class="missing">Missing: {e(a[0])}</p>')
            else:
                out.append(f"<{kind}>{e(a[0])}</{kind}>")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(self.run.name)} report</title>"
                f"<style>{CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.45}"
       "table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #ccc;padding:3px 9px;text-align:right}"
       "th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
       ".missing{color:#a33;font-style:italic}h2{border-bottom:1px solid #ddd;margin-top:1.6em}")


def _label_names(classes: list[str]) -> dict:
    return {-1: "unlabelled", **{i: c for i, c in enumerate(classes)}}


def _results(doc: _Doc, ctx: dict, rows: list[dict]) -> None:
    doc.add("h2", "Results")
    teacher = ctx["results"].get("teacher") or {}
    if not rows and teacher.get("accuracy") is None:
        doc.add("missing", "no results.json and no arms/*/eval.json: no student was evaluated yet")
        return
    table = [(r["label"], _mean_std(r), r.get("seeds"),
              _range(r), f"{r.get('seconds_mean') or 0:.0f}") for r in rows]
    if teacher.get("accuracy") is not None:
        table.append((f"adapted teacher ({teacher.get('mode', '?')})", _pct(teacher["accuracy"]), "—", "—",
                      f"{teacher.get('seconds') or 0:.0f}"))
    doc.add("table", ["transfer set / method", "accuracy (mean ± std)", "seeds", "min – max",
                      "compute s per seed"], table)
    arms = sorted(ctx["arms"], key=lambda a: a["arm"])
    doc.add("table", ["arm", "accuracy", "transfer images", "distill s", "finetune s", "evaluate s"],
            [(a["arm"], _pct(a.get("accuracy")), _num(a.get("transfer_samples")),
              *(f"{(a.get('seconds') or {}).get(k, 0):.0f}" for k in ("distill", "finetune", "evaluate")))
             for a in arms])
    if rows:
        doc.plot("accuracy", "accuracy per transfer set and method", plots.accuracy_bars, rows,
                 teacher.get("accuracy"))


def _deliverable(doc: _Doc, ctx: dict) -> None:
    """The exported student (`rakt export`) beside the teacher, like for like; the accuracy check."""
    ex = ctx.get("export")
    if not ex:
        return
    doc.add("h2", "The student as a deliverable")
    diff = ex.get("difference_points") or {}
    doc.add("table", ["", "teacher", "student", "student / teacher"],
            comparison_rows(ex, (ctx["results"].get("teacher") or {}).get("accuracy")))
    doc.add("p", verdict(ex) or "The teacher was not measured beside the student (rakt export without --teacher).")
    verdict_word = "passed" if ex.get("check_ok") else "FAILED"
    doc.add("p", f"{ex.get('arch')} of arm {ex.get('arm')}, exported by `rakt export`; both models timed in the same "
                 f"runtimes, {ex.get('latency')}, on {ex.get('device')}; parameters and multiply-adds (torch's "
                 f"FlopCounterMode) of one image at each model's own input size. Accuracy check of the exported "
                 f"student ({verdict_word}, tolerance {ex.get('tolerance_points')} points): "
                 + (", ".join(f"{k} differs from PyTorch by {v:.2f} points" for k, v in diff.items()) or "no export"))


def _teacher_predicted(doc: _Doc, mans: dict, class_order: list[str]) -> None:
    """Teacher-aware curation: the selected images per class the adapted teacher predicts (in class order)."""
    predicted = {ts: m["meta"]["counts"]["teacher_predicted"] for ts, m in mans.items()
                 if m["meta"].get("counts", {}).get("teacher_predicted")}
    if not predicted:
        return
    found = list(next(iter(predicted.values())))
    names = [n for n in class_order if n in found] + [n for n in found if n not in class_order]
    doc.add("p", "Teacher-aware curation: the adapted teacher scored every candidate before curation "
                 "(`scores/`); each class was filled first with the candidates the teacher assigns to it, and "
                 "with the others only where those ran out (counted above). The selected images by the class the "
                 "teacher predicts:")
    doc.add("table", ["teacher-predicted class", *predicted],
            [(name, *(_num(c.get(name, 0)) for c in predicted.values())) for name in names])
    doc.plot("teacher_predicted", "selected images per teacher-predicted class", plots.grouped_bars, names,
             {ts: [c.get(name, 0) for name in names] for ts, c in predicted.items()}, ylabel="images",
             title="Transfer-set images per class the adapted teacher predicts")


def _transfer_sets(doc: _Doc, ctx: dict, shares: dict, bad_shards: int) -> None:
    doc.add("h2", "Transfer sets")
    mans = ctx["manifests"]
    if not mans:
        doc.add("missing", "no manifest/, random-manifest/ or target-manifest/ (no transfer set was curated yet)")
        return
    keys = [("available", "images to draw from (random sample)"), ("excluded", "excluded (labelled images)"),
            ("selected", "selected"), ("dedup_merged", "duplicate hits merged"),
            ("near_dup_removed", "near-duplicates removed"), ("leakage_removed", "leakage removed"),
            ("teacher_unscored", "not scored by the teacher"), ("teacher_ood_removed", "teacher: unlike every class"),
            ("teacher_disagree_deferred", "candidates deferred: the teacher predicts another class"),
            ("teacher_disagree_selected", "of them selected (to fill their class)"), ("empty_slots", "empty slots")]
    rows = [("manifest rows", *(f"{len(m['df']):,}" for m in mans.values()))]
    rows += [(label, *(_num(m["meta"].get("counts", {}).get(k)) for m in mans.values())) for k, label in keys
             if any(k in m["meta"].get("counts", {}) for m in mans.values())]
    rows.append(("materialized images", *(_num((m["shards"] or {}).get("samples")) for m in mans.values())))
    rows.append(("leakage guard", *(_guard(m["meta"]) for m in mans.values())))
    doc.add("table", ["", *mans], rows)
    removed = [(ts, reason, f"{n:,}") for ts, m in mans.items() if m["removed"] is not None and len(m["removed"])
               for reason, n in m["removed"]["reason"].value_counts().sort_index().items()]
    doc.add("table", ["transfer set", "removed because", "images"], removed) if removed else doc.add(
        "p", "removed.parquet lists no removed images.")
    names = _label_names(ctx["classes"])
    per_class = {}
    for ts, m in mans.items():
        labels = m["df"]["query_label"].astype("Int64").fillna(-1) if "query_label" in m["df"] else None
        if labels is not None and (labels >= 0).any():
            per_class[ts] = labels.astype(int).value_counts().to_dict()
    if per_class:
        labels = sorted({k for c in per_class.values() for k in c})
        doc.add("table", ["query class", *per_class],
                [(names.get(lab, str(lab)), *(_num(c.get(lab, 0)) for c in per_class.values())) for lab in labels])
        doc.plot("images_per_class", "images per query class", plots.grouped_bars,
                 [names.get(lab, str(lab)) for lab in labels],
                 {ts: [c.get(lab, 0) for lab in labels] for ts, c in per_class.items()}, ylabel="images",
                 title="Transfer-set images per query class")
    _teacher_predicted(doc, mans, [names[k] for k in sorted(names)])
    scores = mans.get("retrieved", {}).get("df", pd.DataFrame()).get("score")
    if scores is not None and scores.notna().any():
        s = scores.dropna().to_numpy()
        doc.add("p", f"Similarity of the retrieved images to their best query: median {np.median(s):.3f}, "
                     f"range {s.min():.3f} – {s.max():.3f}.")
        doc.plot("scores", "similarity histogram", plots.histogram, s, title="Retrieved transfer set: similarity "
                 "to the best query", xlabel="cosine similarity (score)")
    if shares:
        sources = sorted({s for row in shares.values() for s in row}, key=lambda s: (s == UNKNOWN, s))
        doc.add("p", "Share of images per pool source (from each pool image's own KEY.json, evaluation only)"
                + (f"; {bad_shards} pool shard(s) could not be read" if bad_shards else "") + ":")
        doc.add("table", ["images of", *sources],
                [(name, *(_pct(row.get(s, 0.0)) for s in sources)) for name, row in shares.items()])
        doc.plot("sources", "share per pool source", plots.stacked_shares, shares)
    if "retrieved" in mans and (doc.run / "shards").exists():
        samples = plots.pick_samples(doc.run / "shards")
        if samples:
            doc.plot("samples", "sample images per class", plots.sample_grid, samples, names)
    else:
        doc.add("missing", "no shards/ (the retrieved transfer set was not materialized): no sample images")


def _guard(meta: dict) -> str:
    g = meta.get("leakage_guard")
    return "—" if g is None else (f"on (cosine > {g.get('threshold')})" if g.get("enabled") else "OFF")


def _settings(doc: _Doc, ctx: dict) -> None:
    doc.add("h2", "Settings")
    if ctx["config"] is None:
        doc.add("missing", "no run.yaml")
        return
    flat = flatten(ctx["config"])
    keep = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] in KEY_SETTINGS} or dict(list(flat.items())[:15])
    doc.add("table", ["setting", "value"], [(k, str(v)[:100] if v != "" else '""') for k, v in keep.items()])


def _steps(doc: _Doc, ctx: dict) -> None:
    doc.add("h2", "Steps")
    if not ctx["steps"]:
        doc.add("missing", "no steps/*.json records")
        return
    rows = [(s.get("step", "?"), s.get("stage", ""), f"{s.get('seconds') or 0:.1f}", s.get("status", "?"),
             s.get("finished") or "") for s in ctx["steps"]]
    rows.append(("total", "", f"{sum(s.get('seconds') or 0 for s in ctx['steps']):.1f}", "", ""))
    doc.add("table", ["step", "stage", "seconds", "status", "finished"], rows)


def write_report(run_dir: str | Path) -> dict:
    """RUN_DIR/report.md, report.html and report/*.png; sections whose inputs are missing say so."""
    run = Path(run_dir)
    ctx = gather(run)
    shares, bad = pool_shares(run, ctx) if ctx["manifests"] else ({}, 0)
    rows = summary_rows(ctx)
    doc = _Doc(run)
    doc.add("h1", f"rakt run report: {run.resolve().name}")
    doc.add("h2", "What happened")
    doc.add("p", _what_happened(ctx, rows, shares))
    _settings(doc, ctx)
    _results(doc, ctx, rows)
    _deliverable(doc, ctx)
    plots.per_class_section(doc, ctx)
    plots.curves_section(doc, ctx)
    _transfer_sets(doc, ctx, shares, bad)
    _steps(doc, ctx)
    out = {"markdown": str(run / "report.md"), "html": str(run / "report.html"), "plots": doc.plots}
    for key, text in (("markdown", doc.markdown()), ("html", doc.html())):
        with atomic_path(out[key]) as tmp:
            tmp.write_text(text)
    log.info("report: %s (%d plots)", out["html"], len(doc.plots))
    return out
