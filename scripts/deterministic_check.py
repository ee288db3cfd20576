"""The deterministic Gluon backward (gluon_backward DETERMINISTIC modes) on an H100, hang-proof.

    PYTHONPATH=src python3 scripts/deterministic_check.py [--budget 300] [--only check|bench]

(a) correctness and repeatability, per shape (batch, seqlen_q, seqlen_k, heads, heads_k), d=128 bf16,
    causal and not: dq, dk, dv poisoned with NaN, against a float64 autograd reference with flash_attn's
    rule (ours <= 2 * PyTorch's own bf16 error + 1e-3), then two more runs on the same inputs must give
    the same bits (dq, dk, dv). Shapes cover both orders of deterministic_mode: mode 1 (every key block
    of a head resident: the rotated / descending order) and mode 2 (more key blocks than SMs: ascending),
    GQA / MQA, seqlen_q != seqlen_k both ways, ragged ends.
(b) speed at d=128, s=4096 (b=4, h=16), causal and not: the deterministic Gluon backward next to the
    non-deterministic one and the deterministic Triton kernels (the previous deterministic path),
    triton.testing.do_bench median, TFLOP/s = 10 * b * h * s^2 * d (halved if causal).

Every job runs in a child process under a watchdog (--timeout): a wrong turn order hangs (a warpgroup
spinning on a counter that never reaches its rank), kills that child only and is reported as HANG.
Lines are appended as JSON to $OUT/deterministic_check.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import child_jobs
from child_jobs import run_child

HEAD_DIM = 128
# (batch, seqlen_q, seqlen_k, heads, heads_k); the last two have more key blocks (133) than an H100's SMs.
SHAPES = [(2, 1000, 1000, 4, 4), (1, 777, 1500, 4, 2), (2, 1500, 700, 3, 1), (1, 4096, 4096, 4, 4),
          (1, 64, 200, 2, 2), (1, 300, 17000, 2, 1), (1, 17000, 17000, 1, 1)]


def check(spec, causal):
    import torch

    from pyflash.kernels import gluon_backward as gb
    from gluon_backward_check import reference_grads

    batch, seqlen_q, seqlen_k, heads, heads_k = spec
    gen = torch.Generator(device="cuda").manual_seed(seqlen_q + seqlen_k)
    q, dout = (torch.randn(batch, seqlen_q, heads, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(2))
    k, v = (torch.randn(batch, seqlen_k, heads_k, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    scale = HEAD_DIM ** -0.5
    ref_out, ref_lse, ref = reference_grads(q, k, v, dout, scale, causal, torch.float64)
    _, _, low = reference_grads(q, k, v, dout, scale, causal, torch.bfloat16)
    out, lse = ref_out.to(torch.bfloat16).contiguous(), ref_lse.float().contiguous()
    n_blocks = -(-seqlen_k // gb.BLOCK_N)
    result = dict(ok=True, mode=gb.deterministic_mode(n_blocks, q.device))
    runs = []
    for _ in range(3):
        grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
        gb.backward_gluon(dout, q, k, v, out, lse, scale, causal, dq=grads[0], dk=grads[1], dv=grads[2],
                          deterministic=True)
        torch.cuda.synchronize()
        runs.append(grads)
    for name, ours, theirs, exact in zip(("dq", "dk", "dv"), runs[0], low, ref):
        err = (ours.double() - exact).abs().max().item()
        pt_err = (theirs.double() - exact).abs().max().item()
        finite = bool(torch.isfinite(ours).all().item())
        result[name] = dict(err=err, pt_err=pt_err)
        result["ok"] &= finite and err <= 2 * pt_err + 1e-3
    result["repeatable"] = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    result["ok"] &= result["repeatable"]
    return result


def bench(causal):
    import torch
    import triton.testing

    from pyflash.kernels import backward as kb
    from pyflash.params import AttentionParams, Seqlens

    batch, seqlen, heads = 4, 4096, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(batch, seqlen, heads, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    import pyflash

    out, _, _, _, lse, _, _, _ = pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
    params = AttentionParams(HEAD_DIM ** -0.5, -1, 0 if causal else -1)
    seqlens = Seqlens(batch, seqlen, seqlen)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    softmax_d = torch.empty_like(lse)
    flops = 10 * batch * heads * seqlen * seqlen * HEAD_DIM / (2 if causal else 1)
    result = {}
    for label, deterministic, kernel in (("gluon", False, None), ("gluon-deterministic", True, None),
                                         ("triton-deterministic", True, "triton")):
        def run(deterministic=deterministic, kernel=kernel):
            kb.backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, deterministic,
                        kernel=kernel)
        run()
        ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        result[label] = dict(ms=ms, tflops=flops / ms / 1e9)
    result["deterministic_vs_not"] = result["gluon-deterministic"]["tflops"] / result["gluon"]["tflops"]
    return result


def child(job):
    try:
        if job["kind"] == "check":
            for spec in job["shapes"]:
                started = time.time()
                r = check(tuple(spec), job["causal"])
                cells = " ".join(f"{n} {r[n]['err']:.1e} (torch {r[n]['pt_err']:.1e})" for n in ("dq", "dk", "dv"))
                print(f"  {'PASS' if r['ok'] else 'FAIL'} check causal={job['causal']} {spec} mode {r['mode']}: "
                      f"{cells} repeatable {r['repeatable']} [{time.time() - started:.1f}s]", flush=True)
                print("JSON " + json.dumps(dict(job=job["kind"], causal=job["causal"], shape=spec, **r)), flush=True)
        else:
            r = bench(job["causal"])
            cells = "  ".join(f"{k} {v['tflops']:.1f}" for k, v in r.items() if isinstance(v, dict))
            print(f"  BENCH d=128 s=4096 causal={job['causal']} TFLOP/s: {cells}  "
                  f"deterministic / not {r['deterministic_vs_not']:.3f}", flush=True)
            print("JSON " + json.dumps(dict(job="bench", causal=job["causal"], **r)), flush=True)
    except Exception:  # noqa: BLE001 - report and fail the child
        traceback.print_exc()
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=int, default=120, help="seconds per child process (watchdog)")
    parser.add_argument("--budget", type=int, default=420, help="seconds for the whole run")
    parser.add_argument("--only", choices=["check", "bench"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    jobs = []
    for causal in (False, True):
        if args.only != "bench":
            jobs.append(dict(kind="check", causal=causal, shapes=SHAPES))
    for causal in (False, True):
        if args.only != "check":
            jobs.append(dict(kind="bench", causal=causal))
    started, bad = time.time(), 0
    for job in jobs:
        left = args.budget - (time.time() - started)
        label = f"{job['kind']} causal={job['causal']}"
        if left < 20:
            print(f"== {label}: SKIPPED (budget)", flush=True)
            bad += 1
            continue
        status, output, seconds = run_child(__file__, job, min(args.timeout, left))
        for line in output.splitlines():
            if line.startswith("JSON "):
                child_jobs.log_json("deterministic_check.jsonl", json.loads(line[5:]))
            else:
                print(line, flush=True)
        bad += status != "ok" or "FAIL" in output
        print(f"== {label}: {status} [{seconds:.0f}s]", flush=True)
    print(f"== done in {time.time() - started:.0f}s: {'ok' if not bad else f'{bad} job(s) not ok'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
