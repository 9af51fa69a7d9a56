#!/usr/bin/env bash
# One GPU call for the catalogue's GPU-hours (issue 13, unit cache): bench_sharing.py's `units` section (a catalogue
# slice with no cache, the baseline cache, and the cache for baselines and intervened units; bit-identity across
# the three) and `batching` (images/hour at arms_per_batch 1, 2, 3). Needs carry: .whl (diffusers), .wwhl (pydantic).
# Usage on the device machine, from the repo root (or a copy of it):  bash benchmarks/run_units_device.sh "$OUT" [REPO_ROOT]
set -uo pipefail
OUT=${1:?out dir}
ROOT=${2:-$PWD}  # where .whl, .wwhl and .sinkcache are
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=$ROOT/.sinkcache
unset SINKSCOPE_BASELINE_CACHE  # the bench sets each mode's cache in its sweeps
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $ROOT/.whl/*.whl $ROOT/.wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)";
  nproc; date -u; } 2>&1 | tee $OUT/env.txt
timeout ${BENCH_S:-260} python3 benchmarks/bench_sharing.py --json $OUT/units.json --sections ${SECTIONS:-units,batching} \
  --prompts ${PROMPTS:-2} --groups ${NGROUPS:-2} 2>&1 | grep -v "kept in float32" | tee $OUT/units.txt
