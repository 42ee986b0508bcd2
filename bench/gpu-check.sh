#!/usr/bin/env bash
# The GPU check, prepared: on a machine with a GPU it runs in about 8 minutes and writes every figure to one file
# (OUT_DIR/gpu-check.md, with the JSON beside it) to paste into docs/benchmarks.md:
#   1. the ceiling benchmark at GPU sizes: open_clip ViT-B-32 at 224 px (random init) embedding JPEG shards, its
#      teacher cache, a ResNet-18 student at 224 px distilled from the cache and with the online teacher, finetune,
#      evaluate; each against the compute-only speed of the same model, batch and dtype (bench/ceiling.py)
#   2. the exact torch search against its memory-bandwidth roofline (bench/search_gpu.py)
#   3. a short `rakt run` at GPU sizes (224-px teacher, 10,000-image transfer set), with its step times
#
#   bash bench/gpu-check.sh --prepare        # here, beside the data kit: wheels the GPU image lacks -> .whl/,
#                                            # the few kit files it reads -> .gpu/data (both ignored, ~55 MB)
#   bash bench/gpu-check.sh [OUT_DIR]        # there (device tool: carry .whl and .gpu)
#   bash bench/gpu-check.sh --tiny [OUT_DIR] # anywhere, CPU, about a minute: the same steps with tiny models (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in --prepare|--tiny) MODE=${1#--}; shift ;; esac
OUT=${1:-${OUT:-runs/gpu-check}}
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

if [ "$MODE" = prepare ]; then
  KIT=${RAKT_DATA:-../shared/data}
  mkdir -p .whl .gpu/data/pool .gpu/data/target/cifar10 .gpu/data/teachers
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 open_clip_torch==3.3.0 webdataset==0.2.111 \
    braceexpand ftfy wcwidth
  cp "$KIT"/pool/pool-00000{0,1}.tar.gz .gpu/data/pool/
  cp "$KIT"/target/cifar10/{cifar10-train-000000.tar.gz,cifar10-test-000000.tar.gz,classes.txt} .gpu/data/target/cifar10/
  cp "$KIT"/teachers/tf_efficientnet_lite0.in1k.safetensors .gpu/data/teachers/
  du -sh .whl .gpu
  echo "device tool: run(command='bash bench/gpu-check.sh \$OUT', carry=['.whl', '.gpu'], timeout_s=600)"
  exit 0
fi

PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ "$MODE" = gpu ] && [ -d .whl ]; then   # the GPU image has torch, timm, pandas, pyarrow; add what it lacks
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu/data ]; then export RAKT_DATA=${RAKT_DATA:-$PWD/.gpu/data}; fi
mkdir -p "$OUT"
REPORT="$OUT/gpu-check.md"
START=$(date +%s)
{
  echo "# rakt GPU check ($MODE), $(date -u +%Y-%m-%d)"
  $PY -c "from rakt.pipeline.device import device_name; import torch; print('device:', device_name(), '| torch', torch.__version__)"
} > "$REPORT"
section() { echo; echo "## $1 ($(( $(date +%s) - START )) s in)"; echo '```'; }

# 1. the ceiling benchmark
{ section "ceiling: rakt's hot loops against compute-only"
  if [ "$MODE" = tiny ]; then
    $PY bench/ceiling.py --tiny --device cpu --out "$OUT/ceiling.json" 2>&1 | grep -v " INFO \|WARNING"
  else
    $PY bench/ceiling.py --teacher-model ViT-B-32 --teacher-pretrained '' --teacher-size 224 --student resnet18 \
      --student-size 224 --batch-size 256 --finetune-batch-size 100 --images 16384 --test-images 10000 \
      --steps 20 --no-precision-check --out "$OUT/ceiling.json" 2>&1 | grep -v " INFO \|WARNING"
  fi
  echo '```'; } >> "$REPORT"

# 2. the exact torch search against its roofline
{ section "exact search (torch) against its memory-bandwidth roofline"
  if [ "$MODE" = tiny ]; then
    $PY bench/search_gpu.py --cpu --sizes 20000 --dim 64 --queries 256 --batch 128 2>&1 | grep -v " INFO "
  else
    $PY bench/search_gpu.py --sizes 4000000,16000000 --dim 768 --queries 32768 --batch 8192 --ivfpq-sizes '' \
      2>&1 | grep -v " INFO "
  fi
  echo '```'; } >> "$REPORT"

# 3. a short rakt run at GPU sizes
{ section "a short rakt run at GPU sizes"
  if [ "$MODE" = tiny ]; then   # the same command on the kit with a tiny random-init open_clip model
    DATA=$($PY -c "from rakt.pipeline.io import kit_dir; print(kit_dir())")
    TINY=$($PY -c "from rakt.pipeline.encoders import TINY_CLIP; print(TINY_CLIP)")
    $PY -m rakt.cli run --run-dir "$OUT/run" --set "teacher.model=$TINY" \
      --set "teacher.pretrained=''" --set teacher.image_size=32 --set 'adapt={mode: linear}' \
      --set "target.train=[\"$DATA/target/cifar10/cifar10-train-000000.tar.gz\"]" \
      --set "pool=[\"$DATA/pool/pool-000000.tar.gz\"]" --set curate.budget=300 --set distill.epochs=1 \
      --set experiment.labelled.epochs=1 --set finetune.epochs=1 > "$OUT/run.log" 2>&1 || tail -30 "$OUT/run.log"
    $PY -m rakt.cli status "$OUT/run"
  else
    DATA=$RAKT_DATA
    $PY -m rakt.cli run --run-dir "$OUT/run" --set teacher.image_size=224 --set teacher.batch_size=512 \
      --set "target.train=[\"$DATA/target/cifar10/cifar10-train-000000.tar.gz\"]" \
      --set "pool=[\"$DATA/pool/pool-{000000..000001}.tar.gz\"]" --set curate.budget=10000 \
      --set distill.student=resnet18 --set distill.image_size=224 --set distill.batch_size=256 \
      --set distill.epochs=10 --set experiment.labelled.epochs=100 > "$OUT/run.log" 2>&1 || tail -30 "$OUT/run.log"
    $PY -m rakt.cli status "$OUT/run"
  fi
  echo '```'; } >> "$REPORT"

echo "total: $(( $(date +%s) - START )) s" >> "$REPORT"
cat "$REPORT"
