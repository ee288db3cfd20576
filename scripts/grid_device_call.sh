#!/usr/bin/env bash
# One device call (<= 600 s): the GPU tests (scripts/gpu_check.py) and then the full forward + backward grid
# against cuDNN (bf16), the one-run measurement issues 6 and 7 ask for. Run from the repository root:
#     bash scripts/grid_device_call.sh      (logs and the bench JSON to $OUT, else ./gluon_dq_logs)
#     SKIP_TESTS=1 DTYPES=fp16 bash scripts/grid_device_call.sh   (the fp16 grid alone, after a run with the tests)
set -u
export OUT=${OUT:-$PWD/gluon_dq_logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== gpu_check (tests)"
    timeout 300 python3 scripts/gpu_check.py --bench-args "" > $OUT/gpu_check.txt 2>&1
    grep -E "passed|failed|^(FAILED|ERROR)|== gpu" $OUT/gpu_check.txt | tail -12
fi
echo "== bench fwd bwd"
mkdir -p $OUT/grid
timeout 280 python3 -m pyflash.bench --mode fwd bwd --dtypes ${DTYPES:-bf16} --peers cudnn --no-extras --no-plot \
    --out $OUT/grid > $OUT/grid/stdout.txt 2>&1
grep -v "it/s\|s/it\|\] [0-9]*/" $OUT/grid/stdout.txt | tail -60
