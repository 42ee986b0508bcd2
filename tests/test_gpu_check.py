"""bench/gpu-check.sh --tiny: the GPU check's steps (ceiling benchmark, exact search against its roofline, a short
`rakt run`) with tiny models on the CPU, so the script a GPU session runs is known to work before it gets one."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_mode_runs_every_step(tmp_path, kit):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "RAKT_DATA": str(kit), "RAKT_PROGRESS_SECONDS": "3600"}
    done = subprocess.run(["bash", "bench/gpu-check.sh", "--tiny", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "gpu-check.md").read_text()
    assert report.startswith("# rakt GPU check (tiny)") and "device: cpu:" in report
    ceiling = json.loads((out / "ceiling.json").read_text())
    stages = [r["stage"] for r in ceiling["rows"]]
    assert stages == ["embed", "cache", "distill", "distill", "finetune", "evaluate"]
    assert all(r["rakt"] > 0 and r["ratio"] > 0 for r in ceiling["rows"])
    assert "ratio" in report and "lowest ratio" in report
    assert "torch exact" in report and "recall@10" in report  # the search table
    assert "steps done" in report and "arms/retrieved-task-s0/evaluate" in report  # the rakt run's status
    assert "total:" in report
