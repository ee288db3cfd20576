"""The backward in two passes (gluon_backward.two_pass) on an H100/H200: correctness, repeatability, speed.

    PYTHONPATH=src python3 scripts/two_pass_check.py [--only check|bench] [--seqlens 512 4096 16384]
    PYTHONPATH=src python3 scripts/two_pass_check.py --head-dim 128   # d=128: the pair for deterministic calls
    PYTHONPATH=src python3 scripts/two_pass_check.py --head-dim 64    # d=64: "one-pass" is the Gluon kernel,
                                                                      # "default" the Triton kernels
    PYTHONPATH=src python3 scripts/two_pass_check.py --head-dim 128 --dtypes bf16 --seqlens 4096 16384 \
        --first-configs num_stages=3 num_stages=4        # the first pass alone, per Config override

Two passes: the Gluon kernel's dK / dV / softmax_d without its dQ work (Config.with_dq=False: split_d at
d=256, the plain layout below), then the Triton dQ kernel alone (kernels/backward.backward(dq_only=True,
delta_ready=True)). Deterministic calls at the head dims of gluon_backward.TWO_PASS_HEAD_DIMS (256) and
DETERMINISTIC_TWO_PASS_HEAD_DIMS (128, 256) take them, and causal ones at TWO_PASS_HEAD_DIMS while
gluon_backward.TWO_PASS_CAUSAL; this script puts --head-dim among both for its two-pass runs.

(a) check: through kernels/backward.backward (the backend's entry, so the dispatch is what users get, with
    --head-dim among the two-pass head dims), dq, dk, dv and softmax_d poisoned with NaN, bf16 and fp16,
    causal and not, deterministic and not, over
    shapes with GQA / MQA, seqlen_q != seqlen_k both ways and ragged ends: each gradient against a float64
    reference with flash_attn's rule (ours <= 2 * PyTorch's own low-precision error + 1e-3); deterministic
    calls run twice more and must give the same bits.
(b) bench: BENCHMARK.md's shapes (batch * seqlen = 16384, heads * head_dim = 2048), triton.testing.do_bench
    median, TFLOP/s = 10 * b * h * s^2 * d (halved if causal): "one-pass" (the Gluon kernel with its dQ
    reduce-adds), "two-pass" (the pair, deterministic by construction; "two-pass-gdq": its dQ from the Gluon
    dQ kernel, kernels/gluon_dq.py, "two-pass" from the Triton one), "default" (what a non-deterministic
    call runs now), "deterministic" (what a deterministic call runs now: the pair at d=128 and 256, the
    Triton kernels at d=64) and "triton-det" (the Triton kernels' deterministic backward).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

# (batch, seqlen_q, seqlen_k, heads, heads_k)
SHAPES = [(2, 1000, 1000, 4, 4), (1, 777, 1500, 4, 2), (2, 1500, 700, 4, 1), (1, 64, 200, 2, 2), (1, 257, 129, 2, 1)]


def run(dout, q, k, v, out, lse, causal, deterministic, two_pass_dims=None, grads=None, gluon_dq=None):
    """kernels/backward.backward as the backend calls it, with gluon_backward.TWO_PASS_HEAD_DIMS set to
    two_pass_dims for the call (None: as it is; (): no two passes anywhere, so not deterministic means the
    Gluon kernel with its own dQ). grads: (dq, dk, dv, softmax_d) to fill (default: new, NaN-poisoned).
    gluon_dq: the second pass from the Gluon dQ kernel (True) or the Triton one (False) at q's head dim
    (None: gluon_backward.GLUON_DQ as it is)."""
    import torch

    import pyflash.kernels.backward as kernels_backward
    from pyflash.kernels import gluon_backward as gb
    from pyflash.kernels.backward import backward
    from pyflash.params import AttentionParams, Seqlens

    params = AttentionParams(q.shape[-1] ** -0.5, -1, 0 if causal else -1)
    seqlens = Seqlens(q.shape[0], q.shape[1], k.shape[1])
    if grads is None:
        grads = (*(torch.full_like(t, float("nan")) for t in (q, k, v)), torch.full_like(lse, float("nan")))
    dq, dk, dv, softmax_d = grads
    saved, saved_gluon = (gb.TWO_PASS_HEAD_DIMS, gb.DETERMINISTIC_TWO_PASS_HEAD_DIMS), kernels_backward.GLUON_HEAD_DIMS
    saved_dq = gb.GLUON_DQ
    if gluon_dq is not None:
        gb.GLUON_DQ = (q.shape[-1], ) if gluon_dq else ()
    if two_pass_dims is not None:
        gb.TWO_PASS_HEAD_DIMS = gb.DETERMINISTIC_TWO_PASS_HEAD_DIMS = tuple(two_pass_dims)
        # d=64 runs the Triton kernels by default: the Gluon kernel (one pass or two) only when asked for.
        kernels_backward.GLUON_HEAD_DIMS = saved_gluon | {q.shape[-1]}
    try:
        backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, deterministic)
    finally:
        (gb.TWO_PASS_HEAD_DIMS, gb.DETERMINISTIC_TWO_PASS_HEAD_DIMS), kernels_backward.GLUON_HEAD_DIMS = saved, saved_gluon
        gb.GLUON_DQ = saved_dq
    return dq, dk, dv, softmax_d


def check(spec, causal, dtype_name, deterministic, head_dim, gluon_dq=None):
    import torch

    from gluon_backward_check import check_inputs

    q, k, v, dout, out, lse, ref, low = check_inputs((*spec, head_dim), causal, dtype_name, seed=1)
    dims = (head_dim, )
    first = run(dout, q, k, v, out, lse, causal, deterministic, dims, gluon_dq=gluon_dq)
    torch.cuda.synchronize()
    ok, parts = True, []
    for name, ours, theirs, exact in zip(("dq", "dk", "dv"), first, low, ref):
        err = (ours.double() - exact).abs().max().item()
        pt_err = (theirs.double() - exact).abs().max().item()
        good = bool(torch.isfinite(ours).all().item()) and err <= 2 * pt_err + 1e-3
        ok &= good
        parts.append(f"{name} {err:.2e}/{pt_err:.2e}{'' if good else ' BAD'}")
    delta = (out.double() * dout.double()).sum(-1).transpose(1, 2)
    d_err = (first[3].double() - delta).abs().max().item()
    good = bool(torch.isfinite(first[3]).all().item()) and d_err <= 1e-3 * max(1.0, delta.abs().max().item())
    ok &= good
    parts.append(f"softmax_d {d_err:.1e}{'' if good else ' BAD'}")
    if deterministic:
        same = all(all(torch.equal(a, b) for a, b in zip(first, run(dout, q, k, v, out, lse, causal, True, dims,
                                                                            gluon_dq=gluon_dq)))
                   for _ in range(2))
        ok &= same
        parts.append("bitwise repeat " + ("yes" if same else "NO"))
    print(f"CHECK {'PASS' if ok else 'FAIL'} {dtype_name} d={head_dim} {spec} causal={int(causal)} "
          f"det={int(deterministic)}: "
          + ", ".join(parts), flush=True)
    return ok


def bench(seqlen, causal, dtype_name, head_dim, profile=False):
    import triton.testing

    from gluon_backward_check import bench_inputs

    import torch

    flops, q, k, v, dout, out, lse, _ = bench_inputs(seqlen, head_dim, causal, dtype_name)
    grads = (*(torch.empty_like(t) for t in (q, k, v)), torch.empty_like(lse))
    times = {}
    for name, kwargs in (("one-pass", dict(deterministic=False, two_pass_dims=())),
                         ("two-pass", dict(deterministic=True, two_pass_dims=(head_dim, ), gluon_dq=False)),
                         ("two-pass-gdq", dict(deterministic=True, two_pass_dims=(head_dim, ), gluon_dq=True)),
                         ("default", dict(deterministic=False)), ("deterministic", dict(deterministic=True)),
                         ("triton-det", dict(deterministic=True, two_pass_dims=()))):
        times[name] = triton.testing.do_bench(lambda: run(dout, q, k, v, out, lse, causal, grads=grads, **kwargs),  # noqa: B023
                                              warmup=25, rep=100, return_mode="median")
    cells = "  ".join(f"{name} {ms:7.3f} ms {flops / ms * 1e-9:6.1f} TFLOP/s" for name, ms in times.items())
    det = times["default"] / times["deterministic"]
    pair = times["one-pass"] / times["two-pass"]
    print(f"BENCH {dtype_name} d={head_dim} s={seqlen} causal={int(causal)}  {cells}  deterministic/default "
          f"{det:.2f}x  one-pass/two-pass time {pair:.2f}x", flush=True)
    if profile:
        for name, kwargs in (("default", dict(deterministic=False)),
                             ("two-pass-gdq", dict(deterministic=True, two_pass_dims=(head_dim, ), gluon_dq=True))):
            profile_kernels(f"{dtype_name} d={head_dim} s={seqlen} causal={int(causal)} {name}",
                            lambda: run(dout, q, k, v, out, lse, causal, grads=grads, **kwargs))  # noqa: B023


def kernel_times(fn, reps=5):
    """[(ms per call, name)] of the kernels fn launches, longest first (torch.profiler over reps calls)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sorted(((event.device_time_total / reps / 1e3, event.key) for event in prof.key_averages()
                   if event.count >= reps and event.device_time_total > 0), reverse=True)


