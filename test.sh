#!/usr/bin/env bash
# The test command: set up .venv and run the test suite (no GPU or network needed; reads ../shared/data).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"
