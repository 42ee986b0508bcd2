"""`pip install .` (the Docker image's install) ships every module and data file of rakt, not only its top level,
under one import name."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rakt",)


def test_wheel_holds_every_module_and_data_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], cwd=src, check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("rakt-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {str(p.relative_to(src)) for package in PACKAGES for p in (src / package).rglob("*")
              if p.is_file() and p.suffix in (".py", ".yaml", ".json")}
    assert {"rakt/run/plan.py", "rakt/distill/teacher/model.py", "rakt/pipeline/configs/default.yaml"} <= wanted
    assert wanted - shipped == set()
    tops = {name.split("/")[0] for name in shipped if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"rakt"}, f"the wheel installs more than one import name: {sorted(tops)}"