def profile_kernels(label, fn, reps=5):
    """Each kernel's device time per call of fn, printed."""
    for ms, name in kernel_times(fn, reps):
        print(f"KERNEL {label} {ms:8.3f} ms  {name[:60]}", flush=True)


def dq_sweep(seqlen, causal, dtype_name, configs, head_dim):
    """The dQ pass alone (kernels/backward.backward(dq_only=True, delta_ready=True)) with each
    "block_m,block_n,warps,stages" of the Triton dQ kernel, and the default pair's kernels one by one."""
    import torch
    import triton.testing

    from gluon_backward_check import bench_inputs
    from pyflash.kernels.backward import BackwardConfig, backward, backward_config
    from pyflash.params import AttentionParams, Seqlens

    flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, head_dim, causal, dtype_name)
    params, seqlens = AttentionParams(scale, -1, 0 if causal else -1), Seqlens(q.shape[0], seqlen, seqlen)
    grads = (*(torch.empty_like(t) for t in (q, k, v)), torch.empty_like(lse))
    dims = (head_dim, )
    run(dout, q, k, v, out, lse, causal, True, dims, grads=grads)  # softmax_d for delta_ready
    reference = grads[0].clone()
    table = backward_config(q, head_dim, causal)
    for text in configs:
        cfg = BackwardConfig(table.dkdv, tuple(int(x) for x in text.split(",")), False, table.tma)
        try:
            fn = lambda: backward(dout, q, k, v, out, lse, *grads, params, seqlens, True,  # noqa: E731
                                  config=cfg, dq_only=True, delta_ready=True)
            fn()
            torch.cuda.synchronize()
            same = torch.equal(grads[0], reference)
            diff = (grads[0].float() - reference.float()).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"DQ {dtype_name} s={seqlen} causal={int(causal)} dq={text:12s} {ms:7.3f} ms "
                  f"(dq max|diff| vs default {diff:.1e}{', same bits' if same else ''})", flush=True)
        except Exception as error:  # noqa: BLE001 - a config that does not fit must not hide the others
            print(f"DQ {dtype_name} s={seqlen} causal={int(causal)} dq={text:12s} ERROR {type(error).__name__}: "
                  f"{str(error).strip().splitlines()[0][:200]}", flush=True)
    profile_kernels(f"{dtype_name} s={seqlen} causal={int(causal)} deterministic",
                    lambda: run(dout, q, k, v, out, lse, causal, True, dims, grads=grads))


