#!/usr/bin/env bash
# One GPU session: environment, GPU tests, identification benchmark (with tile sweep), SD3 step benchmark.
# Runs from a bare copy of workers/kernels, so the rest of `workers` (diffusers, pydantic imports) is not needed.
# Usage on the device machine, from the repo root:  bash benchmarks/run_device.sh "$OUT" [tests|bench|step|all]
set -uo pipefail
OUT=${1:?out dir}; WHAT=${2:-all}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
S=/tmp/sink_shim; rm -rf $S; mkdir -p $S/workers
echo '"""shim: only the kernels"""' > $S/workers/__init__.py
cp -r workers/kernels $S/workers/; cp -r tests/kernels $S/tests_kernels; cp -r benchmarks $S/
cd $S
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())";
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)"; date -u; } 2>&1 | tee $OUT/env.txt
if [[ $WHAT == all || $WHAT == final || $WHAT == tests ]]; then
  timeout 300 python3 -m pytest tests_kernels -q -p no:cacheprovider -rs --timeout 240 2>&1 | tee $OUT/pytest.txt | tail -25
fi
SWEEP=--sweep; [[ $WHAT == final ]] && SWEEP=
if [[ $WHAT == all || $WHAT == final || $WHAT == bench ]]; then
  timeout 240 python3 benchmarks/bench_identification.py $SWEEP --json $OUT/ident.json 2>&1 | tee $OUT/ident.txt | grep -v '^  [a-zA-Z(]'
fi
if [[ $WHAT == all || $WHAT == final || $WHAT == step ]]; then
  # "all" takes the sweep's fastest tiles; "final" runs the shipped defaults
  FROM=; [[ $WHAT == all ]] && FROM="--mass-config-from $OUT/ident.json"
  timeout 300 python3 benchmarks/bench_sd3_step.py --json $OUT/step.json $FROM 2>&1 | tee $OUT/step.txt | tail -18
fi
