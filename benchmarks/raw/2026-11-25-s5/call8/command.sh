export PYTHONPATH=src
python3 scripts/decode_probe.py --before scripts/_decode_before.py --prefetch-rows 0 64 128 --splits 0 2>&1 | grep decode | tee $OUT/probe.log
python3 - <<'PY' 2>&1 | tee $OUT/paged.log
from pyflash.bench import decode as bench
from pyflash.kernels import decode
rows = []
for prefetch in (0, 64, 128):
    decode.PREFETCH_ROWS = prefetch
    for cache, batch, paged in ((8192, 1, True), (8192, 1, False), (8192, 4, True), (32768, 1, True), (32768, 1, False)):
        r = bench.decode_row(batch, cache, paged, with_sdpa=False)
        r["config"] = f"prefetch {prefetch}"
        rows.append(r)
print(bench.decode_table(rows, bench.copy_bandwidth_GBps()))
PY
python3 -m pytest -q -n 8 -p no:cacheprovider tests/gpu/test_kvcache_gpu.py tests/gpu/test_recorded_launch_gpu.py 2>&1 | tail -1
