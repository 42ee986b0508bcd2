"""The student as a deliverable beside its teacher, like for like: `rakt export`'s figures (arms/ARM/export/export.json)
as one table (parameters and multiply-adds at each one's own input size, size and batch-1 CPU latency in each runtime,
both measured with the same threads) and a plain sentence on whether the student is smaller and faster, and why not."""
from __future__ import annotations

from pathlib import Path

from rakt.pipeline.io import read_json

RUNTIME_NAMES = {"pytorch": "PyTorch", "torchscript": "TorchScript", "onnx": "ONNX (onnxruntime)"}
# open_clip's ViT-B-32 image tower (`open_clip.create_model("ViT-B-32").visual`), counted by the same counter as the
# export (distill.runtimes.model_cost) at 224 px; tests/test_export.py recounts it
CLIP_IMAGE_TOWER = {"name": "open_clip ViT-B/32 image tower", "input_size": 224, "parameters": 87_849_216,
                    "multiply_adds": 4_408_811_520}
SAME = 0.05  # a student latency over 0.95x the teacher's does not count as faster (timing noise)


def export_figures(run_dir: Path) -> dict | None:
    """The exported student (`rakt export`, arms/ARM/export/export.json): the student's and the teacher's figures,
    accuracy check."""
    found = sorted(Path(run_dir).glob("arms/*/export/export.json"))
    if not found:
        return None
    rep = read_json(found[0], "export report")
    check = rep.get("check") or {}
    return {"arm": found[0].parent.parent.name, "arch": rep.get("arch"), "device": rep.get("device"),
            "latency": rep.get("latency"),
            "student": _model(rep.get("student"), rep.get("arch"), rep.get("parameters")),
            "teacher": _model(rep.get("teacher"), "", None), "accuracy": check.get("accuracy") or {},
            "difference_points": check.get("difference_points") or {},
            "tolerance_points": check.get("tolerance_points"), "check_ok": check.get("ok")}


def _model(fig: dict | None, name: str | None, parameters: int | None) -> dict | None:
    """One model's figures; an export.json from before 2026-12-07 (the student's runtimes at the top, the teacher
    timed in PyTorch only, no multiply-adds) is read into the same shape, its missing figures None."""
    if not fig or "runtimes" in fig:
        return fig
    if "latency_ms" in fig:  # the old teacher entry
        return {"name": "", "input_size": fig.get("input_size"), "parameters": fig.get("parameters"),
                "multiply_adds": None, "runtimes": {"pytorch": {k: fig.get(k) for k in ("size_mb", "latency_ms")}}}
    return {"name": name or "", "input_size": None, "parameters": parameters, "multiply_adds": None, "runtimes": fig}


def _ratio(student: float | None, teacher: float | None) -> str:
    return f"{student / teacher:.2f}" if student is not None and teacher else "—"


def _millions(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}M"


def _giga(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.3f} G"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def comparison_rows(export: dict | None, teacher_accuracy: float | None = None) -> list[tuple[str, str, str, str]]:
    """(what, teacher, student, student / teacher) rows; [] without an export. Sizes: the fp32 weights for PyTorch,
    the file for TorchScript and ONNX."""
    if not export or not export.get("student"):
        return []
    s, t = export["student"], export.get("teacher") or {}
    rows = [("model", (f"{t.get('name') or '?'}" + (f" ({t['mode']})" if t.get("mode") else "")) if t else "—",
             s.get("name") or "?", ""),
            ("input", f"{t['input_size']} px" if t.get("input_size") else "—",
             f"{s['input_size']} px" if s.get("input_size") else "—", ""),
            ("parameters", _millions(t.get("parameters")), _millions(s.get("parameters")),
             _ratio(s.get("parameters"), t.get("parameters"))),
            ("multiply-adds per image", _giga(t.get("multiply_adds")), _giga(s.get("multiply_adds")),
             _ratio(s.get("multiply_adds"), t.get("multiply_adds"))),
            ("test accuracy (PyTorch)", _pct(teacher_accuracy), _pct((export.get("accuracy") or {}).get("pytorch")),
             "")]
    t_run, s_run = t.get("runtimes") or {}, s.get("runtimes") or {}
    for runtime in [r for r in RUNTIME_NAMES if r in s_run or r in t_run]:
        a, b = t_run.get(runtime) or {}, s_run.get(runtime) or {}
        size = "fp32 weights MB" if runtime == "pytorch" else "file MB"
        rows.append((f"{RUNTIME_NAMES[runtime]}: {size}", _num(a.get("size_mb"), 1), _num(b.get("size_mb"), 1),
                     _ratio(b.get("size_mb"), a.get("size_mb"))))
        rows.append((f"{RUNTIME_NAMES[runtime]}: CPU ms per image (batch 1)", _num(a.get("latency_ms"), 2),
                     _num(b.get("latency_ms"), 2), _ratio(b.get("latency_ms"), a.get("latency_ms"))))
    return rows


def _num(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def verdict(export: dict | None) -> str:
    """Whether the student is smaller and faster than its teacher, said plainly, and why not when it is not."""
    s, t = (export or {}).get("student") or {}, (export or {}).get("teacher") or {}
    if not s or not t or not s.get("parameters") or not t.get("parameters"):
        return ""
    out = [f"The student has {s['parameters'] / t['parameters']:.2f}x the teacher's parameters "
           f"({_millions(s['parameters'])} against {_millions(t['parameters'])})"]
    if s.get("multiply_adds") and t.get("multiply_adds"):
        out.append(f"{s['multiply_adds'] / t['multiply_adds']:.2f}x its multiply-adds per image "
                   f"({_giga(s['multiply_adds'])} at {s['input_size']} px against {_giga(t['multiply_adds'])} at "
                   f"{t['input_size']} px)")
    s_run, t_run = s.get("runtimes") or {}, t.get("runtimes") or {}
    ratios = {name: s_run[r]["latency_ms"] / t_run[r]["latency_ms"] for r, name in RUNTIME_NAMES.items()
              if (s_run.get(r) or {}).get("latency_ms") and (t_run.get(r) or {}).get("latency_ms")}
    text = ", ".join(out) + (("; its batch-1 CPU latency is " + ", ".join(f"{r:.2f}x the teacher's in {name}"
                                                                          for name, r in ratios.items()))
                             if ratios else "") + "."
    not_faster = [name for name, r in ratios.items() if r > 1 - SAME]
    not_so = (["not smaller than this teacher"] if s["parameters"] >= t["parameters"] else []) + \
        ([f"not faster in every runtime (not in {', '.join(not_faster)})"] if not_faster else [])
    if not not_so:
        return text + " It is smaller than its teacher and faster in every runtime."
    ref = CLIP_IMAGE_TOWER
    macs = (f"{ref['multiply_adds'] / s['multiply_adds']:.0f}x its multiply-adds" if s.get("multiply_adds")
            else "many times its multiply-adds")
    return (f"{text} So the student is {' and '.join(not_so)}, because the teacher is "
            f"small: {t.get('name') or 'it'} with {_millions(t['parameters'])} parameters, a stand-in that runs on a "
            f"CPU. rakt is made for foundation-model teachers: the {ref['name']} alone has "
            f"{_millions(ref['parameters'])} parameters and needs {_giga(ref['multiply_adds'])} multiply-adds per "
            f"{ref['input_size']}-px image (counted the same way), {ref['parameters'] / s['parameters']:.0f}x this "
            f"student's parameters and {macs}.")
