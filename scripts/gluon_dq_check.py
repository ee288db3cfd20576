"""The Gluon dQ kernel (kernels/gluon_dq.py) on an H100/H200: correctness, then speed against the Triton dQ pass.

    cd scripts; PYTHONPATH=../src python3 gluon_dq_check.py [--only check|bench|sweep] [--head-dims 128 256]
        [--timeout 90] [--budget 540]

Each job (a mode at one head dim, dtype and causal setting; a sweep candidate at one seqlen) runs in a child
process under a watchdog (child_jobs.run_child): a barrier mistake hangs rather than fails, and one hung
config must not eat the device call. Jobs past --budget seconds are skipped and reported.

(a) check: gluon_dq.dq_pass alone (dq poisoned with NaN, softmax_d = rowsum(dO * O) of the float64
    reference) over shapes with GQA / MQA, seqlen_q != seqlen_k both ways and ragged ends, bf16 and fp16,
    causal and not, head dims 64 / 128 / 256 (each config of --configs, default: default_config): dq against
    the float64 reference with flash_attn's rule (ours <= 2 * PyTorch's own low-precision error + 1e-3),
    twice (same bits); then the whole deterministic backward through kernels/backward.backward with
    gluon_backward.GLUON_DQ on (dq, dk, dv, softmax_d checked the same way).
(b) bench: BENCHMARK.md's shapes (batch * seqlen = 16384, heads * head_dim = 2048), triton.testing.do_bench
    median: the dQ pass alone, Triton (backward(dq_only=True, delta_ready=True)) against Gluon; then the
    deterministic backward with either dQ pass, and the default (non-deterministic) backward.
(c) sweep: the dQ pass alone for every gluon_dq.tuning_candidates config at the given seqlens.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

# (batch, seqlen_q, seqlen_k, heads, heads_k)
SHAPES = [(2, 1000, 1000, 4, 4), (1, 777, 1500, 4, 2), (2, 1500, 700, 4, 1), (1, 64, 200, 2, 2), (1, 257, 129, 2, 1),
          (1, 1, 300, 2, 2), (1, 130, 1, 2, 2)]


def _params(q, k, causal):
    from pyflash.params import AttentionParams, Seqlens

    return AttentionParams(q.shape[-1] ** -0.5, -1, 0 if causal else -1), Seqlens(q.shape[0], q.shape[1], k.shape[1])


def _full_backward(dout, q, k, v, out, lse, causal, deterministic, gluon_dq, grads=None):
    """kernels/backward.backward as the backend calls it, with the Gluon dQ kernel at every two-pass head
    dim (gluon_dq) or at none."""
    import torch

    from pyflash.kernels import gluon_backward as gb
    from pyflash.kernels.backward import backward

    params, seqlens = _params(q, k, causal)
    if grads is None:
        grads = (*(torch.full_like(t, float("nan")) for t in (q, k, v)), torch.full_like(lse, float("nan")))
    saved = gb.GLUON_DQ
    gb.GLUON_DQ = gb.GLUON_DQ_HEAD_DIMS if gluon_dq else ()
    try:
        backward(dout, q, k, v, out, lse, *grads, params, seqlens, deterministic)
    finally:
        gb.GLUON_DQ = saved
    return grads


def _rule(name, ours, theirs, exact):
    import torch

    err = (ours.double() - exact).abs().max().item()
    pt_err = (theirs.double() - exact).abs().max().item()
    good = bool(torch.isfinite(ours).all().item()) and err <= 2 * pt_err + 1e-3
    return good, f"{name} {err:.2e}/{pt_err:.2e}{'' if good else ' BAD'}"


def check(spec, causal, dtype_name, head_dim, config):
    import torch

    from gluon_backward_check import check_inputs
    from pyflash.kernels import gluon_dq

    q, k, v, dout, out, lse, ref, low = check_inputs((*spec, head_dim), causal, dtype_name, seed=2)
    params, _ = _params(q, k, causal)
    softmax_d = (out.double() * dout.double()).sum(-1).transpose(1, 2).float().contiguous()
    results = []
    for _ in range(2):
        dq = torch.full_like(q, float("nan"))
        gluon_dq.dq_pass(dout, q, k, v, lse, softmax_d, dq, params, config)
        torch.cuda.synchronize()
        results.append(dq)
    ok, text = _rule("dq", results[0], low[0], ref[0])
    same = torch.equal(results[0], results[1])
    label = gluon_dq.config_label(config) if config else "default"
    print(f"CHECK {'PASS' if ok and same else 'FAIL'} dq_pass {label} {dtype_name} d={head_dim} {spec} "
          f"causal={int(causal)}: {text}, repeat {'same' if same else 'DIFFERS'}", flush=True)
    return ok and same


def check_full(spec, causal, dtype_name, head_dim):
    import torch

    from gluon_backward_check import check_inputs

    q, k, v, dout, out, lse, ref, low = check_inputs((*spec, head_dim), causal, dtype_name, seed=3)
    first = _full_backward(dout, q, k, v, out, lse, causal, True, True)
    again = _full_backward(dout, q, k, v, out, lse, causal, True, True)
    torch.cuda.synchronize()
    ok, parts = True, []
    for name, ours, theirs, exact in zip(("dq", "dk", "dv"), first, low, ref):
        good, text = _rule(name, ours, theirs, exact)
        ok &= good
        parts.append(text)
    delta = (out.double() * dout.double()).sum(-1).transpose(1, 2)
    d_err = (first[3].double() - delta).abs().max().item()
    good = bool(torch.isfinite(first[3]).all().item()) and d_err <= 1e-3 * max(1.0, delta.abs().max().item())
    ok &= good
    same = all(torch.equal(a, b) for a, b in zip(first, again))
    ok &= same
    print(f"CHECK {'PASS' if ok else 'FAIL'} deterministic backward, Gluon dQ, {dtype_name} d={head_dim} {spec} "
          f"causal={int(causal)}: {', '.join(parts)}, softmax_d {d_err:.1e}, repeat {'same' if same else 'DIFFERS'}",
          flush=True)
    return ok


def _bench_setup(seqlen, head_dim, causal, dtype_name):
    import torch

    from gluon_backward_check import bench_inputs

    flops, q, k, v, dout, out, lse, _ = bench_inputs(seqlen, head_dim, causal, dtype_name)
    grads = (*(torch.empty_like(t) for t in (q, k, v)), torch.empty_like(lse))
    _full_backward(dout, q, k, v, out, lse, causal, True, False, grads=grads)  # softmax_d for the dQ passes
    return flops, q, k, v, dout, out, lse, grads


def bench(seqlen, causal, dtype_name, head_dim):
    import triton.testing

    from pyflash.kernels import gluon_dq
    from pyflash.kernels.backward import backward

    flops, q, k, v, dout, out, lse, grads = _bench_setup(seqlen, head_dim, causal, dtype_name)
    params, seqlens = _params(q, k, causal)
    dq, dk, dv, softmax_d = grads
    fns = {
        "dq-triton": lambda: backward(dout, q, k, v, out, lse, *grads, params, seqlens, True, kernel="triton",
                                      dq_only=True, delta_ready=True),
        "dq-gluon": lambda: gluon_dq.dq_pass(dout, q, k, v, lse, softmax_d, dq, params),
        "det-triton-dq": lambda: _full_backward(dout, q, k, v, out, lse, causal, True, False, grads=grads),
        "det-gluon-dq": lambda: _full_backward(dout, q, k, v, out, lse, causal, True, True, grads=grads),
        "default": lambda: _full_backward(dout, q, k, v, out, lse, causal, False, False, grads=grads),
        "default-gluon-dq": lambda: _full_backward(dout, q, k, v, out, lse, causal, False, True, grads=grads),
    }
    times = {name: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in fns.items()}
    cells = "  ".join(f"{name} {ms:7.3f}" for name, ms in times.items())
    print(f"BENCH {dtype_name} d={head_dim} s={seqlen} causal={int(causal)} ms: {cells}  | dq gluon/triton time "
          f"{times['dq-gluon'] / times['dq-triton']:.2f}x  det(gluon dq) {flops / times['det-gluon-dq'] * 1e-9:.0f} "
          f"TFLOP/s, default {flops / times['default'] * 1e-9:.0f}, det/default time "
          f"{times['det-gluon-dq'] / times['default']:.2f}x", flush=True)


def sweep(seqlen, causal, dtype_name, head_dim, label):
    """The dQ pass alone with the tuning candidate ``label``, against the Triton dQ pass's result."""
    import torch
    import triton.testing

    from pyflash.kernels import gluon_dq

    _, q, k, v, dout, out, lse, grads = _bench_setup(seqlen, head_dim, causal, dtype_name)
    params, _ = _params(q, k, causal)
    dq, _, _, softmax_d = grads
    reference = dq.clone()
    cfg = gluon_dq.tuning_candidates(head_dim)[label]
    fn = lambda: gluon_dq.dq_pass(dout, q, k, v, lse, softmax_d, dq, params, cfg)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    diff = (dq.float() - reference.float()).abs().max().item()
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    print(f"SWEEP {dtype_name} d={head_dim} s={seqlen} causal={int(causal)} {label:14s} {ms:7.3f} ms "
          f"(max|diff| vs Triton dQ {diff:.1e})", flush=True)


