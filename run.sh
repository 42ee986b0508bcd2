#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default (CIFAR-10, 10 labels per class, the offline kit's pool,
# its ImageNet-pretrained EfficientNet-Lite0 teacher): transfer set -> adapted teacher -> distilled student ->
# results.csv + report.html in runs/main. Rerun after a kill: finished steps are skipped, the killed one resumes.
# Arguments go to `rakt run`, e.g.  bash run.sh experiment  |  bash run.sh fashion  |  bash run.sh --set distill.epochs=3
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh >/dev/null
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} NO_ALBUMENTATIONS_UPDATE=1 RAY_AUTH_MODE=disabled
source .venv/bin/activate
START=$(date +%s)
rakt run "$@"
echo "main job done in $(( $(date +%s) - START )) s"
