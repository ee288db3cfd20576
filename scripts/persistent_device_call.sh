#!/usr/bin/env bash
# One device call (device tool, <= 600 s) for the backward variants built offline and never run on a GPU:
#     bash scripts/persistent_device_call.sh
# (1) tests/gpu/test_backward_gpu.py -k "coop or persistent": Config.coop (d=256 first pass, S^T / dP^T once
#     each) and Config.persistent (one CTA per SM looping over key-block tiles), bitwise against the configs
#     they would replace and against float32;
# (2) the d=256 first pass timed with coop, persistent and both against the default (two_pass_check.py);
# (3) the one-kernel backward at d=128 / 64 with the persistent grid at the short rows (s=512, 1024) against
#     the default config and cuDNN (gluon_backward_check.py --sweep).
# Logs go to $OUT (the device tool brings them back), else to ./gluon_dq_logs.
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; git rev-parse HEAD; git status --short | head; } \
    > "$LOGS/gpu.txt" 2>&1
cat "$LOGS/gpu.txt"
echo "== pytest -k 'coop or persistent'"
timeout 240 python3 -m pytest -q tests/gpu/test_backward_gpu.py -k "coop or persistent" > "$LOGS/pytest_cp.txt" 2>&1
tail -4 "$LOGS/pytest_cp.txt"
grep -E "^(FAILED|ERROR)" "$LOGS/pytest_cp.txt" | head
cd scripts || exit 1
echo "== first pass d=256: coop, persistent against the default"
timeout 130 python3 two_pass_check.py --head-dim 256 --dtypes bf16 --seqlens 512 1024 4096 16384 --causal 0 1 \
    --first-configs coop=1 coop=2 persistent=1,lpt=1 coop=2,persistent=1,lpt=1 > "$LOGS/first256.txt" 2>&1
grep -E "^FIRST|Error" "$LOGS/first256.txt"
if ! grep -q "FAILED.*persistent" "$LOGS/pytest_cp.txt"; then
    echo "== one-kernel backward, persistent sweep at the short rows"
    timeout 200 python3 gluon_backward_check.py --sweep --only bench --candidates default,ps,acc-ps --seqlens 512,1024 \
        --head-dims 128,64 --budget 190 --timeout 60 > "$LOGS/sweep_ps.txt" 2>&1
    grep -A6 "^RANKING" "$LOGS/sweep_ps.txt"
    grep -E "HANG|FAIL|Error" "$LOGS/sweep_ps.txt" | head
fi
