#!/usr/bin/env bash
# The main job: build a retrieval-augmented transfer set for CIFAR-10 from the offline kit, stage by stage.
# Every stage is a resumable batch job: rerun this script after a kill and it finishes what is missing.
# Override any setting through the environment, e.g. POOL_SHARDS=000000..000012 IMAGE_SIZE=224 bash run.sh
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup-venv.sh >/dev/null
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} NO_ALBUMENTATIONS_UPDATE=1 RAY_AUTH_MODE=disabled
source .venv/bin/activate

DATA=${RAKT_DATA:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-runs/quickstart}
MODEL=${MODEL:-timm:tf_efficientnet_lite0}
PRETRAINED=${PRETRAINED:-$DATA/teachers/tf_efficientnet_lite0.in1k.safetensors}
IMAGE_SIZE=${IMAGE_SIZE:-96}          # the teacher's native 224 px is ~20x slower on a 2-core CPU
POOL_SHARDS=${POOL_SHARDS:-000000..000002}   # 3 of the 13 pool shards = 30,000 images
SHOTS=${SHOTS:-10}                    # labelled images per class
BUDGET=${BUDGET:-5000}                # transfer-set size (the paper's rule: k = budget / queries - 1)
ENC=(--model "$MODEL" --pretrained "$PRETRAINED" --image-size "$IMAGE_SIZE")
T=$DATA/target/cifar10

[ -d "$T" ] || { echo "offline data kit not found at $DATA; set RAKT_DATA (see README)"; exit 2; }
START=$(date +%s)
rakt embed "$T/cifar10-train-{000000..000004}.tar.gz" --per-class "$SHOTS" --seed 0 --split train "${ENC[@]}" --out "$OUT/target"
rakt embed "$T/cifar10-test-000000.tar.gz" --split test "${ENC[@]}" --out "$OUT/eval"
rakt index build "$DATA/pool/pool-{$POOL_SHARDS}.tar.gz" "${ENC[@]}" --out "$OUT/index"
rakt retrieve "$OUT/target" --index "faiss:$OUT/index" --k 200 --out "$OUT/candidates"
rakt curate "$OUT/candidates" --budget "$BUDGET" --balance class --near-dup 0.98 --eval-embeddings "$OUT/eval" --out "$OUT/manifest"
rakt materialize "$OUT/manifest" --out "$OUT/shards"
rakt inspect "$OUT/manifest"
echo "main job done in $(( $(date +%s) - START )) s: transfer set in $OUT/shards"
