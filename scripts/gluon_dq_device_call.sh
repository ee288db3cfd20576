#!/usr/bin/env bash
# One device call (device tool, <= 600 s) that takes the Gluon dQ kernel (kernels/gluon_dq.py) from
# "compiled offline" to "checked and timed": run from the repository root as
#     bash scripts/gluon_dq_device_call.sh
# Logs go to $OUT (the device tool brings them back), else to ./gluon_dq_logs. Each step has its own
# time limit, and gluon_dq_check.py runs every job in a watchdogged child, so a hang costs one job.
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; git rev-parse HEAD; } > "$LOGS/gpu.txt" 2>&1
cd scripts || exit 1
step() {  # step NAME SECONDS ARGS...: gluon_dq_check.py ARGS with --budget SECONDS, output to $LOGS/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout $((seconds + 30)) python3 gluon_dq_check.py "$@" --budget "$seconds" > "$LOGS/$name.txt" 2>&1
    grep -E "^== |CHECK FAIL|BENCH|SWEEP" "$LOGS/$name.txt" | grep -v ": ok \[" | tail -40
}
# The smoke run first: one shape, d=128, bf16; if even this is not right, the rest is not worth the time.
step smoke 60 --only check --head-dims 128 --dtypes bf16 --causal 0 --max-shapes 1 --timeout 50
grep -q "FAIL 0; jobs not ok: 0" "$LOGS/smoke.txt" || { echo "smoke run failed"; exit 3; }
step check 150 --only check
step bench 150 --only bench --dtypes bf16 --seqlens 1024 4096 16384
step sweep 120 --only sweep --head-dims 128 256 --dtypes bf16 --causal 1 --seqlens 4096 --timeout 40
