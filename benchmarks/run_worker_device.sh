#!/usr/bin/env bash
# One GPU call for the real worker: the lse GPU test, bench_worker.py (step table + group throughput), then the
# other workers GPU tests. Needs carry: .whl (diffusers), .wwhl (pydantic), .sinkcache (prebuilt CLIP tokenizers).
# Usage on the device machine, from the repo root:  bash benchmarks/run_worker_device.sh "$OUT"
set -uo pipefail
OUT=${1:?out dir}
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=$PWD/.sinkcache SINKSCOPE_TEST_SHARED_CACHE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)";
  date -u; } 2>&1 | tee $OUT/env.txt
timeout 120 python3 -m pytest tests/workers/test_workers_gpu_lse.py -q -p no:cacheprovider -rs 2>&1 | tee $OUT/pytest_lse.txt | tail -6
timeout 330 python3 benchmarks/bench_worker.py --json $OUT/worker.json ${BENCH_ARGS:-} 2>&1 | grep -v "kept in float32" | tee $OUT/worker.txt
timeout ${TEST_S:-150} python3 -m pytest tests/workers/test_workers_gpu.py -q -p no:cacheprovider -rs -x 2>&1 | tee $OUT/pytest_gpu.txt | tail -8
