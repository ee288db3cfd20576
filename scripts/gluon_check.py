"""Correctness and speed of the Gluon FlashAttention-3-style forward on an H100, hang-proof.

    PYTHONPATH=src python3 scripts/gluon_check.py            # full: ~6-8 minutes on a fresh machine
    PYTHONPATH=src python3 scripts/gluon_check.py --quick    # one shape per config

Every group of kernel launches (one config's correctness shapes, or one benchmark shape) runs in a
child process under a watchdog (--timeout, 60 s): a hang in warp-specialized code (it happened with
Triton's automatic warp specialization on this GPU) kills that child only, is reported as HANG and
the script goes on. A global budget (--budget, 540 s) skips what would not fit the 10-minute call.

(a) correctness: out is poisoned with NaN (lse too) before the call; max |error| against a float64
    reference next to the error of PyTorch's own math in the input dtype (flash_attn's rule:
    ours <= 2 * theirs + 1e-3), lse (natural log) against float64 within 2e-3. PASS/FAIL per case.
(b) speed: batch * seqlen = 16384, heads * head_dim = 2048, triton.testing.do_bench median, TFLOP/s
    = 4 * b * h * s^2 * d (halved if causal), next to SDPA's cuDNN backend and pyflash's Triton forward.
Lines are also appended as JSON to $OUT/gluon_check.jsonl when OUT is set.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
DTYPE_NAMES = ("bf16", "fp16")
COUNTS = {"PASS": 0, "FAIL": 0}


def log_json(record):
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "gluon_check.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Child side: runs one job (a JSON object on the command line) and prints one line per case.
# ----------------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def attention_reference(q, k, v, scale, causal, dtype):
    """(out (b, s, h, d), lse (b, h, s)) with every op in ``dtype`` (float64: the reference; the
    input dtype: PyTorch's own low-precision math, as flash_attn's attention_ref(upcast=False))."""
    import torch

    qh, kh, vh = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
    scores = torch.matmul(qh * scale, kh.transpose(-1, -2))
    if causal:
        s_q, s_k = q.shape[1], k.shape[1]
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(s_k - s_q + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores.float() if dtype != torch.float64 else scores, dim=-1)
    probs = torch.softmax(scores.float() if dtype != torch.float64 else scores, dim=-1).to(dtype)
    return torch.matmul(probs, vh).transpose(1, 2), lse


def check_case(shape, causal, dtype_name, variant):
    import torch

    from pyflash.kernels.gluon_forward import forward_gluon

    batch, seqlen, heads, head_dim = shape
    dtype = _torch_dtype(dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, heads, seqlen), float("nan"), device="cuda", dtype=torch.float32)
    forward_gluon(q, k, v, scale, causal, out=out, lse=lse, **variant)
    torch.cuda.synchronize()
    ref_out, ref_lse = attention_reference(q, k, v, scale, causal, torch.float64)
    pt_out, _ = attention_reference(q, k, v, scale, causal, dtype)
    err = (out.double() - ref_out).abs().max().item()
    pt_err = (pt_out.double() - ref_out).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    finite = bool(torch.isfinite(out).all().item() and torch.isfinite(lse).all().item())
    ok = finite and err <= 2 * pt_err + 1e-3 and lse_err <= 2e-3
    return dict(ok=ok, err=err, pt_err=pt_err, lse_err=lse_err, finite=finite)


def bench_case(seqlen, head_dim, causal, variants):
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
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            results[name] = dict(ms=ms, tflops=flops / ms * 1e-9)
        except Exception as error:  # noqa: BLE001 - one failing backend must not hide the others
            results[name] = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
            traceback.print_exc()

    from pyflash.kernels.gluon_forward import forward_gluon

    ours_out = {}
    for label, variant in variants:
        def run(variant=variant, label=label):
            ours_out[label] = forward_gluon(q, k, v, scale, causal, **variant)[0]
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
    timed("pyflash", lambda: forward(q, k, v, out, lse, None, params, seqlens))

    # Agreement with cuDNN at the benchmark shape (catches errors the small shapes miss).
    if "o" in cudnn_out:
        for label, o in ours_out.items():
            results[f"gluon{label}"]["max_diff_vs_cudnn"] = (o.float() - cudnn_out["o"].transpose(1, 2).float()
                                                             ).abs().max().item()
    return dict(batch=batch, heads=heads, results=results)


def child(job):
    import torch

    print(f"[child] torch {torch.__version__}", flush=True)
    if job["kind"] == "check":
        for shape, variant in job["cases"]:
            name = (f"check d={shape[3]} causal={int(job['causal'])} {job['dtype']} shape={tuple(shape)}"
                    f"{' ' + json.dumps(variant) if variant else ''}")
            start = time.time()
            try:
                r = check_case(tuple(shape), job["causal"], job["dtype"], variant)
                print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: max err {r['err']:.2e} (torch {job['dtype']} "
                      f"{r['pt_err']:.2e}, bound {2 * r['pt_err'] + 1e-3:.2e}) lse err {r['lse_err']:.2e}"
                      f"{'' if r['finite'] else ' NON-FINITE'} [{time.time() - start:.1f}s]", flush=True)
                log_json(dict(name=name, **r))
            except Exception:  # noqa: BLE001 - report the case and go on
                print(f"FAIL {name}: exception", flush=True)
                traceback.print_exc()
                sys.stderr.flush()
                log_json(dict(name=name, ok=False, error=traceback.format_exc()))
    else:
        name = f"bench d={job['head_dim']} causal={int(job['causal'])} s={job['seqlen']}"
        r = bench_case(job["seqlen"], job["head_dim"], job["causal"], job["variants"])
        cells = []
        for key, value in r["results"].items():
            if "error" in value:
                cells.append(f"{key} ERROR({value['error']})")
            else:
                extra = f" |d|={value['max_diff_vs_cudnn']:.1e}" if "max_diff_vs_cudnn" in value else ""
                cells.append(f"{key} {value['tflops']:6.1f}{extra}")
        print(f"BENCH {name} b={r['batch']} h={r['heads']} TFLOP/s: " + "  ".join(cells), flush=True)
        log_json(dict(name=name, **r))


# ----------------------------------------------------------------------------------------------
# Parent side: builds the jobs, runs each in a child under the watchdog.
# ----------------------------------------------------------------------------------------------

def run_job(job, timeout, label):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH", "")]))
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        status = f"HANG (killed after {timeout} s)"
    output = output.decode() if isinstance(output, bytes) else (output or "")
    for line in output.splitlines():
        if not line.startswith("[child]"):
            print(f"  {line}")
        for tag in ("PASS", "FAIL"):
            if line.startswith(tag + " "):
                COUNTS[tag] += 1
    print(f"== {label}: {status} [{time.time() - start:.0f}s]", flush=True)
    if status != "ok":
        log_json(dict(name=label, ok=False, status=status))
    return status


def build_jobs(quick):
    jobs = []
    head_dims = (64, 128, 256)
    for head_dim, causal, dtype in itertools.product(head_dims, (False, True), DTYPE_NAMES):
        if quick:
            cases = [([2, 1000, 3, head_dim], {})]
        else:
            cases = [([2, 1000, 3, head_dim], {}), ([1, 128, 2, head_dim], {}), ([3, 77, 2, head_dim], {}),
                     ([1, 1, 1, head_dim], {}), ([1, 2048, 2, head_dim], {})]
            if dtype == "bf16":
                cases.append(([2, 1000, 3, head_dim], {"pingpong": False}))
                if head_dim == 128:
                    cases.append(([2, 1000, 3, head_dim], {"num_stages": 3}))
                    cases.append(([2, 1000, 3, head_dim], {"block_n": 64}))
        jobs.append((f"check d={head_dim} causal={int(causal)} {dtype}",
                     dict(kind="check", causal=causal, dtype=dtype, cases=cases)))
    for head_dim, causal, seqlen in itertools.product((64, 128), (False, True),
                                                      (4096, ) if quick else (1024, 4096, 16384)):
        variants = [("", {})]
        if not quick:
            variants.append(("-nopp", {"pingpong": False}))
            if head_dim == 128:
                variants.append(("-st3", {"num_stages": 3}))
        jobs.append((f"bench d={head_dim} causal={int(causal)} s={seqlen}",
                     dict(kind="bench", head_dim=head_dim, causal=causal, seqlen=seqlen, variants=variants)))
    return jobs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one shape per config, one seqlen in the benchmark")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per child process (watchdog)")
    parser.add_argument("--budget", type=int, default=540, help="seconds for the whole run; later jobs are skipped")
    parser.add_argument("--only", choices=["check", "bench"], help="run only the correctness or the benchmark jobs")
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
    for label, job in build_jobs(args.quick):
        if args.only and job["kind"] != args.only:
            continue
        left = args.budget - (time.time() - start)
        if left < 15:
            print(f"== {label}: SKIPPED (budget of {args.budget} s spent)", flush=True)
            statuses[label] = "skipped"
            continue
        statuses[label] = run_job(job, min(args.timeout, int(left)), label)
    bad = {label: status for label, status in statuses.items() if status != "ok"}
    print(f"== done in {time.time() - start:.0f}s: cases PASS {COUNTS['PASS']} FAIL {COUNTS['FAIL']}; "
          f"{len(statuses) - len(bad)}/{len(statuses)} jobs ran to the end" + (f"; not ok: {bad}" if bad else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