def first_sweep(seqlen, causal, dtype_name, configs, head_dim):
    """The first pass alone (the Gluon kernel without dQ: gluon_backward.two_pass_config) with each
    "field=value,..." override of that Config (e.g. num_stages=3 or num_stages=3,lpt=1), against the
    default; dK and dV must keep the default's bits (the overrides change no arithmetic order)."""
    import torch
    import triton.testing

    from gluon_backward_check import bench_inputs
    from pyflash.kernels import gluon_backward as gb

    flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, head_dim, causal, dtype_name)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    softmax_d = torch.empty_like(lse)
    base = gb.two_pass_config(head_dim, causal)
    reference = None
    for text in ["default", *configs]:
        fields = {} if text == "default" else _fields(text)
        try:
            cfg = base._replace(**fields)

            def fn(cfg=cfg):
                gb.backward_gluon(dout, q, k, v, out, lse, scale, causal, dq=dq, dk=dk, dv=dv, softmax_d=softmax_d,
                                  config=cfg)

            dk.fill_(float("nan"))
            dv.fill_(float("nan"))
            fn()
            torch.cuda.synchronize()
            if reference is None:
                reference = (dk.clone(), dv.clone())
            same = torch.equal(dk, reference[0]) and torch.equal(dv, reference[1])
            finite = bool(torch.isfinite(dk).all().item() and torch.isfinite(dv).all().item())
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            # The first pass does 4 of the backward's 5 GEMMs (dQ's is the second pass's).
            print(f"FIRST {dtype_name} d={head_dim} s={seqlen} causal={int(causal)} {text:24s} {ms:7.3f} ms "
                  f"{0.8 * flops / ms * 1e-9:6.1f} TFLOP/s (dk, dv {'same bits as the default' if same else 'DIFFER'}"
                  f"{'' if finite else ', NOT FINITE'})", flush=True)
        except Exception as error:  # noqa: BLE001 - a config that does not fit must not hide the others
            print(f"FIRST {dtype_name} d={head_dim} s={seqlen} causal={int(causal)} {text:24s} ERROR "
                  f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}", flush=True)