def child(job) -> int:
    """One job in this (child) process: its CHECK / BENCH / SWEEP lines; exit status 1 on a failed check."""
    import torch

    from pyflash.kernels import gluon_dq

    head_dim, dtype_name, causal = job["head_dim"], job["dtype"], bool(job["causal"])
    failures = 0
    if job["mode"] == "check":
        configs = [None, *(gluon_dq.Config(*fields) for fields in job["configs"])]
        for spec in SHAPES[:job["max_shapes"]]:
            for config in configs:
                failures += not check(spec, causal, dtype_name, head_dim, config)
        if head_dim in (128, 256):
            for spec in SHAPES[:min(3, job["max_shapes"])]:
                failures += not check_full(spec, causal, dtype_name, head_dim)
    elif job["mode"] == "bench":
        for seqlen in job["seqlens"]:
            bench(seqlen, causal, dtype_name, head_dim)
    else:
        sweep(job["seqlen"], causal, dtype_name, head_dim, job["label"])
    torch.cuda.synchronize()
    return 1 if failures else 0


def build_jobs(args):
    """[(label, job, timeout)]: one child process per (mode, head dim, dtype, causal), and per sweep candidate."""
    from pyflash.kernels import gluon_dq

    jobs = []
    for mode in ("check", "bench") if args.only is None else (args.only, ):
        for head_dim in args.head_dims:
            if mode == "bench" and head_dim == 64:
                continue  # no two-pass backward at d=64
            for dtype_name in args.dtypes:
                for causal in args.causal:
                    job = dict(mode=mode, head_dim=head_dim, dtype=dtype_name, causal=causal)
                    name = f"{mode} d={head_dim} {dtype_name} causal={causal}"
                    if mode == "check":
                        job.update(max_shapes=args.max_shapes,
                                   configs=[list(map(int, text.split(","))) for text in args.configs])
                        jobs.append((name, job, args.timeout))
                    elif mode == "bench":
                        jobs.append((name, dict(job, seqlens=args.seqlens), args.timeout * 2))
                    else:
                        for seqlen in args.seqlens:
                            for label in gluon_dq.tuning_candidates(head_dim):
                                jobs.append((f"{name} s={seqlen} {label}", dict(job, seqlen=seqlen, label=label),
                                             args.timeout))
    return jobs


