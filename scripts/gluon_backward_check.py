"""Correctness and speed of the Gluon FlashAttention-3-style backward on an H100, hang-proof.

    PYTHONPATH=src python3 scripts/gluon_backward_check.py            # full (seqlens 1k/4k/16k)
    PYTHONPATH=src python3 scripts/gluon_backward_check.py --quick    # fewer shapes, s=4096 only
    PYTHONPATH=src python3 scripts/gluon_backward_check.py --sweep    # speed of tuning_candidates, s=4096
    PYTHONPATH=src python3 scripts/gluon_backward_check.py --sweep --candidates default,acc,acc-dq2
    PYTHONPATH=src python3 scripts/gluon_backward_check.py --sweep --candidates default,ps --seqlens 512,1024
    PYTHONPATH=src python3 scripts/gluon_backward_check.py --only check --candidates acc,acc-dq2  # their correctness
    PYTHONPATH=src python3 scripts/gluon_backward_check.py --sweep --causal 1 --candidates default,trim  # causal only

--sweep ends with a ranking per (head_dim, causal): every timed label by TFLOP/s, with its ratio to the
default config and to cuDNN. --only check --candidates X,Y checks just those candidates (one child per
candidate and (head_dim, causal): bf16 MHA / ragged / GQA / MQA / sq > sk shapes and the strided backend
contract), plus the default config's cases when 'default' is listed.

Every job (one config's correctness shapes, or one benchmark shape) runs in a child process under a
watchdog (--timeout, 60 s): a hang in warp-specialized code (mbarrier deadlock) kills that child only,
is reported as HANG and the script goes on. A global budget (--budget, 540 s) skips what would not
fit the 10-minute call.

(a) correctness: dq, dk, dv are poisoned with NaN before the call; max |error| of each against a
    float64 autograd reference next to the error of PyTorch's own autograd in the input dtype
    (flash_attn's rule: ours <= 2 * theirs + 1e-3). out and lse given to the kernel come from the
    float64 forward (out rounded to the input dtype, lse in fp32). PASS/FAIL per case.
(b) speed: batch * seqlen = 16384, heads * head_dim = 2048, bf16, triton.testing.do_bench median,
    TFLOP/s = 10 * b * h * s^2 * d (halved if causal), next to SDPA's cuDNN backward (autograd.grad of
    F.scaled_dot_product_attention under sdpa_kernel(CUDNN_ATTENTION)) and pyflash's Triton backward
    (pyflash.kernels.backward.backward). The max |difference| of our gradients from cuDNN's at the
    benchmark shape is printed too (catches errors the small shapes miss).
Lines are also appended as JSON to $OUT/gluon_backward_check.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
import traceback

import child_jobs
from child_jobs import run_child

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
DTYPE_NAMES = ("bf16", "fp16")
COUNTS = {"PASS": 0, "FAIL": 0}
SPEEDS = {}  # "d=.. causal=.. s=.." -> {label: TFLOP/s}, from the children's BENCH lines


def log_json(record):
    child_jobs.log_json("gluon_backward_check.jsonl", record)


# ----------------------------------------------------------------------------------------------
# Child side: runs one job (a JSON object on the command line) and prints one line per case.
# ----------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def attention_reference(q, k, v, scale, causal):
    """(out (b, sq, h, d), lse (b, h, sq)) in q's dtype (the softmax in fp32 for low precision, as
    flash_attn's attention_ref(upcast=False)); differentiable. k, v (b, sk, hk, d) with h % hk == 0
    (GQA: expanded here, so their gradients sum over the group); causal is bottom-right aligned; a row
    that sees no key gets output 0 and lse +inf (the backend contract)."""
    import torch

    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    scores = torch.matmul(qh * scale, kh.transpose(-1, -2))
    if causal:
        s_q, s_k = q.shape[1], k.shape[1]
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(s_k - s_q + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    wide = scores.float() if scores.dtype != torch.float64 else scores
    lse = torch.logsumexp(wide, dim=-1)
    empty = torch.isinf(lse)
    probs = torch.exp(wide - torch.where(empty, 0.0, lse)[..., None]).to(q.dtype)
    lse = torch.where(empty, float("inf"), lse)
    return torch.matmul(probs, vh).transpose(1, 2), lse


def reference_grads(q, k, v, dout, scale, causal, dtype):
    import torch

    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(qr, kr, vr, scale, causal)
    grads = torch.autograd.grad(out, (qr, kr, vr), dout.to(dtype))
    return out.detach(), lse.detach(), grads


def check_inputs(spec, causal, dtype_name, seed=0):
    """A correctness case's inputs on the GPU, spec (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim):
    (q, k, v, dout, out, lse, ref, low): out (in the input dtype) and lse (fp32) from the float64
    reference, ref its gradients, low PyTorch's own in the input dtype. Also scripts/two_pass_check.py's."""
    import torch

    batch, seqlen_q, seqlen_k, heads, heads_k, head_dim = spec
    dtype = _torch_dtype(dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, dout = (torch.randn(batch, seqlen_q, heads, head_dim, generator=gen, device="cuda", dtype=dtype)
               for _ in range(2))
    k, v = (torch.randn(batch, seqlen_k, heads_k, head_dim, generator=gen, device="cuda", dtype=dtype)
            for _ in range(2))
    ref_out, ref_lse, ref = reference_grads(q, k, v, dout, head_dim ** -0.5, causal, torch.float64)
    _, _, low = reference_grads(q, k, v, dout, head_dim ** -0.5, causal, dtype)
    return q, k, v, dout, ref_out.to(dtype).contiguous(), ref_lse.float().contiguous(), ref, low


def check_case(spec, causal, dtype_name, variant, strided=False):
    """spec (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim). strided: through the backend
    contract (gluon_backward.supported / backward) with dq, dk, dv, softmax_d non-contiguous views."""
    import torch

    from pyflash.kernels import gluon_backward as gb
    from pyflash.params import AttentionParams, Seqlens

    batch, seqlen_q, seqlen_k, heads, heads_k, head_dim = spec
    q, k, v, dout, out, lse, ref, low = check_inputs(spec, causal, dtype_name)
    scale = head_dim ** -0.5
    result = dict(ok=True, finite=True)
    if strided:
        def poisoned(t, pad):
            shape = list(t.shape)
            shape[-1 if pad == "d" else 2] += 8
            big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
            return big[..., :t.shape[-1]] if pad == "d" else big[:, :, :t.shape[2]]
        dq, dk, dv = poisoned(q, "d"), poisoned(k, "h"), poisoned(v, "d")
        softmax_d = torch.full((batch, heads, seqlen_q + 5), float("nan"), device="cuda")[..., :seqlen_q]
        params = AttentionParams(scale, -1, 0 if causal else -1)
        seqlens = Seqlens(batch, seqlen_q, seqlen_k)
        if not gb.supported(dout, q, k, v, out, lse, dq, dk, dv, params, seqlens, False):
            raise RuntimeError("supported() said no")
        result["deterministic_supported"] = gb.supported(dout, q, k, v, out, lse, dq, dk, dv, params, seqlens, True)
        result["ok"] &= result["deterministic_supported"]  # d=256: two passes (gb.two_pass)
        gb.backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens,
                    gb.Config(**variant) if variant else None)
        torch.cuda.synchronize()
        delta = (out.double() * dout.double()).sum(-1).transpose(1, 2)
        d_err = (softmax_d.double() - delta).abs().max().item()
        result["softmax_d"] = dict(err=d_err)
        result["ok"] &= bool(torch.isfinite(softmax_d).all().item()) and d_err <= 1e-3 * max(1.0, delta.abs().max().item())
    else:
        dq, dk, dv = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        gb.backward_gluon(dout, q, k, v, out, lse, scale, causal, dq=dq, dk=dk, dv=dv, **variant)
        torch.cuda.synchronize()
    for name, ours, theirs, exact in zip(("dq", "dk", "dv"), (dq, dk, dv), low, ref):
        err = (ours.double() - exact).abs().max().item()
        pt_err = (theirs.double() - exact).abs().max().item()
        finite = bool(torch.isfinite(ours).all().item())
        result[name] = dict(err=err, pt_err=pt_err)
        result["finite"] &= finite
        result["ok"] &= finite and err <= 2 * pt_err + 1e-3
    return result


def bench_inputs(seqlen, head_dim, causal, dtype_name="bf16"):
    """A benchmark shape's inputs (batch * seqlen = 16384, heads * head_dim = 2048, random normal on the
    GPU): (flops of the backward, q, k, v, dout, out, lse, scale), out and lse from PyTorch's
    FlashAttention forward (lse cut to seqlen). Also scripts/probe_backward256.py's."""
    import torch

    batch, heads = 16384 // seqlen, 2048 // head_dim
    flops = 10 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=_torch_dtype(dtype_name),
                                 generator=gen) for _ in range(4))
    scale = head_dim ** -0.5
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, seqlen, seqlen, 0.0, causal,
                                                           False, scale=scale)
    return flops, q, k, v, dout, out, lse[..., :seqlen].contiguous(), scale


