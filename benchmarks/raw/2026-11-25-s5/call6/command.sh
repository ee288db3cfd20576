export PYTHONPATH=src
python3 -m pytest -q -n 8 -p no:cacheprovider tests/gpu/test_kvcache_gpu.py tests/gpu/test_recorded_launch_gpu.py 2>&1 | tail -1
python3 - <<'PY' 2>&1 | tee $OUT/paged.log
import argparse, torch
from pyflash.bench import decode as bench
from pyflash.kernels import decode
rows = []
for label, vec in (("table load in loop", 0), ("page vector", 256)):
    decode.MAX_PAGE_VECTOR = vec
    for cache in (8192, 32768):
        for batch in (1, 4, 16):
            r = bench.decode_row(batch, cache, True, with_sdpa=False)
            r["config"] = label
            rows.append(r)
            print(label, batch, cache, f"{r['pyflash_us']:.1f} us", flush=True)
print(bench.decode_table(rows, bench.copy_bandwidth_GBps()))
PY