def _fields(text):
    """"field=value,..." -> {field: int(value)}."""
    return {name: int(value) for name, value in (item.split("=") for item in text.split(","))}


def main():
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["check", "bench"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--dq-configs", nargs="+", default=[],
                        help="instead: time the dQ pass alone with these block_m,block_n,warps,stages")
    parser.add_argument("--first-configs", nargs="+", default=[],
                        help="instead: time the first pass alone with these overrides of two_pass_config "
                             "(field=value,...; e.g. num_stages=3)")
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--head-dim", type=int, default=256, choices=[64, 128, 256])
    parser.add_argument("--gluon-dq", type=int, choices=[0, 1],
                        help="check: the two passes' dQ from the Gluon (1) or Triton (0) dQ kernel (default: as "
                             "gluon_backward.GLUON_DQ has it)")
    parser.add_argument("--profile", action="store_true", help="bench: each kernel's time in the default and "
                                                                "two-pass-gdq backward (torch.profiler)")
    parser.add_argument("--override", help="check / bench with these overrides of two_pass_config (field=value,...)")
    args = parser.parse_args()
    if args.override:
        from pyflash.kernels import gluon_backward as gb

        fields = _fields(args.override)
        base_config = gb.two_pass_config
        gb.two_pass_config = lambda head_dim, causal: base_config(head_dim, causal)._replace(**fields)
    # A sweep of one pass alone instead of the checks and the bench.
    sweep, configs = (first_sweep, args.first_configs) if args.first_configs else (dq_sweep, args.dq_configs)
    if configs:
        for dtype_name in args.dtypes:
            for causal in map(bool, args.causal):
                for seqlen in args.seqlens:
                    sweep(seqlen, causal, dtype_name, configs, args.head_dim)
        return 0
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    failures = 0
    if args.only != "bench":
        for dtype_name in args.dtypes:
            for causal in (False, True):
                for deterministic in (False, True):
                    for spec in SHAPES:
                        failures += not check(spec, causal, dtype_name, deterministic, args.head_dim,
                                              args.gluon_dq)
        print(f"CHECKS: {failures} failed", flush=True)
    if args.only != "check":
        for dtype_name in args.dtypes:
            for causal in map(bool, args.causal):
                for seqlen in args.seqlens:
                    bench(seqlen, causal, dtype_name, args.head_dim, args.profile)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
