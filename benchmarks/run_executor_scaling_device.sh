#!/usr/bin/env bash
# orchestrate's LOCAL executor, one GPU against two, through the real CLI (benchmarks/bench_executor_scaling.py):
# sd3-medium-random bf16, 1024², 20 steps, A = 1 and 3, workers 1 and 2, plus A = 1 on two workers with the thread
# limit off. Needs a 2-GPU machine and carry: .whl (diffusers), .wwhl (pydantic), .sinkcache (prebuilt CLIP
# tokenizers: the machine has no open_clip). ≈ 8 min: give the call timeout_s 600.
# Usage on the device machine, from the repo root:  bash benchmarks/run_executor_scaling_device.sh "$OUT" [bench args]
# Leaves in OUT: env.txt, pytest_preset.txt, stdout.txt, scaling.txt (the table), scaling.json, logs.tar.gz (sweeps, CLI output, shard
# logs, submissions and done markers of every run; the images and tables stay on the machine).
set -uo pipefail
OUT=${1:?usage: run_executor_scaling_device.sh OUT_DIR [bench args]}; shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=$PWD/.sinkcache HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # as the machine requires
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; echo "cpus: $(nproc)";
  python3 -c "import torch, diffusers, transformers, pydantic; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'threads', torch.get_num_threads(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)";
  python3 -m orchestrate --help >/dev/null && echo "orchestrate CLI ok"; date -u; } 2>&1 | tee "$OUT/env.txt"
# the preset first: built on the GPU in bf16, no fp32 copy, the same weights twice (≈ 30 s)
SINKSCOPE_TEST_SHARED_CACHE=1 timeout 100 python3 -m pytest tests/workers/test_workers_scale_presets.py -q -p no:cacheprovider \
  -rs -k gpu 2>&1 | tee "$OUT/pytest_preset.txt"
WORK=/tmp/executor-scaling; rm -rf "$WORK"
timeout 450 python3 benchmarks/bench_executor_scaling.py --out "$OUT" --work "$WORK" --timeout 240 "$@" 2>&1 | tee "$OUT/stdout.txt"
status=${PIPESTATUS[0]}
(cd "$WORK" 2>/dev/null && find . \( -name '*.log' -o -name '*.yaml' -o -name 'submissions.jsonl' -o -path '*/state/done/*.json' \
   -o -path '*/state/failed/*.json' \) -print0 | tar czf "$OUT/logs.tar.gz" --null -T -)
exit "$status"
