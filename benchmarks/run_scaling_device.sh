#!/usr/bin/env bash
# Group throughput on one GPU vs two independent processes on two GPUs (one per card, started together after
# their warm-up). Not the orchestrate local executor: a per-GPU worker-process lower bound on its scaling.
set -uo pipefail
OUT=${1:?out dir}; G=${GROUPS_N:-3}
export PYTHONUNBUFFERED=1 SINKSCOPE_CACHE=$PWD/.sinkcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .wwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/env_scaling.txt
B=/tmp/bar1; mkdir -p $B
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_worker.py --skip-steps --which a1,a3 --groups $G --barrier $B:1:0 2>&1 | grep -v float32 | tee $OUT/scale_one.txt
B=/tmp/bar2; mkdir -p $B
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_worker.py --skip-steps --which a1,a3 --groups $G --barrier $B:2:0 > $OUT/scale_two_gpu0.txt 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/bench_worker.py --skip-steps --which a1,a3 --groups $G --barrier $B:2:1 > $OUT/scale_two_gpu1.txt 2>&1
wait
grep -h "generate_group" $OUT/scale_two_gpu*.txt
