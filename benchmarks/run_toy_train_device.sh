#!/usr/bin/env bash
# One GPU call that trains the toy model (workers.toy.train) and brings back its weights, log and samples.
# Needs: diffusers wheels (WHEEL_DIRS, default ".whl .wwhl", relative to the directory the call starts in) and the
# prebuilt CLIP tokenizer cache (SINKSCOPE_CACHE, default <repo>/.sinkcache: the device has no open_clip).
# Usage on the device machine:  bash <repo>/benchmarks/run_toy_train_device.sh "$OUT"   (TRAIN_ARGS: extra flags)
# $OUT receives env.txt, train.txt (stdout), train_log.jsonl, samples.png/.txt and toy-sd3.tar.gz (the weights).
set -uo pipefail
OUT=${1:?out dir}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(for d in ${WHEEL_DIRS:-.whl .wwhl}; do echo "$d"/*.whl; done) || exit 1
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$ROOT SINKSCOPE_CACHE=${SINKSCOPE_CACHE:-$ROOT/.sinkcache} HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)";
  date -u; } 2>&1 | tee "$OUT/env.txt"
timeout ${TRAIN_TIMEOUT_S:-540} python3 -m workers.toy.train --out /tmp/toy ${TRAIN_ARGS:-} 2>&1 \
    | grep --line-buffered -v -e "should be kept in float32" -e "Writing model shards" | tee "$OUT/train.txt"
cp /tmp/toy/train_log.jsonl /tmp/toy/samples.png /tmp/toy/samples.txt "$OUT/" 2>/dev/null
[ -d /tmp/toy/toy-sd3 ] && tar -C /tmp/toy -czf "$OUT/toy-sd3.tar.gz" toy-sd3 && ls -l "$OUT"
date -u | tee -a "$OUT/env.txt"
