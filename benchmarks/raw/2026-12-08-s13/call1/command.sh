set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
S=$(date +%s)
B=${1:-540}
left() { echo $(( B - ($(date +%s) - S) )); }
echo "== d=64 parts"
timeout $(( $(left) < 160 ? $(left) : 160 )) python3 scripts/two_pass_check.py --head-dim 64 --only bench --dtypes bf16 --seqlens 1024 4096 16384 --profile > $OUT/d64_parts.txt 2>&1
grep -E "BENCH|KERNEL|Error|error" $OUT/d64_parts.txt | cut -c1-420 | head -60
echo "== d=64 first pass variants [$(( $(date +%s) - S ))s]"
timeout $(( $(left) < 75 ? $(left) : 75 )) python3 scripts/two_pass_check.py --head-dim 64 --dtypes bf16 --seqlens 4096 16384 --first-configs num_stages=3 block_m=128 block_m=128,num_stages=3 > $OUT/d64_first.txt 2>&1
grep -E "FIRST|rror" $OUT/d64_first.txt | head -20
echo "== d=64 two-pass gdq check bf16 [$(( $(date +%s) - S ))s]"
timeout $(( $(left) < 100 ? $(left) : 100 )) python3 scripts/two_pass_check.py --head-dim 64 --only check --dtypes bf16 --gluon-dq 1 > $OUT/d64_check.txt 2>&1
grep -E "CHECKS|FAIL|rror" $OUT/d64_check.txt | head -20
echo "== rotate sweep d=128 [$(( $(date +%s) - S ))s]"
R=$(left); [ $R -gt 40 ] || exit 0
(cd scripts && timeout $R python3 gluon_backward_check.py --sweep --only bench --candidates default,acc-rot --seqlens 1024,4096 --head-dims 128 --budget $(( R - 10 )) > $OUT/rot_sweep.txt 2>&1)
grep -E "RANKING|^  [ 0-9][0-9]\.|FAIL|rror" $OUT/rot_sweep.txt | cut -c1-300 | head -40
echo "== done [$(( $(date +%s) - S ))s]"