def main():
    import json
    import time

    from child_jobs import run_child

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["check", "bench", "sweep"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-shapes", type=int, default=len(SHAPES), help="check only the first N shapes (a smoke run)")
    parser.add_argument("--configs", nargs="+", default=[],
                        help="check these block_n,stages[,num_wg[,pingpong]] configs too (default config always)")
    parser.add_argument("--timeout", type=int, default=90,
                        help="seconds per child process (bench: twice that); a barrier mistake hangs, not fails")
    parser.add_argument("--budget", type=int, default=540, help="seconds for the whole run; later jobs are skipped")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    start = time.time()
    counts = dict(PASS=0, FAIL=0)
    bad = {}
    for label, job, timeout in build_jobs(args):
        left = args.budget - (time.time() - start)
        if left < 15:
            print(f"== {label}: SKIPPED (budget of {args.budget} s spent)", flush=True)
            bad[label] = "skipped"
            continue
        status, output, elapsed = run_child(__file__, job, min(timeout, int(left)))
        for line in output.splitlines():
            print(f"  {line}", flush=True)
            for tag in counts:
                counts[tag] += line.startswith(f"CHECK {tag} ")
        print(f"== {label}: {status} [{elapsed:.0f}s]", flush=True)
        if status != "ok":
            bad[label] = status
    print(f"== done in {time.time() - start:.0f}s: CHECK PASS {counts['PASS']} FAIL {counts['FAIL']}; "
          f"jobs not ok: {len(bad)}" + (f" {bad}" if bad else ""), flush=True)
    return 1 if counts["FAIL"] or bad else 0


if __name__ == "__main__":
    sys.exit(main())
