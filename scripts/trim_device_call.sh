#!/usr/bin/env bash
# One device call (<= 600 s) for the Gluon forward's trimmed warpgroup ranges (gluon_forward.Config.trim: each
# consumer warpgroup computes only the key blocks its rows see, half of the last where they see no more), not yet
# run on a GPU: every correctness case of scripts/gluon_check.py for each trimmed candidate (three processes at
# once, one per head dim; each job a child under a watchdog, so a barrier mistake shows as HANG), then the causal
# rows timed as CUDA-graph replays: default_config vs the trimmed candidates vs cuDNN. Run from the repository root:
#     bash scripts/trim_device_call.sh      (logs to $OUT, else ./gluon_dq_logs)
set -u
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== check the trimmed candidates"
for d in 64 128 256; do
    timeout 250 python3 scripts/gluon_check.py --only check --candidates '*-tr' --head-dims $d --budget 235 \
        > "$LOGS/trim_check_d$d.txt" 2>&1 &
done
wait
grep -hE "^== |FAIL|HANG" "$LOGS"/trim_check_d*.txt | cut -c1-200
echo "== causal rows: default vs trimmed vs cuDNN (CUDA graphs)"
timeout 290 python3 scripts/gluon_check.py --sweep --causal 1 --seqlens 512 1024 2048 4096 16384 \
    --candidates '*-tr' --cudagraph --budget 280 > "$LOGS/trim_sweep.txt" 2>&1
grep -E "^  (BENCH|RANK)|HANG|rror" "$LOGS/trim_sweep.txt" | cut -c1-260
