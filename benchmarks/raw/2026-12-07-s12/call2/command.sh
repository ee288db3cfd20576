set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
git rev-parse HEAD; nvidia-smi --query-gpu=name --format=csv,noheader
echo "== pytest backward (two_pass, deterministic, default path, coop)"
timeout 130 python3 -m pytest -q -x tests/gpu/test_backward_gpu.py -k "two_pass or deterministic or default_path or coop" > $OUT/pytest_b.txt 2>&1; tail -3 $OUT/pytest_b.txt; grep -E "^(FAILED|ERROR)" $OUT/pytest_b.txt | head
for d in 256; do
echo "== bench bwd d=$d"
mkdir -p $OUT/grid$d
timeout 150 python3 -m pyflash.bench --mode bwd --head-dims $d --dtypes bf16 --peers cudnn --no-extras --no-plot --no-ceilings --out $OUT/grid$d > $OUT/grid$d/stdout.txt 2>&1
grep -v "it/s\|s/it" $OUT/grid$d/stdout.txt | tail -18
done