def bench_case(seqlen, head_dim, causal, variants, baselines=True):
    import torch
    import torch.nn.functional as F
    import triton
    import triton.testing

    batch, heads = 16384 // seqlen, 2048 // head_dim
    flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, head_dim, causal)
    results = {}

    def timed(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            results[name] = dict(ms=ms, tflops=flops / ms * 1e-9)
        except Exception as error:  # noqa: BLE001 - one failing backend must not hide the others
            results[name] = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
            traceback.print_exc()

    from pyflash.kernels.gluon_backward import backward_gluon

    if not baselines and "" not in dict(variants):
        variants = [("", {})] + list(variants)  # the reference the candidates' gradients are compared to
    ours = {}
    for label, variant in variants:
        grads = tuple(torch.empty_like(q) for _ in range(3))
        accum = torch.empty(q.shape, dtype=torch.float32, device="cuda")

        def run(variant=variant, grads=grads, accum=accum):
            backward_gluon(dout, q, k, v, out, lse, scale, causal, dq=grads[0], dk=grads[1], dv=grads[2],
                           dq_accum=accum, **variant)
        timed(f"gluon{label}", run)
        ours[label] = grads

    if not baselines:
        base = ours.get("")
        for label, grads in ours.items():
            if label and base is not None and "error" not in results.get(f"gluon{label}", {}):
                results[f"gluon{label}"]["max_diff_vs_default"] = max(
                    (g.float() - b.float()).abs().max().item() for g, b in zip(grads, base))
        return dict(batch=batch, heads=heads, results=results)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    cudnn_grads = {}
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o_cudnn = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)

        def cudnn():
            cudnn_grads["g"] = torch.autograd.grad(o_cudnn, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True)
        timed("cudnn", cudnn)
    except Exception as error:  # noqa: BLE001
        results["cudnn"] = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")

    try:
        from pyflash.kernels.backward import backward
        from pyflash.params import AttentionParams, Seqlens

        params = AttentionParams(scale, -1, 0 if causal else -1)
        seqlens = Seqlens(batch, seqlen, seqlen)
        pdq, pdk, pdv = (torch.empty_like(q) for _ in range(3))
        softmax_d = torch.empty_like(lse)
        timed("pyflash", lambda: backward(dout, q, k, v, out, lse, pdq, pdk, pdv, softmax_d, params, seqlens,
                                          False))
    except Exception as error:  # noqa: BLE001
        results["pyflash"] = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")

    if "g" in cudnn_grads:
        for label, grads in ours.items():
            if "error" in results.get(f"gluon{label}", {}):
                continue
            diffs = [(g.float() - c.transpose(1, 2).float()).abs().max().item()
                     for g, c in zip(grads, cudnn_grads["g"])]
            results[f"gluon{label}"]["max_diff_vs_cudnn"] = max(diffs)
    return dict(batch=batch, heads=heads, results=results)


