#!/usr/bin/env bash
# One device call (device tool, <= 600 s): the first pass of the two-pass backward, variants compiled
# offline but never run on a GPU. Run from the repository root as
#     bash scripts/coop_device_call.sh
# (1) gluon_backward.Config.coop at d=256 (S^T / dP^T once each; coop=2 also issues the next step's first
#     GEMM early): its GPU test (against float32, and dK / dV bitwise equal to split_d's), then its time
#     against the default first pass;
# (2) d=128: the first pass with deeper Q / dO rings (num_stages 3, 4) against the default (2).
# Logs go to $OUT (the device tool brings them back), else to ./gluon_dq_logs.
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; git rev-parse HEAD; } > "$LOGS/gpu_coop.txt" 2>&1
echo "== pytest -k coop"
timeout 200 python3 -m pytest -q tests/gpu/test_backward_gpu.py -k coop > "$LOGS/pytest_coop.txt" 2>&1
tail -3 "$LOGS/pytest_coop.txt"
grep -q " passed" "$LOGS/pytest_coop.txt" && ! grep -q "failed\|error" "$LOGS/pytest_coop.txt" \
    || { echo "coop not correct: no timing"; COOP_BAD=1; }
cd scripts || exit 1
if [ -z "${COOP_BAD:-}" ]; then
    echo "== first pass d=256: coop against the default"
    timeout 150 python3 two_pass_check.py --head-dim 256 --dtypes bf16 --seqlens 1024 4096 16384 --causal 0 1 \
        --first-configs coop=1 coop=2 > "$LOGS/first256.txt" 2>&1
    grep -E "^FIRST|Error" "$LOGS/first256.txt"
fi
echo "== first pass d=128: num_stages 3 and 4 against the default"
timeout 120 python3 two_pass_check.py --head-dim 128 --dtypes bf16 --seqlens 4096 16384 --causal 0 1 \
    --first-configs num_stages=3 num_stages=4 > "$LOGS/first128.txt" 2>&1
grep -E "^FIRST|Error" "$LOGS/first128.txt"
