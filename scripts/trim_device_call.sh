#!/usr/bin/env bash
# Device calls (<= 600 s each) for the trimmed warpgroup ranges (Config.trim; not yet run on a GPU), each check a
# child process under a watchdog (a barrier mistake shows as HANG, not as a stuck call). Run from the repository
# root; logs to $OUT, else ./gluon_dq_logs.
#     bash scripts/trim_device_call.sh fwd   # the Gluon forward (gluon_forward.Config.trim: each consumer warpgroup
#         computes only the key blocks its rows see, half of the last where they see no more): every correctness
#         case of scripts/gluon_check.py for each trimmed candidate (four processes at once), then the causal
#         rows as CUDA-graph replays, default_config vs the trimmed candidates vs cuDNN.
#     bash scripts/trim_device_call.sh bwd   # the Gluon backward (gluon_backward.Config.trim: warpgroup 1 idle at
#         the query blocks that see none of its keys): its candidates' checks, the causal sweep at d=128, and the
#         two passes' first pass (deterministic calls) with trim=True, whose dK / dV must keep the default's bits;
#         then the dropout rows (the bench's extras at d=128 s=4096: the new dropout mask layout's speed).
set -u
PART=${1:-fwd}
LOGS=${OUT:-$PWD/gluon_dq_logs}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$PART" = fwd ]; then
    echo "== forward: check the trimmed candidates"
    set -f  # the candidate patterns are for gluon_check.py, not for the shell
    for job in "64 bn128 bn128-*-tr" "64 bn64 bn64-*-tr" "128 all *-tr" "256 all *-tr"; do
        set -- $job
        timeout 250 python3 scripts/gluon_check.py --only check --candidates "$3" --head-dims "$1" --budget 235 \
            > "$LOGS/trim_check_d$1_$2.txt" 2>&1 &
    done
    set +f
    wait
    grep -hE "^== |FAIL|HANG" "$LOGS"/trim_check_d*.txt | cut -c1-200
    echo "== forward: causal rows, default vs trimmed vs cuDNN (CUDA graphs)"
    timeout 290 python3 scripts/gluon_check.py --sweep --causal 1 --seqlens 512 1024 2048 4096 16384 \
        --candidates '*-tr' --cudagraph --budget 280 > "$LOGS/trim_sweep.txt" 2>&1
    grep -E "^  (BENCH|RANK)|HANG|rror" "$LOGS/trim_sweep.txt" | cut -c1-260
else
    echo "== backward: check the trimmed candidates"
    timeout 200 python3 scripts/gluon_backward_check.py --only check --candidates trim,acc-trim --head-dims 64,128 \
        --budget 190 > "$LOGS/btrim_check.txt" 2>&1
    grep -E "^== |FAIL|HANG" "$LOGS/btrim_check.txt" | cut -c1-200
    echo "== backward: causal sweep d=128"
    timeout 230 python3 scripts/gluon_backward_check.py --sweep --causal 1 --candidates default,trim,acc-trim \
        --head-dims 128 --seqlens 512,1024,2048,4096,16384 --budget 220 > "$LOGS/btrim_sweep.txt" 2>&1
    grep -E "RANKING|^  [ 0-9][0-9]\.|HANG|rror" "$LOGS/btrim_sweep.txt" | cut -c1-200
    echo "== backward: first pass of the two passes (deterministic d=128) with trim"
    (cd scripts && timeout 120 python3 two_pass_check.py --head-dim 128 --causal 1 --dtypes bf16 \
        --seqlens 1024 4096 --first-configs trim=1 > "$LOGS/btrim_first_pass.txt" 2>&1)
    grep -E "^FIRST|rror" "$LOGS/btrim_first_pass.txt" | cut -c1-200
    echo "== dropout rows (one Philox call per 8 keys since the fifteenth session) against FA2 and cuDNN"
    mkdir -p "$LOGS/dropout_bench"
    timeout 150 python3 -m pyflash.bench --mode fwd bwd --head-dims 128 --seqlens 4096 --dtypes bf16 \
        --peers fa2 cudnn --no-plot --no-ceilings --out "$LOGS/dropout_bench" > "$LOGS/dropout_bench/stdout.txt" 2>&1
    grep -v "it/s\|s/it\|\] [0-9]*/" "$LOGS/dropout_bench/stdout.txt" | tail -30
fi
