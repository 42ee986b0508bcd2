"""The layering docs/architecture.md describes, checked on the source: one import name (`rakt`), the app above the
stage packages, distill above pipeline, indexes at the bottom; no module imports itself back through others, and
no source file is over 400 lines."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# lower layers first; a module may import its own layer and the ones below it, never one above
LAYERS = ("rakt.registry", "rakt.indexes", "rakt.pipeline", "rakt.distill", "rakt")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "rakt").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(name: str) -> int:
    return next(i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + "."))


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules a file imports (at module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def test_one_import_name():
    """Everything installed lives under `rakt` (pyproject's package list), and nothing imports the old names."""
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert tops == {"rakt"}, f"top-level packages besides rakt: {sorted(tops - {'rakt'})}"
    old = [f"{name}: {target}" for name, path in modules().items()
           for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
           for target in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
           if target.split(".")[0] in ("pipeline", "distill", "indexes")]
    assert not old, f"imports of the old top-level names: {old}"


def test_layers_depend_downward_only():
    known = modules()
    wrong = [f"{name} -> {target}" for name, path in known.items() for target in imports(path, known)
             if target != "rakt" and layer(target) > layer(name)]
    assert not wrong, "imports against the layering (docs/architecture.md): " + ", ".join(wrong)


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(path, known) - {name, "rakt"} for name, path in known.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"


def test_rakt_works_beside_other_pipeline_and_indexes_packages(tmp_path):
    """Another distribution's top-level `pipeline`, `indexes` and `distill` modules first on the path change
    nothing: rakt imports only its own names (a stage runs, the registry loads every stage)."""
    for name in ("pipeline", "indexes", "distill"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the other distribution\\'s {name}')\n")
    code = ("import rakt.stages as s\n"
            "for st in s.STAGES.values(): st.config; st.runner()\n"
            "s.kd_modes(); s.adapt_modes()\n"
            "from rakt.cli import main\n"
            "raise SystemExit(main(['index', 'build', '--help']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--on-disk" in proc.stdout


# a stage that runs another stage whole, as its first step (not code shared between them): allowed, with the reason
RUNS_A_STAGE = {
    ("rakt.pipeline.index_build", "rakt.pipeline.embed"): "`rakt index build` over images embeds them first",
    ("rakt.distill.teacher.score", "rakt.pipeline.materialize"): "`rakt score` collects the candidates' images first",
}


def test_stages_never_import_stages():
    """No stage module (a STAGES entry's module) reaches another one through its imports, but for a stage that
    runs another whole (RUNS_A_STAGE): what two stages share lives in a library module below them (e.g.
    rakt/pipeline/manifest_rows.py, rakt/distill/accuracy.py)."""
    from rakt.stages import STAGES

    known = modules()
    stage_modules = {stage.module for stage in STAGES.values()}
    assert stage_modules <= set(known), sorted(stage_modules - set(known))
    wrong = []
    for start in sorted(stage_modules):
        seen, todo = {start}, [start]
        while todo:
            for target in imports(known[todo.pop()], known) - seen:
                seen.add(target)
                if target in stage_modules and (start, target) not in RUNS_A_STAGE:
                    wrong.append(f"{start} -> {target}")
                elif target not in stage_modules:
                    todo.append(target)
    assert not wrong, "stages importing stages: " + ", ".join(wrong)
