"""The Triton backward in one kernel (dK/dV kernel with dQ by TMA reduce-adds, kernels/backward.py ATOMIC_DQ +
DQ_TMA) against the default pair of kernels (dQ kernel, then dK/dV kernel), on BENCHMARK.md's workload.

    PYTHONPATH=src python3 scripts/atomic_dq_check.py [--head-dims 64] [--seqlens 1024 4096 16384]
        [--dkdv 64,64,4,2 64,64,4,3 64,128,8,2] [--budget 240]

Per row: the default (deterministic=False, the table's config), then atomic dQ with each dK/dV config (the
table's dQ config unused), each compared with the default's gradients (relative max difference; atomics add
dQ in any order, so not bitwise), timed with do_bench (median ms, TFLOP/s = 10 * b * h * s^2 * d, halved if
causal) and the fastest one profiled kernel by kernel. Correctness against a float64 reference is
tests/gpu/test_backward_gpu.py's (its atomic cases).
"""
import argparse
import math
import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_backward_check import bench_inputs  # noqa: E402
from two_pass_check import profile_kernels  # noqa: E402

from pyflash.kernels.backward import BackwardConfig, backward, backward_config  # noqa: E402
from pyflash.params import AttentionParams, Seqlens  # noqa: E402


def relative_difference(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--dkdv", nargs="+", default=["64,64,4,2", "64,64,4,3", "64,128,8,2", "128,64,8,2"])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; rows past it are skipped")
    args = parser.parse_args()
    start = time.time()
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    failures = 0
    for head_dim in args.head_dims:
        for causal in map(bool, args.causal):
            for seqlen in args.seqlens:
                if time.time() - start > args.budget:
                    print(f"SKIP d={head_dim} causal={int(causal)} s={seqlen}: budget spent", flush=True)
                    continue
                flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, head_dim, causal, args.dtype)
                params = AttentionParams(scale, -1, 0 if causal else -1)
                seqlens = Seqlens(q.shape[0], seqlen, seqlen)
                table = backward_config(q, head_dim, causal)
                row = f"{args.dtype} d={head_dim} causal={int(causal)} s={seqlen}"
                variants = {"default": None}
                for text in args.dkdv:
                    variants[f"atomic-{text}"] = BackwardConfig(tuple(int(x) for x in text.split(",")), table.dq,
                                                                True, table.tma)
                results, times, fns = {}, {}, {}
                for name, config in variants.items():
                    grads = [torch.full_like(t, math.nan) for t in (q, k, v)] + [torch.full_like(lse, math.nan)]

                    def fn(grads=grads, config=config):
                        backward(dout, q, k, v, out, lse, *grads, params, seqlens, False, config=config)
                    try:
                        fn()
                        torch.cuda.synchronize()
                    except Exception as error:  # noqa: BLE001 - report the variant and go on
                        print(f"ERROR {row} {name}: {str(error).splitlines()[-1][:160]}", flush=True)
                        continue
                    results[name], fns[name] = grads, fn
                    times[name] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                base = results["default"]
                for name, grads in results.items():
                    diffs = [relative_difference(a, b) for a, b in zip(grads, base)]
                    ok = all(torch.isfinite(t).all() for t in grads) and max(diffs) < 2e-2
                    failures += not ok
                    print(f"BENCH {row} {name:18s} {times[name]:8.3f} ms {flops / times[name] / 1e9:5.0f} TFLOP/s "
                          f"time/default {times[name] / times['default']:.3f}  max rel diff dq/dk/dv/d "
                          f"{' '.join(f'{d:.1e}' for d in diffs)}  {'PASS' if ok else 'FAIL'}", flush=True)
                best = min((t, name) for name, t in times.items() if name != "default")[1] if len(times) > 1 else None
                if best:
                    profile_kernels(f"{row} default", fns["default"])
                    profile_kernels(f"{row} {best}", fns[best])
                del results, fns
    print(f"{failures} variants failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
