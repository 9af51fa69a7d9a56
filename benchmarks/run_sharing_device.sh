#!/usr/bin/env bash
# One GPU call for issue 13 (sharing and speed options): the GPU tests of prefix sharing, then bench_sharing.py
# (prefix check at SD3-medium scale, a catalogue slice with and without sharing, step options, step ratios,
# torch.compile last so a time limit keeps the rest). Needs carry: .whl (diffusers), .wwhl (pydantic), .sinkcache.
# Usage on the device machine, from the repo root (or a copy of it):  bash benchmarks/run_sharing_device.sh "$OUT" [REPO_ROOT]
set -uo pipefail
OUT=${1:?out dir}
ROOT=${2:-$PWD}  # where .whl, .wwhl and .sinkcache are
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=$ROOT/.sinkcache SINKSCOPE_TEST_SHARED_CACHE=1 SINKSCOPE_BASELINE_CACHE=off
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $ROOT/.whl/*.whl $ROOT/.wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)";
  nproc; date -u; } 2>&1 | tee $OUT/env.txt
timeout ${TEST_S:-90} python3 -m pytest tests/workers/test_sharing.py -q -p no:cacheprovider -rs -k gpu 2>&1 | tee $OUT/pytest_sharing_gpu.txt | tail -4
timeout ${BENCH_S:-330} python3 benchmarks/bench_sharing.py --json $OUT/sharing.json ${BENCH_ARGS:-} 2>&1 | grep -v "kept in float32\|W[0-9]* .*torch/_dynamo" | tee $OUT/sharing.txt