def child(job):
    import torch

    print(f"[child] torch {torch.__version__}", flush=True)
    if job["kind"] == "check":
        for spec, variant, strided in job["cases"]:
            name = (f"check d={spec[5]} causal={int(job['causal'])} {job['dtype']} (b,sq,sk,h,hk)={tuple(spec[:5])}"
                    f"{' contract/strided' if strided else ''}{' ' + json.dumps(variant) if variant else ''}")
            start = time.time()
            try:
                r = check_case(tuple(spec), job["causal"], job["dtype"], variant, strided)
                cells = " ".join(f"{g} {r[g]['err']:.2e}/{2 * r[g]['pt_err'] + 1e-3:.2e}" for g in ("dq", "dk", "dv"))
                if "softmax_d" in r:
                    cells += (f" softmax_d {r['softmax_d']['err']:.1e}"
                              f" deterministic-supported {r['deterministic_supported']}")
                print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: err/bound {cells}"
                      f"{'' if r['finite'] else ' NON-FINITE'} [{time.time() - start:.1f}s]", flush=True)
                log_json(dict(name=name, **r))
            except Exception:  # noqa: BLE001 - report the case and go on
                print(f"FAIL {name}: exception", flush=True)
                traceback.print_exc()
                sys.stderr.flush()
                log_json(dict(name=name, ok=False, error=traceback.format_exc()))
    else:
        name = f"bench d={job['head_dim']} causal={int(job['causal'])} s={job['seqlen']}"
        r = bench_case(job["seqlen"], job["head_dim"], job["causal"], job["variants"], job.get("baselines", True))
        cells = []
        for key, value in r["results"].items():
            if "error" in value:
                cells.append(f"{key} ERROR({value['error']})")
            else:
                extra = f" |d|={value['max_diff_vs_cudnn']:.1e}" if "max_diff_vs_cudnn" in value else ""
                extra += f" |d-default|={value['max_diff_vs_default']:.1e}" if "max_diff_vs_default" in value else ""
                cells.append(f"{key} {value['tflops']:6.1f}{extra}")
        print(f"BENCH {name} b={r['batch']} h={r['heads']} TFLOP/s: " + "  ".join(cells), flush=True)
        log_json(dict(name=name, **r))


