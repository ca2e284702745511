#!/usr/bin/env bash
# GPU check in one go (about 8 minutes on one H100/H200): CUDA kernel tests, attention and model benchmarks in
# bf16, a short bf16 stage-1 run of the small preset and of the base preset. Results land in $OUT (default
# runs/gpu_check): log.txt plus each run's metrics.jsonl and samples.png. Run from the repository root:
#   OUT=runs/gpu_check bash docs/gpu_check.sh
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG="$OUT/log.txt"
quiet() { tr '\r' '\n' | grep -v -E ': +[0-9]{1,2}%\|'; }  # drop the intermediate progress-bar frames
step() { echo; echo "=== $1 ($(date +%T))"; }
{
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
  step "CUDA kernel tests"
  timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 | tail -4
  step "model benchmark (bf16 autocast)"
  timeout 100 $PY model.py --bench --device cuda
  step "attention benchmark, bf16"
  timeout 60 $PY kernels.py --bench --device cuda --dtype bfloat16 --repeats 5
  for spec in "small 300 300 64 150" "base 150 150 8 140"; do
    set -- $spec
    step "stage 1, preset $1, bf16, $2 VQ steps + $3 transformer steps"
    rm -rf "runs/gpu_$1"
    t0=$SECONDS
    timeout "$5" $PY train.py --stage 1 --preset "$1" --vq-steps "$2" --steps "$3" \
      --n-eval "$4" --eval-every 100000 --out "runs/gpu_$1" 2>&1 | quiet
    echo "wall $((SECONDS - t0)) s"
    cp "runs/gpu_$1/metrics.jsonl" "$OUT/$1_metrics.jsonl" 2>/dev/null
    cp "runs/gpu_$1/samples.png" "$OUT/$1_samples.png" 2>/dev/null
  done
  step "done"
} 2>&1 | tee "$LOG"
