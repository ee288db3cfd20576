"""The Triton backward with delta from its own kernel against delta computed in the dQ kernel
(kernels/backward.FUSE_DELTA), on BENCHMARK.md's workload: same results, and the time of each.

    PYTHONPATH=src python3 scripts/fused_delta_check.py [--head-dims 64] [--seqlens 512 1024 4096 16384]
        [--dtypes bf16 fp16] [--deterministic]

Each row times the two launch orders twice, alternating (do_bench medians), and prints the ratio
fused / separate of the better of each pair; then each variant's kernels under torch.profiler.
"""
import argparse
import math
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_backward_check import bench_inputs  # noqa: E402
from two_pass_check import profile_kernels  # noqa: E402

from pyflash.kernels.backward import backward  # noqa: E402
from pyflash.params import AttentionParams, Seqlens  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    failures = 0
    for dtype_name in args.dtypes:
        for head_dim in args.head_dims:
            for causal in (False, True):
                for seqlen in args.seqlens:
                    flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, head_dim, causal, dtype_name)
                    params = AttentionParams(scale, -1, 0 if causal else -1)
                    seqlens = Seqlens(q.shape[0], seqlen, seqlen)
                    row = f"{dtype_name} d={head_dim} causal={int(causal)} s={seqlen}"
                    results, fns = {}, {}
                    for fused in (False, True):
                        grads = [torch.full_like(t, math.nan) for t in (q, k, v)] + [torch.full_like(lse, math.nan)]
                        fns[fused] = (lambda grads=grads, fused=fused: backward(  # noqa: E731
                            dout, q, k, v, out, lse, *grads, params, seqlens, args.deterministic, kernel="triton",
                            fuse_delta=fused))
                        fns[fused]()
                        torch.cuda.synchronize()
                        results[fused] = [t.clone() for t in grads]
                    same = all(torch.isfinite(t).all() for t in results[True])
                    for a, b, name in zip(results[False], results[True], ("dq", "dk", "dv", "softmax_d")):
                        scale_ref = a.float().abs().max().item() or 1.0
                        err = (a.float() - b.float()).abs().max().item() / scale_ref
                        if err > 1e-2:
                            same = False
                            print(f"MISMATCH {row} {name}: max relative difference {err:.3e}", flush=True)
                    failures += not same
                    times = {False: [], True: []}
                    for _ in range(2):
                        for fused in (False, True):
                            times[fused].append(triton.testing.do_bench(fns[fused], warmup=25, rep=100,
                                                                        return_mode="median"))
                    best = {fused: min(ts) for fused, ts in times.items()}
                    print(f"BENCH {row} separate {best[False]:7.3f} ms ({flops / best[False] / 1e9:4.0f} TFLOP/s) "
                          f"fused {best[True]:7.3f} ms ({flops / best[True] / 1e9:4.0f}) fused/separate time "
                          f"{best[True] / best[False]:.3f}  {'PASS' if same else 'FAIL'}  all: "
                          f"{' '.join(f'{t:.3f}' for t in times[False] + times[True])}", flush=True)
                    if not args.no_profile:
                        for fused in (False, True):
                            profile_kernels(f"{row} {'fused' if fused else 'separate'}", fns[fused])
                    del results, fns
    print(f"{failures} rows failed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
