#!/usr/bin/env bash
# Create .venv (if missing) and install rakt with faiss-cpu and the test tools from the package registry.
# torch/torchvision come the normal way (pip resolves them as dependencies of rakt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,test]"
.venv/bin/python -c "import torch, torchvision, open_clip, timm, faiss, webdataset; print('rakt env ok: torch', torch.__version__, 'faiss', faiss.__version__)"
