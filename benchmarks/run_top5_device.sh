#!/usr/bin/env bash
# One GPU call for the exact top-5 kernels (issue 13, deliverable 4): kernel GPU tests, the one-layer benchmark with
# a per-kernel timing of the mode-6 pipeline, the real worker's step table with mode 6 (default) and mode 5
# (SINKSCOPE_TOP5_MODE=5), then the workers GPU tests. Knobs: TESTS_K (pytest -k), IDENT_ARGS (e.g. --only-stats),
# STEP_MODES (default "6 5"), WORKER_TESTS=0 skips the workers GPU tests. Needs carry: .whl (diffusers), .wwhl (pydantic), .sinkcache.
# Usage on the device machine, from the repo root (or a copy of it):  bash benchmarks/run_top5_device.sh "$OUT" [REPO_ROOT]
set -uo pipefail
OUT=${1:?out dir}
ROOT=${2:-$PWD}
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=$ROOT/.sinkcache SINKSCOPE_TEST_SHARED_CACHE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $ROOT/.whl/*.whl $ROOT/.wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__)";
  date -u; } 2>&1 | tee $OUT/env.txt
timeout ${TEST_S:-300} python3 -m pytest tests/kernels -q -p no:cacheprovider -rs -x ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee $OUT/pytest_kernels.txt | tail -5
timeout 150 python3 benchmarks/bench_identification.py --json $OUT/ident.json ${IDENT_ARGS:-} 2>&1 | tee $OUT/ident.txt | grep -v '^  [a-zA-Z(]'
for mode in ${STEP_MODES:-6 5}; do
  SINKSCOPE_TOP5_MODE=$mode timeout 200 python3 benchmarks/bench_worker.py --skip-groups --json $OUT/step_mode$mode.json 2>&1 \
    | grep -v "kept in float32" | tee $OUT/step_mode$mode.txt | tail -16
done
[[ ${WORKER_TESTS:-1} == 1 ]] && timeout ${GPU_TEST_S:-120} python3 -m pytest tests/workers/test_workers_gpu.py -q -p no:cacheprovider -rs -x 2>&1 | tee $OUT/pytest_gpu.txt | tail -4
