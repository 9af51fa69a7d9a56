#!/usr/bin/env bash
# One GPU call for the atlas measures' cost: bench_worker.py --atlas (sd3-medium-random, 1024², bf16, CFG batch 2).
# Needs carry: .whl (diffusers), .wwhl (pydantic), .sinkcache (WHEELS= / SINKSCOPE_CACHE= point elsewhere). From the repo root:
#   bash benchmarks/run_atlas_device.sh "$OUT"
set -uo pipefail
OUT=${1:?out dir}
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=${SINKSCOPE_CACHE:-$PWD/.sinkcache}
WHEELS=${WHEELS:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS/.whl/*.whl $WHEELS/.wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)";
  date -u; } 2>&1 | tee $OUT/env.txt
timeout ${BENCH_S:-200} python3 benchmarks/bench_worker.py --atlas --skip-groups --iters ${ITERS:-10} --json $OUT/atlas.json 2>&1 \
  | grep -v "kept in float32" | tee $OUT/atlas.txt
