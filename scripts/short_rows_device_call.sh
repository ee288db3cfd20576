#!/usr/bin/env bash
# One device call (<= 600 s) on the short rows: the Triton backward's delta computed in its dQ kernel
# (kernels/backward.FUSE_DELTA) checked and timed against the delta kernel of its own; the d=128 backward in two
# passes (what deterministic calls run) against the default one pass at s <= 2048, kernel by kernel; then
# pyflash's and cuDNN's kernels one by one (scripts/peer_profile.py). Run from the repository root:
#     bash scripts/short_rows_device_call.sh      (logs to $OUT, else ./gluon_dq_logs)
#     SKIP_TESTS=1 bash scripts/short_rows_device_call.sh   (after scripts/gpu_check.py ran on this tree)
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== pytest Triton backward (dense, default path, varlen, torch flash, bitwise)"
    timeout 170 python3 -m pytest -q -n 8 --timeout=100 tests/gpu/test_backward_gpu.py \
        -k "dense_against or default_path or varlen or torch_flash or deterministic_bitwise" \
        > "$LOGS/pytest_triton_bwd.txt" 2>&1
    tail -3 "$LOGS/pytest_triton_bwd.txt"
    grep -E "^(FAILED|ERROR)" "$LOGS/pytest_triton_bwd.txt" | head
fi
echo "== fused delta d=64"
(cd scripts && timeout 130 python3 fused_delta_check.py --head-dims 64 > "$LOGS/fused_delta.txt" 2>&1)
grep -E "BENCH|MISMATCH|rows failed|rror" "$LOGS/fused_delta.txt" | cut -c1-220
echo "== d=128 two passes vs one, short rows"
(cd scripts && timeout 110 python3 two_pass_check.py --head-dim 128 --only bench --seqlens 512 1024 2048 \
    --dtypes bf16 --profile > "$LOGS/two_pass_d128_short.txt" 2>&1)
grep -E "^BENCH|rror" "$LOGS/two_pass_d128_short.txt" | cut -c1-330
echo "== peer profile"
timeout 160 python3 scripts/peer_profile.py --mode bwd fwd --head-dims 64 128 --seqlens 512 1024 \
    > "$LOGS/peer_profile.txt" 2>&1
grep -E "CALL|rror" "$LOGS/peer_profile.txt" | cut -c1-200
