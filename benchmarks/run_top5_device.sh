#!/usr/bin/env bash
# One GPU call for the sink-statistics kernels (issue 13, deliverable 4): kernel GPU tests, the one-layer benchmark
# (with the top-5 kernels timed one by one), the real worker's step table, then the workers GPU tests.
# Knobs: TESTS_K (pytest -k), IDENT=0 skips the benchmark, IDENT_ARGS (e.g. --only-stats), STEP=0 skips the step table, WORKER_TESTS=0 skips
# the workers GPU tests. Needs carry: .whl (diffusers), .wwhl (pydantic), .sinkcache.
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
[[ ${IDENT:-1} == 1 ]] && timeout 150 python3 benchmarks/bench_identification.py --json $OUT/ident.json ${IDENT_ARGS:-} 2>&1 | tee $OUT/ident.txt | grep -v '^  [a-zA-Z(]'
[[ ${STEP:-1} == 1 ]] && timeout 200 python3 benchmarks/bench_worker.py --skip-groups --json $OUT/step.json 2>&1 \
  | grep -v "kept in float32" | tee $OUT/step.txt | tail -16
[[ ${WORKER_TESTS:-1} == 1 ]] && timeout ${GPU_TEST_S:-120} python3 -m pytest tests/workers/test_workers_gpu.py -q -p no:cacheprovider -rs -x 2>&1 | tee $OUT/pytest_gpu.txt | tail -4
