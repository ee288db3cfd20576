#!/usr/bin/env bash
# One device call (device tool, <= 600 s) for the one-warpgroup backward at d=64 (gluon_backward.Config(wgs=1,
# dq_own): 64 keys a CTA, two CTAs an SM; not yet run on a GPU): its GPU tests, then its speed against the
# default config, the API (the Triton kernels at d=64) and cuDNN. Run from the repository root:
#     bash scripts/wg1_device_call.sh
# Logs go to $OUT (the device tool brings them back), else to ./gluon_dq_logs.
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== pytest one_warpgroup"
timeout 150 python3 -m pytest -q tests/gpu/test_backward_gpu.py -k one_warpgroup > "$LOGS/pytest_wg1.txt" 2>&1
tail -3 "$LOGS/pytest_wg1.txt"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest_wg1.txt" | head
echo "== sweep d=64"
CANDIDATES=default,own-wg1,acc-own-wg1,own-wg1-st3,acc-own-wg1-st3,acc-own-wg1-dq2
(cd scripts && timeout 380 python3 gluon_backward_check.py --sweep --only bench --head-dims 64 \
    --seqlens 4096,16384 --candidates $CANDIDATES --budget 370 > "$LOGS/sweep_wg1.txt" 2>&1)
grep -E "RANKING|^  [ 0-9][0-9]\.|FAIL|rror" "$LOGS/sweep_wg1.txt" | cut -c1-200 | head -60