# ----------------------------------------------------------------------------------------------
# Parent side: builds the jobs, runs each in a child under the watchdog.
# ----------------------------------------------------------------------------------------------

def run_job(job, timeout, label):
    status, output, elapsed = run_child(__file__, job, timeout)
    for line in output.splitlines():
        if not line.startswith("[child]"):
            print(f"  {line}")
        for tag in ("PASS", "FAIL"):
            if line.startswith(tag + " "):
                COUNTS[tag] += 1
        if line.startswith("BENCH ") and " TFLOP/s: " in line:
            head, cells = line.split(" TFLOP/s: ", 1)
            shape = " ".join(word for word in head.split()[1:] if word.split("=")[0] in ("d", "causal", "s"))
            speeds = SPEEDS.setdefault(shape, {})
            for key, value in re.findall(r"(?:^|\s)([A-Za-z][\w-]*)\s+(\d+\.\d+)(?=\s|$)", cells):
                # The default config is re-timed next to each chunk of candidates: gluon#2, gluon#3, ...
                entry, n = key, 1
                while entry in speeds:
                    n += 1
                    entry = f"{key}#{n}"
                speeds[entry] = float(value)
    print(f"== {label}: {status} [{elapsed:.0f}s]", flush=True)
    if status != "ok":
        log_json(dict(name=label, ok=False, status=status))
    return status


