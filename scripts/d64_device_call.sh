#!/usr/bin/env bash
# One device call (device tool, <= 600 s) for the two one-kernel backwards at d=64, neither yet run on a GPU: the
# Gluon one-warpgroup kernel (gluon_backward.Config(wgs=1, dq_own): 64 keys a CTA, two CTAs an SM) and the Triton
# dK/dV kernel with dQ by TMA reduce-adds (kernels/backward.py ATOMIC_DQ + DQ_TMA). Their GPU tests, then each
# against the default (the Triton pair: dQ kernel, then dK/dV kernel) and cuDNN. Run from the repository root:
#     bash scripts/d64_device_call.sh
# Logs go to $OUT (the device tool brings them back), else to ./gluon_dq_logs.
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== pytest one_warpgroup, dense (atomic dQ by TMA among them), varlen"
timeout 170 python3 -m pytest -q -n 8 --timeout=100 tests/gpu/test_backward_gpu.py \
    -k "one_warpgroup or dense_against or varlen" > "$LOGS/pytest_d64.txt" 2>&1
tail -3 "$LOGS/pytest_d64.txt"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest_d64.txt" | head
echo "== Triton one kernel (atomic dQ by TMA) d=64"
(cd scripts && timeout 160 python3 atomic_dq_check.py --head-dims 64 --seqlens 1024 4096 16384 --budget 140 \
    > "$LOGS/atomic_dq_d64.txt" 2>&1)
grep -E "BENCH|ERROR|SKIP|failed|rror" "$LOGS/atomic_dq_d64.txt" | cut -c1-200
grep -E "^KERNEL" "$LOGS/atomic_dq_d64.txt" | cut -c1-140 | head -40
echo "== Gluon one warpgroup sweep d=64"
CANDIDATES=default,own-wg1,acc-own-wg1,acc-own-wg1-st3,acc-own-wg1-dq2
(cd scripts && timeout 240 python3 gluon_backward_check.py --sweep --only bench --head-dims 64 \
    --seqlens 4096,16384 --candidates $CANDIDATES --budget 230 > "$LOGS/sweep_wg1.txt" 2>&1)
grep -E "RANKING|^  [ 0-9][0-9]\.|FAIL|rror" "$LOGS/sweep_wg1.txt" | cut -c1-200 | head -60
