"""Correctness and speed of the Gluon FlashAttention-3-style forward on an H100, hang-proof.

    PYTHONPATH=src python3 scripts/gluon_check.py --quick               # ~4 min: every feature once per head dim
    PYTHONPATH=src python3 scripts/gluon_check.py --sweep               # rank the tuning candidates (s=4096)
    PYTHONPATH=src python3 scripts/gluon_check.py --only check          # every correctness case (~8-10 min)
    PYTHONPATH=src python3 scripts/gluon_check.py --only bench          # seqlens 1k / 4k / 16k
    PYTHONPATH=src python3 scripts/gluon_check.py --sweep --seqlens 512 1024 --head-dims 64 128 --candidates '*-ps'
                                            # default_config vs the matching candidates at short seqlens
    PYTHONPATH=src python3 scripts/gluon_check.py --only check --candidates bn128-st2-wg2-ps --head-dims 128
                                            # every correctness case for those candidates (no bench)

--candidates PATTERN...: tuning candidates (gluon_forward.tuning_candidates) whose label
(gluon_forward.config_label: bn128-st2-wg2[-nopp][-ps][-tr]) matches a shell pattern; with --only check every
case (plain / causal shapes, every feature, many tiles per persistent CTA) runs for each of them instead
of the default config. --cudagraph times CUDA-graph replays (triton.testing.do_bench_cudagraph);
--causal 1 (or 0) keeps only the benchmarks of that setting.

Every group of kernel launches (one config's correctness shapes, or one benchmark shape) runs in a
child process under a watchdog (--timeout, 60 s): a hang in warp-specialized code (it happened with
Triton's automatic warp specialization on this GPU) kills that child only, is reported as HANG and
the script goes on. A global budget (--budget, 540 s) skips what would not fit the 10-minute call.

(a) correctness: out is poisoned with NaN (lse too) before the call; max |error| against a float64
    reference next to the error of PyTorch's own math in the input dtype (flash_attn's rule:
    ours <= 2 * theirs + 1e-3), lse (natural log) against float64 within 2e-3, +inf exactly for rows
    that see no key; strided out / lse must leave the buffer around them untouched (NaN).
    Features: GQA/MQA, seqlen_q != seqlen_k both ways, windows (left, right, both, causal), softcap,
    ALiBi ((h) and (b, h) slopes), strided out / lse, packed q/k/v, every tuning candidate.
    PASS/FAIL per case.
(b) speed: batch * seqlen = 16384, heads * head_dim = 2048, triton.testing.do_bench median, TFLOP/s
    = 4 * b * h * s^2 * d (halved if causal), next to SDPA's cuDNN backend and pyflash's Triton forward.
Lines are also appended as JSON to $OUT/gluon_check.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import sys
import time
import traceback

import child_jobs
from child_jobs import run_child

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
DTYPE_NAMES = ("bf16", "fp16")
COUNTS = {"PASS": 0, "FAIL": 0}


def log_json(record):
    child_jobs.log_json("gluon_check.jsonl", record)


# ----------------------------------------------------------------------------------------------
# Child side: runs one job (a JSON object on the command line) and prints one line per case.
# ----------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def attention_reference(q, k, v, scale, dtype, window=(-1, -1), softcap=0.0, alibi=None):
    """(out (b, sq, h, d), lse (b, h, sq)) with every op in ``dtype`` (float64: the reference; the
    input dtype: PyTorch's own low-precision math, as flash_attn's attention_ref(upcast=False)).
    The rules of SPEC.md: GQA (query head i reads kv head i // (h // hk)), bottom-right aligned
    window (query i sees key j iff i + sk - sq - left <= j <= i + sk - sq + right, -1 unbounded),
    softcap before the ALiBi bias -slope * |i + sk - sq - j|; a row that sees no key: out 0, lse +inf."""
    import torch

    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qh = q.to(dtype).transpose(1, 2)  # (b, h, sq, d)
    kh, vh = (t.to(dtype).repeat_interleave(h // hk, dim=2).transpose(1, 2) for t in (k, v))
    scores = torch.matmul(qh * scale, kh.transpose(-1, -2))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diag = i + sk - sq
    if alibi is not None:
        slopes = alibi.to(torch.float64).expand(b, h) if alibi.dim() == 2 else alibi.to(torch.float64)[None].expand(b, h)
        bias = -slopes[:, :, None, None] * (diag - j).abs().to(torch.float64)
        scores = scores + bias.to(dtype)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if window[0] >= 0:
        visible &= j >= diag - window[0]
    if window[1] >= 0:
        visible &= j <= diag + window[1]
    scores = scores.masked_fill(~visible, float("-inf"))
    acc = scores.float() if dtype != torch.float64 else scores
    lse = torch.logsumexp(acc, dim=-1)
    probs = torch.softmax(acc, dim=-1)
    empty = ~visible.any(dim=-1)  # (sq,)
    probs = probs.masked_fill(empty[:, None], 0.0).to(dtype)
    lse = lse.masked_fill(empty, float("inf"))
    return torch.matmul(probs, vh).transpose(1, 2), lse


def make_inputs(case, dtype, gen):
    """q (b, sq, h, d), k, v (b, sk, hk, d); case["layout"]: "contiguous" or "packed" (q, k, v slices of
    one (b, s, 3, h, d) tensor when sq == sk and h == hk, else of a kv-packed (b, sk, 2, hk, d) one)."""
    import torch

    b, sq, h, d = case["shape"]
    sk, hk = case.get("sk", sq), case.get("hk", h)
    if case.get("layout") == "packed":
        if sq == sk and h == hk:
            qkv = torch.randn(b, sq, 3, h, d, generator=gen, device="cuda", dtype=dtype)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = torch.randn(b, sq, h, d, generator=gen, device="cuda", dtype=dtype)
        kv = torch.randn(b, sk, 2, hk, d, generator=gen, device="cuda", dtype=dtype)
        return q, kv[:, :, 0], kv[:, :, 1]
    return (torch.randn(b, sq, h, d, generator=gen, device="cuda", dtype=dtype),
            *(torch.randn(b, sk, hk, d, generator=gen, device="cuda", dtype=dtype) for _ in range(2)))


def check_case(case, dtype_name):
    import torch

    from pyflash.kernels.gluon_forward import forward_gluon

    b, sq, h, d = case["shape"]
    dtype = _torch_dtype(dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(case.get("seed", 0))
    q, k, v = make_inputs(case, dtype, gen)
    scale = d ** -0.5
    window = tuple(case.get("window", (-1, 0) if case.get("causal") else (-1, -1)))
    softcap = case.get("softcap", 0.0)
    alibi = None
    if case.get("alibi"):
        slopes = torch.rand(b if case["alibi"] == "bh" else 1, h, generator=gen, device="cuda") * 0.3 + 0.01
        alibi = slopes if case["alibi"] == "bh" else slopes[0]
    if case.get("strided_out"):
        # out a (b, sq, h, d) slice of a larger buffer (rows padded), lse a transposed (b, sq+pad, h)
        # buffer: everything outside the views must stay NaN.
        out_buf = torch.full((b, sq + 3, h * d + 64), float("nan"), device="cuda", dtype=dtype)
        out = out_buf[:, 1:sq + 1, :h * d].view(b, sq, h, d)
        lse_buf = torch.full((b, sq + 5, h), float("nan"), device="cuda", dtype=torch.float32)
        lse = lse_buf[:, 2:sq + 2].permute(0, 2, 1)
    else:
        out_buf = lse_buf = None
        out = torch.full((b, sq, h, d), float("nan"), device="cuda", dtype=dtype)
        lse = torch.full((b, h, sq), float("nan"), device="cuda", dtype=torch.float32)
    forward_gluon(q, k, v, scale, window_size=window, softcap=softcap, alibi_slopes=alibi, out=out, lse=lse,
                  **case.get("variant", {}))
    torch.cuda.synchronize()
    ref_out, ref_lse = attention_reference(q, k, v, scale, torch.float64, window, softcap, alibi)
    pt_out, _ = attention_reference(q, k, v, scale, dtype, window, softcap, alibi)
    err = (out.double() - ref_out).abs().max().item()
    pt_err = (pt_out.double() - ref_out).abs().max().item()
    inf_ref = torch.isinf(ref_lse)
    # Rows that see no key: lse must be +inf exactly; the others within 2e-3.
    lse_ok_inf = bool((torch.isinf(lse) & (lse > 0))[inf_ref].all().item()) if inf_ref.any() else True
    finite_rows = ~inf_ref
    lse_err = (lse.double() - ref_lse)[finite_rows].abs().max().item() if finite_rows.any() else 0.0
    finite = bool(torch.isfinite(out).all().item() and not torch.isnan(lse).any().item())
    untouched = True
    if out_buf is not None:
        mask = torch.ones(out_buf.shape, dtype=torch.bool, device="cuda")
        mask[:, 1:sq + 1, :h * d] = False
        lmask = torch.ones(lse_buf.shape, dtype=torch.bool, device="cuda")
        lmask[:, 2:sq + 2] = False
        untouched = bool(torch.isnan(out_buf[mask]).all().item() and torch.isnan(lse_buf[lmask]).all().item())
    ok = finite and untouched and lse_ok_inf and err <= 2 * pt_err + 1e-3 and lse_err <= 2e-3
    return dict(ok=ok, err=err, pt_err=pt_err, lse_err=lse_err, finite=finite, untouched=untouched,
                empty_rows=int(inf_ref.sum().item()), lse_inf_ok=lse_ok_inf)


def bench_case(seqlen, head_dim, causal, variants, cudagraph=False, with_triton=True):
    import torch
    import torch.nn.functional as F
    import triton

    batch, heads = 16384 // seqlen, 2048 // head_dim
    flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = head_dim ** -0.5
    results = {}

    def timed(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            if cudagraph:
                ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            else:
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            results[name] = dict(ms=ms, tflops=flops / ms * 1e-9)
        except Exception as error:  # noqa: BLE001 - one failing backend must not hide the others
            results[name] = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
            traceback.print_exc()

    from pyflash.kernels.gluon_forward import forward_gluon

    ours_out = {}
    for label, variant in variants:
        out_buf = torch.empty_like(q)
        lse_buf = torch.empty(batch, heads, seqlen, device="cuda", dtype=torch.float32)

        def run(variant=variant, label=label, out_buf=out_buf, lse_buf=lse_buf):
            ours_out[label] = forward_gluon(q, k, v, scale, causal, out=out_buf, lse=lse_buf, **variant)[0]
        timed(f"gluon{label}", run)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    cudnn_out = {}

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_out["o"] = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale)
    timed("cudnn", cudnn)

    from pyflash.kernels.forward import forward
    from pyflash.params import AttentionParams, Seqlens

    params = AttentionParams(scale, -1, 0 if causal else -1)
    seqlens = Seqlens(batch, seqlen, seqlen)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seqlen, device="cuda", dtype=torch.float32)
    import inspect

    # The plain Triton kernel (forward() itself may dispatch to the Gluon kernel now).
    extra = {"kernel": "triton"} if "kernel" in inspect.signature(forward).parameters else {}
    if with_triton:
        timed("pyflash-triton", lambda: forward(q, k, v, out, lse, None, params, seqlens, **extra))

    # Agreement with cuDNN at the benchmark shape (catches errors the small shapes miss).
    if "o" in cudnn_out:
        for label, o in ours_out.items():
            diff = (o.float() - cudnn_out["o"].transpose(1, 2).float()).abs().max().item()
            results[f"gluon{label}"]["max_diff_vs_cudnn"] = diff
            if diff > 0.02:
                results[f"gluon{label}"]["suspect"] = True
    return dict(batch=batch, heads=heads, results=results)


def case_name(case, dtype):
    b, sq, h, d = case["shape"]
    extras = {key: value for key, value in case.items() if key not in ("shape", "seed")}
    return f"check d={d} {dtype} q={tuple(case['shape'])} {json.dumps(extras, separators=(',', ':'))}"


def child(job):
    import torch

    print(f"[child] torch {torch.__version__}", flush=True)
    if job["kind"] == "check":
        for case in job["cases"]:
            name = case_name(case, job["dtype"])
            start = time.time()
            try:
                r = check_case(case, job["dtype"])
                print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: max err {r['err']:.2e} (torch {job['dtype']} "
                      f"{r['pt_err']:.2e}, bound {2 * r['pt_err'] + 1e-3:.2e}) lse err {r['lse_err']:.2e}"
                      f"{' empty rows %d' % r['empty_rows'] if r['empty_rows'] else ''}"
                      f"{'' if r['lse_inf_ok'] else ' LSE-NOT-INF'}{'' if r['finite'] else ' NON-FINITE'}"
                      f"{'' if r['untouched'] else ' WROTE-OUTSIDE'} [{time.time() - start:.1f}s]", flush=True)
                log_json(dict(name=name, **r))
            except Exception:  # noqa: BLE001 - report the case and go on
                print(f"FAIL {name}: exception", flush=True)
                traceback.print_exc()
                sys.stderr.flush()
                log_json(dict(name=name, ok=False, error=traceback.format_exc()))
    else:
        name = f"bench d={job['head_dim']} causal={int(job['causal'])} s={job['seqlen']}"
        r = bench_case(job["seqlen"], job["head_dim"], job["causal"], job["variants"], job.get("cudagraph", False),
                       job.get("with_triton", True))
        cells = []
        for key, value in r["results"].items():
            if "error" in value:
                cells.append(f"{key} ERROR({value['error']})")
            else:
                extra = f" |d|={value['max_diff_vs_cudnn']:.1e}" if "max_diff_vs_cudnn" in value else ""
                extra += " SUSPECT" if value.get("suspect") else ""
                cells.append(f"{key} {value['tflops']:6.1f}{extra}")
        print(f"BENCH {name} b={r['batch']} h={r['heads']} TFLOP/s: " + "  ".join(cells), flush=True)
        ranked = sorted(((value["tflops"], key) for key, value in r["results"].items()
                         if "tflops" in value and key.startswith("gluon") and not value.get("suspect")), reverse=True)
        if len(ranked) >= 2:
            ref = r["results"].get("cudnn", {}).get("tflops")
            print(f"RANK {name}: " + " > ".join(f"{key} {tf:.0f}" + (f" ({tf / ref:.2f}x cudnn)" if ref else "")
                                                  for tf, key in ranked), flush=True)
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
    print(f"== {label}: {status} [{elapsed:.0f}s]", flush=True)
    if status != "ok":
        log_json(dict(name=label, ok=False, status=status))
    return status


def _variant_label(cfg):
    from pyflash.kernels.gluon_forward import config_label

    return "-" + config_label(cfg)


def _variant(cfg):
    return dict(block_n=cfg.block_n, num_stages=cfg.num_stages, num_wg=cfg.num_wg, pingpong=cfg.pingpong,
                persistent=getattr(cfg, "persistent", False), trim=getattr(cfg, "trim", False))


def _candidates(head_dim, patterns):
    """tuning_candidates(head_dim) (patterns None) or those whose config_label matches a pattern."""
    from pyflash.kernels.gluon_forward import config_label, tuning_candidates

    found = tuning_candidates(head_dim)
    if patterns:
        found = [cfg for cfg in found if any(fnmatch.fnmatchcase(config_label(cfg), pat) for pat in patterns)]
    return found


def persistent_cases(head_dim):
    """More query tiles than an H100 has SMs (132): a persistent CTA runs several tiles of unequal key
    ranges (persistent launches: plain, causal, right windows; gluon_forward.persistent_launch), across sections of heads (K / V bytes per section: gluon_forward.L2_SECTION_BYTES) that
    do not divide batch * heads."""
    d = head_dim
    return [
        dict(shape=[3, 2048, 12, d], hk=4, causal=True),                     # 576+ tiles, partial section
        dict(shape=[4, 1000, 16, d]),                                        # 512+ tiles, ragged end
        dict(shape=[4, 1000, 16, d], sk=1777, hk=4, window=[-1, 30]),       # right window, GQA, sq < sk
        dict(shape=[8, 1000, 8, d], sk=300, causal=True),                    # empty rows in many tiles
        dict(shape=[8, 500, 8, d], sk=1500, window=[-1, 100], strided_out=True),
    ]


def feature_cases(head_dim, quick):
    """Cases for the features beyond plain/causal attention (bf16)."""
    d = head_dim
    cases = [
        dict(shape=[2, 1000, 8, d], hk=2, causal=True),                      # GQA
        dict(shape=[2, 1000, 3, d], sk=300, causal=True),                    # sq > sk: 700 rows see no key
        dict(shape=[2, 1000, 3, d], window=[100, 50], softcap=5.0),          # two-sided window + softcap
        dict(shape=[2, 1000, 3, d], sk=777, alibi="bh", causal=True),        # ALiBi (b, h), sq > sk
        dict(shape=[2, 1000, 4, d], hk=2, strided_out=True, layout="packed"),  # strided out/lse, kv-packed
        dict(shape=[1, 555, 4, d], sk=999, hk=2, window=[200, 30], softcap=8.0, alibi="h",
             strided_out=True),                                              # everything at once
    ]
    if not quick:
        cases += [
            dict(shape=[2, 300, 4, d], sk=1000, hk=1, causal=True),          # MQA, sq < sk
            dict(shape=[2, 777, 3, d], sk=1000, window=[256, 0]),            # sliding window, causal side
            dict(shape=[2, 1000, 3, d], sk=300),                             # sq > sk, not causal
            dict(shape=[1, 1, 4, d], sk=1000, hk=4, causal=True),            # decode-like
            dict(shape=[1, 1000, 2, d], sk=1, causal=True),                  # one key: rows < 999 empty
            dict(shape=[2, 1000, 3, d], window=[0, 0]),                      # diagonal only
            dict(shape=[2, 1000, 3, d], window=[300, -1]),                   # left only
            dict(shape=[2, 700, 3, d], sk=1000, window=[-1, 100]),           # right only
            dict(shape=[2, 1000, 3, d], sk=500, window=[10, 10]),            # windows that miss some tiles
            dict(shape=[2, 1000, 3, d], softcap=30.0, causal=True),
            dict(shape=[2, 1000, 3, d], alibi="h"),
            dict(shape=[2, 1000, 3, d], strided_out=True, layout="packed", causal=True),  # qkv-packed
            dict(shape=[3, 1, 2, d], sk=1),
        ]
    return cases


def build_jobs(quick, sweep=False, seqlens=None, patterns=None, cudagraph=False):
    from pyflash.kernels.gluon_forward import tuning_candidates

    jobs = []
    head_dims = (64, 128, 256)
    if not sweep and patterns:
        # Every correctness case for each matching candidate (one job per candidate).
        for head_dim in head_dims:
            for cfg in _candidates(head_dim, patterns):
                cases = []
                for causal in (False, True):
                    cases += [dict(shape=shape, causal=causal, variant=_variant(cfg)) for shape in
                              ([2, 1000, 3, head_dim], [1, 128, 2, head_dim], [3, 77, 2, head_dim],
                               [1, 1, 1, head_dim], [1, 2048, 2, head_dim])]
                cases += [dict(case, variant=_variant(cfg)) for case in
                          feature_cases(head_dim, False) + persistent_cases(head_dim)]
                cases.append(dict(shape=[2, 1000, 3, head_dim], causal=True, variant=_variant(cfg), seed=1))
                jobs.append((f"check d={head_dim} bf16 {_variant_label(cfg)[1:]}",
                             dict(kind="check", dtype="bf16", cases=cases, timeout=30 + 12 * len(cases))))
                fp16 = [dict(shape=[2, 1000, 3, head_dim], causal=causal, variant=_variant(cfg)) for causal in (0, 1)]
                jobs.append((f"check d={head_dim} fp16 {_variant_label(cfg)[1:]}",
                             dict(kind="check", dtype="fp16", cases=fp16, timeout=30 + 12 * len(fp16))))
    elif not sweep and quick:
        for head_dim in head_dims:
            cases = [dict(shape=[2, 1000, 3, head_dim], causal=causal) for causal in (False, True)]
            cases += feature_cases(head_dim, True)
            jobs.append((f"check d={head_dim} bf16", dict(kind="check", dtype="bf16", cases=cases,
                                                         timeout=30 + 12 * len(cases))))
        cases = [dict(shape=[2, 1000, 3, d], causal=causal) for d in head_dims for causal in (False, True)]
        jobs.append(("check fp16", dict(kind="check", dtype="fp16", cases=cases, timeout=30 + 12 * len(cases))))
    elif not sweep:
        for head_dim, dtype in itertools.product(head_dims, DTYPE_NAMES):
            cases = []
            for causal in (False, True):
                cases += [dict(shape=shape, causal=causal) for shape in
                          ([2, 1000, 3, head_dim], [1, 128, 2, head_dim], [3, 77, 2, head_dim],
                           [1, 1, 1, head_dim], [1, 2048, 2, head_dim])]
            if dtype == "bf16":
                cases += feature_cases(head_dim, False)
                for cfg in tuning_candidates(head_dim):
                    cases.append(dict(shape=[2, 1000, 3, head_dim], causal=True, variant=_variant(cfg)))
                    cases.append(dict(shape=[2, 1000, 8, head_dim], hk=2, window=[300, 20], variant=_variant(cfg)))
            else:
                cases += feature_cases(head_dim, True)[:3]
            jobs.append((f"check d={head_dim} {dtype}", dict(kind="check", dtype=dtype, cases=cases,
                                                            timeout=30 + 12 * len(cases))))
    bench_seqlens = seqlens or ((4096, ) if quick or sweep else (1024, 4096, 16384))
    for head_dim, causal, seqlen in itertools.product(head_dims, (False, True), bench_seqlens):
        if head_dim == 256 and not sweep:
            continue
        variants = [("", {})]
        if sweep:
            variants += [(_variant_label(cfg), _variant(cfg)) for cfg in _candidates(head_dim, patterns)]
        elif not quick:
            variants.append(("-nopp", {"pingpong": False}))
            variants += [(_variant_label(cfg), _variant(cfg)) for cfg in _candidates(head_dim, patterns)] if patterns else []
        jobs.append((f"bench d={head_dim} causal={int(causal)} s={seqlen}",
                     dict(kind="bench", head_dim=head_dim, causal=causal, seqlen=seqlen, variants=variants,
                          cudagraph=cudagraph, with_triton=not sweep, timeout=40 + 12 * len(variants))))
    return jobs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one shape per config, one seqlen in the benchmark")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per child process (watchdog)")
    parser.add_argument("--budget", type=int, default=540, help="seconds for the whole run; later jobs are skipped")
    parser.add_argument("--only", choices=["check", "bench"], help="run only the correctness or the benchmark jobs")
    parser.add_argument("--head-dims", type=int, nargs="+", help="only the jobs of these head dims")
    parser.add_argument("--sweep", action="store_true",
                        help="benchmark only: every tuning candidate (gluon_forward.tuning_candidates) at s=4096")
    parser.add_argument("--seqlens", type=int, nargs="+", help="benchmark these seqlens (b * s = 16384)")
    parser.add_argument("--candidates", nargs="+", metavar="PATTERN",
                        help="only the tuning candidates whose config_label matches a shell pattern (sweep), or "
                             "every correctness case for them (--only check)")
    parser.add_argument("--cudagraph", action="store_true", help="time CUDA-graph replays (do_bench_cudagraph)")
    parser.add_argument("--causal", type=int, nargs="+", choices=[0, 1], help="only the benchmarks of these settings")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
    sys.path.insert(0, SRC)
    for label, job in build_jobs(args.quick, args.sweep, args.seqlens, args.candidates, args.cudagraph):
        head_dims = {case["shape"][3] for case in job.get("cases", [])} | {job.get("head_dim")}
        if args.head_dims and not head_dims & set(args.head_dims):
            continue
        if (args.only and job["kind"] != args.only) or (args.sweep and job["kind"] != "bench"):
            continue
        if args.causal and job["kind"] == "bench" and int(job["causal"]) not in args.causal:
            continue
        left = args.budget - (time.time() - start)
        if left < 15:
            print(f"== {label}: SKIPPED (budget of {args.budget} s spent)", flush=True)
            statuses[label] = "skipped"
            continue
        statuses[label] = run_job(job, min(max(args.timeout, job.get("timeout", 0)), int(left)), label)
    bad = {label: status for label, status in statuses.items() if status != "ok"}
    print(f"== done in {time.time() - start:.0f}s: cases PASS {COUNTS['PASS']} FAIL {COUNTS['FAIL']}; "
          f"{len(statuses) - len(bad)}/{len(statuses)} jobs ran to the end" + (f"; not ok: {bad}" if bad else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