def sweep_variants(head_dim, causal, wanted=None):
    """[(label, Config fields)] of gluon_backward.tuning_candidates (each compiles without spills:
    scripts/gluon_backward_compile.py --sweep), filtered by the labels in wanted."""
    sys.path.insert(0, SRC)
    from pyflash.kernels import gluon_backward as gb

    return [(f"-{label}", cfg._asdict()) for label, cfg in gb.tuning_candidates(head_dim, causal).items()
            if wanted is None or label in wanted]


def print_ranking():
    """Per benchmark shape: every label timed (gluon = default config, gluon-X = candidate X, cudnn,
    pyflash = the Triton backward) by TFLOP/s, best first."""
    for shape, speeds in SPEEDS.items():
        base, cudnn = speeds.get("gluon"), speeds.get("cudnn")
        print(f"RANKING {shape}:", flush=True)
        for rank, (label, tflops) in enumerate(sorted(speeds.items(), key=lambda item: -item[1]), 1):
            ratios = "".join(f"  {tflops / ref:5.3f}x {name}" for name, ref in (("default", base), ("cudnn", cudnn))
                             if ref)
            print(f"  {rank:2d}. {label:24s} {tflops:6.1f}{ratios}", flush=True)
        log_json(dict(name=f"ranking {shape}", speeds=speeds))


CHECK_SHAPES = ([2, 1000, 1000, 3, 3], [1, 77, 77, 2, 2], [2, 300, 517, 4, 2], [1, 517, 300, 4, 1])


HEAD_DIMS = (64, 128)  # --head-dims
SWEEP_SEQLENS = (4096, )  # --seqlens (--sweep)


def candidate_check_jobs(wanted):
    """One check child per (head_dim, causal, candidate in wanted): bf16 shapes (MHA, ragged, GQA, MQA with
    sq > sk: rows that see no key under causal) and the strided backend contract (GQA, ragged)."""
    jobs = []
    for head_dim, causal in itertools.product(HEAD_DIMS, (False, True)):
        for label, variant in sweep_variants(head_dim, causal, wanted):
            cases = [(shape + [head_dim], variant, False) for shape in CHECK_SHAPES]
            cases.append(([2, 200, 333, 6, 3, head_dim], variant, True))
            jobs.append((f"check d={head_dim} causal={int(causal)} bf16 {label}",
                         dict(kind="check", causal=causal, dtype="bf16", cases=cases), 90))
    return jobs


