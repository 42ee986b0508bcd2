"""The run report's figures: PNG plots (matplotlib, Agg backend, each written atomically) and the report
sections made only of plots (per-class accuracy, training curves)."""
from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from rakt.pipeline.formats import IMAGE_EXTS
from rakt.pipeline.images import DECODE_ERRORS, decode_image
from rakt.pipeline.io import atomic_path

log = logging.getLogger("rakt.report")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return str(path)


def accuracy_bars(rows: list[dict], teacher: float | None, path: Path) -> str:
    """Mean accuracy (%) per row with std error bars, each seed as a dot, the teacher as a dashed line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    ax.bar(x, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], capsize=4, color="#4c72b0")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["values"]), [100 * v for v in r["values"]], color="black", s=10, zorder=3)
    if teacher is not None:
        ax.axhline(100 * teacher, color="#c44e52", linestyle="--", label=f"adapted teacher {100 * teacher:.1f}%")
        ax.legend(loc="lower right")
    ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Student accuracy per transfer set and method (mean ± std over seeds)")
    return _save(fig, path)


def grouped_bars(categories: list[str], series: dict[str, list], path: Path, ylabel: str, title: str,
                 percent: bool = False) -> str:
    """One group of bars per category, one bar per series (None values are left out)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(categories) * max(1, len(series)) ** 0.5 + 3), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for j, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else (100 * v if percent else v) for v in values]
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width, label=name)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def confusion(classes: list[str], matrix: list[list[int]], title: str, path: Path) -> str:
    """The confusion matrix (rows = true class) coloured by row share, with the counts written in."""
    plt = _plt()
    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(m)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * n + 2), max(3.5, 0.55 * n + 1.5)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=max(6, min(11, 100 // n)),
                    color="white" if share[i, j] > 0.5 else "black")
    names = classes if len(classes) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def curves(panels: dict[str, dict[str, tuple]], path: Path) -> str:
    """Loss vs step, one panel per stage (distill, finetune), one line per arm."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (stage, lines) in zip(axes[0], panels.items()):
        for arm, (steps, loss) in lines.items():
            ax.plot(steps, loss, label=arm, linewidth=1, marker="." if len(steps) <= 50 else None)
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no metrics", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def histogram(values: np.ndarray, path: Path, title: str, xlabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=40, color="#55a868")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    return _save(fig, path)


def stacked_shares(shares: dict[str, dict[str, float]], path: Path) -> str:
    """One horizontal bar per row (a transfer set or the pool), split by pool source."""
    plt = _plt()
    sources = sorted({s for row in shares.values() for s in row})
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(shares) + 1.5))
    left = np.zeros(len(shares))
    for s in sources:
        vals = np.array([100 * row.get(s, 0.0) for row in shares.values()])
        ax.barh(list(shares), vals, left=left, label=s)
        left += vals
    ax.set_xlabel("share of images (%)")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(4, len(sources)))
    ax.set_title("Where the images come from (pool source)")
    return _save(fig, path)


def pick_samples(shards_dir: Path, per_class: int = 8) -> dict:
    """{query_label: [PIL images]}: the highest-scoring `per_class` images of each class in shard-*.tar."""
    from PIL import Image

    entries = []  # (label, -score, shard, key)
    members: dict[tuple, tarfile.TarInfo] = {}
    for shard in sorted(shards_dir.glob("shard-*.tar")):
        try:
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    if ext == "json":
                        meta = json.loads(tar.extractfile(m).read())
                        label = meta.get("query_label")
                        entries.append((-1 if label is None else int(label), -(meta.get("score") or 0.0), shard, key))
                    elif ext in IMAGE_EXTS:
                        members[(shard, key)] = m
        except (tarfile.TarError, OSError, ValueError) as e:
            log.warning("%s: unreadable shard (%s); left out of the sample grid", shard, e)
    chosen: dict[int, list] = {}
    for label, _, shard, key in sorted(entries, key=lambda e: e[:2]):
        if len(chosen.setdefault(label, [])) < per_class and (shard, key) in members:
            chosen[label].append((shard, key))
    by_shard: dict[Path, list] = {}
    for picks in chosen.values():
        for shard, key in picks:
            by_shard.setdefault(shard, []).append(key)
    images = {}
    for shard, keys in by_shard.items():
        try:
            with tarfile.open(shard) as tar:
                for key in keys:
                    data = tar.extractfile(members[(shard, key)]).read()
                    images[(shard, key)] = decode_image(data)
        except (tarfile.TarError, *DECODE_ERRORS) as e:
            log.warning("%s: unreadable images (%s); left out of the sample grid", shard, e)
    out = {label: [images[p] for p in picks if p in images] for label, picks in chosen.items()}
    return {label: imgs for label, imgs in out.items() if imgs}


def sample_grid(samples: dict, names: dict, path: Path, per_class: int = 8) -> str:
    """Rows = classes (labelled by name), columns = the sample images."""
    plt = _plt()
    labels = sorted(samples)
    fig, axes = plt.subplots(len(labels), per_class, figsize=(1.1 * per_class + 1.2, 1.1 * len(labels) + 0.6),
                             squeeze=False, layout="constrained")
    for row, label in zip(axes, labels):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
            if j < len(samples[label]):
                ax.imshow(samples[label][j])
        row[0].set_ylabel(names.get(label, str(label)), rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("Retrieved transfer set: highest-scoring images per query class")
    return _save(fig, path)


def read_metrics(path: Path) -> pd.DataFrame | None:
    """Metrics lines; after a resume a step may repeat: the last occurrence wins."""
    if not path.exists():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    df = pd.DataFrame(rows)
    if df.empty or "step" not in df:
        return None
    return df.drop_duplicates("step", keep="last").sort_values("step")


def per_class_section(doc, ctx: dict) -> None:
    """Per-class accuracy bars (all arms if few, else one per transfer set and method) + the best arm's confusion."""
    doc.add("h2", "Per-class accuracy")
    arms = [a for a in ctx["arms"] if a["eval"] and a["eval"].get("per_class_accuracy") is not None]
    if not arms:
        doc.add("missing", "no arms/*/eval.json with per-class accuracy")
        return
    classes = ctx["classes"] or arms[0]["eval"].get("classes") or []
    best = max(arms, key=lambda a: a.get("accuracy") or 0)
    if len(arms) > 6:  # one per (transfer set, method): its seed-0 arm, else its best
        groups: dict[tuple, dict] = {}
        for a in sorted(arms, key=lambda a: (a.get("seed") != 0, -(a.get("accuracy") or 0))):
            groups.setdefault((a.get("transfer_set"), a.get("method")), a)
        arms = list(groups.values())
    series = {}
    for a in sorted(arms, key=lambda a: a["arm"]):
        pc = a["eval"]["per_class_accuracy"]
        series[a["arm"]] = ([pc.get(c, pc.get(str(i))) for i, c in enumerate(classes)] if isinstance(pc, dict)
                            else list(pc))
    names = classes if classes else [str(i) for i in range(len(next(iter(series.values()))))]
    doc.plot("per_class", "per-class accuracy", grouped_bars, names, series, ylabel="accuracy (%)",
             title="Per-class test accuracy", percent=True)
    if best["eval"].get("confusion"):
        doc.plot("confusion", f"confusion matrix of {best['arm']}", confusion, names,
                 best["eval"]["confusion"], f"Confusion matrix of the best arm {best['arm']} "
                 f"({100 * (best.get('accuracy') or 0):.1f}%)")


def curves_section(doc, ctx: dict) -> None:
    """Distill and finetune loss vs step of the seed-0 arms."""
    doc.add("h2", "Training curves")
    arms = [a for a in ctx["arms"] if a.get("seed") in (0, None)]
    panels: dict[str, dict] = {"distill": {}, "finetune": {}}
    for a in arms:
        for stage in panels:
            df = read_metrics(doc.run / "arms" / a["arm"] / stage / "metrics.jsonl")
            col = next((c for c in ("loss", "kd", "ce") if df is not None and c in df), None)
            if col:
                panels[stage][a["arm"]] = (df["step"].to_numpy(), df[col].to_numpy())
    if not any(panels.values()):
        doc.add("missing", "no arms/*/distill/metrics.jsonl or finetune/metrics.jsonl")
        return
    doc.plot("curves", "training loss per step", curves, panels)