def build_jobs(quick, sweep, wanted=None, chunk=3):
    jobs = []
    if wanted is not None and not sweep:
        # The listed candidates' correctness (and their speed at s=4096 if --only bench is not excluded:
        # use --sweep for that); the default config's own checks only when 'default' is listed.
        jobs += candidate_check_jobs(wanted)
        if "default" not in wanted:
            return jobs
    if sweep:
        # Speed only (SWEEP_SEQLENS): per (head_dim, causal, seqlen) one job with the default config, cuDNN and
        # the Triton backward, then the candidates a few per child (a hang loses only its chunk).
        for head_dim, causal, seqlen in itertools.product(HEAD_DIMS, (False, True), SWEEP_SEQLENS):
            tag = f"d={head_dim} causal={int(causal)} s={seqlen}"
            if wanted is None or "default" in wanted:
                jobs.append((f"bench {tag}", dict(kind="bench", head_dim=head_dim, causal=causal, seqlen=seqlen,
                                                  variants=[("", {})]), None))
            variants = sweep_variants(head_dim, causal, wanted)
            for i in range(0, len(variants), chunk):
                part = variants[i:i + chunk]
                jobs.append((f"bench {tag} {' '.join(label for label, _ in part)}",
                             dict(kind="bench", head_dim=head_dim, causal=causal, seqlen=seqlen, variants=part,
                                  baselines=False), 120))
        return jobs
    for head_dim, causal, dtype in itertools.product(HEAD_DIMS, (False, True), DTYPE_NAMES):
        d = head_dim
        cases = [([2, 1000, 1000, 3, 3, d], {}, False), ([1, 77, 77, 2, 2, d], {}, False),
                 ([1, 128, 128, 1, 1, d], {}, False),
                 # GQA / MQA, seqlen_q != seqlen_k (bottom-right causal; sq > sk leaves rows with no key),
                 # and the backend contract with strided outputs.
                 ([2, 300, 517, 4, 2, d], {}, False), ([1, 517, 300, 4, 1, d], {}, False),
                 ([2, 200, 333, 6, 3, d], {}, True)]
        if not quick:
            cases += [([1, 1, 1, 1, 1, d], {}, False), ([1, 300, 300, 2, 2, d], {}, False),
                      ([1, 1, 260, 2, 1, d], {}, False), ([1, 260, 1, 2, 2, d], {}, True)]
            if dtype == "bf16":
                cands = sweep_variants(head_dim, causal, wanted)
                cases += [([2, 1000, 1000, 3, 3, d], v, False) for _, v in cands]
                cases += [([2, 300, 517, 4, 2, d], v, True) for _, v in cands]
        jobs.append((f"check d={head_dim} causal={int(causal)} {dtype}",
                     dict(kind="check", causal=causal, dtype=dtype, cases=cases), None if quick else 200))
    for head_dim, causal, seqlen in itertools.product(HEAD_DIMS, (False, True),
                                                      (4096, ) if quick else (1024, 4096, 16384)):
        jobs.append((f"bench d={head_dim} causal={int(causal)} s={seqlen}",
                     dict(kind="bench", head_dim=head_dim, causal=causal, seqlen=seqlen, variants=[("", {})]), None))
    return jobs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="three shapes per config, one seqlen in the benchmark")
    parser.add_argument("--sweep", action="store_true",
                        help="speed only (at --seqlens): default config, cuDNN, Triton and "
                             "gluon_backward.tuning_candidates")
    parser.add_argument("--candidates", help="comma-separated candidate labels for --sweep ('default' for the "
                                             "default/cuDNN/Triton job), e.g. default,acc,acc-dq2")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per child process (watchdog)")
    parser.add_argument("--budget", type=int, default=540, help="seconds for the whole run; later jobs are skipped")
    parser.add_argument("--only", choices=["check", "bench"], help="run only the correctness or the benchmark jobs")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims (64, 128, 256)")
    parser.add_argument("--seqlens", default="4096", help="comma-separated seqlens of --sweep (default 4096)")
    parser.add_argument("--causal", help="comma-separated causal settings of the jobs (0, 1; default both)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global HEAD_DIMS, SWEEP_SEQLENS
    HEAD_DIMS = tuple(int(d) for d in args.head_dims.split(","))
    SWEEP_SEQLENS = tuple(int(s) for s in args.seqlens.split(","))
    if args.child:
        child(json.loads(args.child))
        return 0

    try:
        import torch
        import triton

        print(f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}, "
              f"device {torch.cuda.get_device_name()}", flush=True)
    except Exception as error:  # noqa: BLE001 - the children report the details
        print(f"no CUDA device? {type(error).__name__}: {error}", flush=True)
    start = time.time()
    statuses = {}
    wanted = set(args.candidates.split(",")) if args.candidates else None
    for label, job, job_timeout in build_jobs(args.quick, args.sweep, wanted):
        if args.only and job["kind"] != args.only:
            continue
        if args.causal and str(int(job["causal"])) not in args.causal.split(","):
            continue
        left = args.budget - (time.time() - start)
        if left < 15:
            print(f"== {label}: SKIPPED (budget of {args.budget} s spent)", flush=True)
            statuses[label] = "skipped"
            continue
        statuses[label] = run_job(job, min(job_timeout or args.timeout, int(left)), label)
    if SPEEDS:
        print_ranking()
    bad = {label: status for label, status in statuses.items() if status != "ok"}
    print(f"== done in {time.time() - start:.0f}s: cases PASS {COUNTS['PASS']} FAIL {COUNTS['FAIL']}; "
          f"{len(statuses) - len(bad)}/{len(statuses)} jobs ran to the end" + (f"; not ok: {bad}" if bad else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
