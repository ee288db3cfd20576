"""Backward speed on the GPU: sweep the launch configs of kernels/backward.py and compare with
SDPA's FLASH_ATTENTION and CUDNN_ATTENTION backends in the same run (BENCHMARK.md workload:
bf16, batch * seqlen = 16384, heads * head_dim = 2048).

    PYTHONPATH=src python3 scripts/tune_backward.py --sweep --head-dims 128 --seqlens 4096
    PYTHONPATH=src python3 scripts/tune_backward.py --head-dims 64 128 256 --seqlens 1024 4096 16384

Without --sweep the table's configs are timed. Rows go to stdout and, as JSON lines, to
$OUT/tune_backward.jsonl when OUT is set.

    PYTHONPATH=src python3 scripts/tune_backward.py --resources --head-dims 128
    PYTHONPATH=src python3 scripts/tune_backward.py --dropout 0.1 --sweep --head-dims 64 128 --seqlens 4096
                                    # with dropout: CANDIDATES_DROPOUT, for configs.BACKWARD_DROPOUT

needs no GPU: it compiles every candidate for sm_90 (as the benchmark call specialises it:
16-byte aligned pointers and strides, MHA, contiguous lse) and prints registers, spill stack and
shared memory, so that configs that spill can be dropped before a device run.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyflash.kernels.backward import BackwardConfig, backward, backward_config
from pyflash.params import AttentionParams, Seqlens

# (block_m, block_n, num_warps, num_stages) candidates per head dim: dK/dV kernel, dQ kernel.
CANDIDATES = {
    64: ([(64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
         [(128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)]),
    128: ([(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (32, 128, 8, 3),
           (64, 128, 4, 2)],
          [(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 128, 4, 2)]),
    256: ([(64, 64, 8, 2), (32, 64, 8, 3), (64, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 3), (64, 64, 8, 1),
           (128, 64, 8, 1)],
          [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 1), (32, 64, 4, 3)]),
}


# With dropout the mask tile's registers make BACKWARD's d=128 tiles spill 300-500 B on sm_90 (benchmark
# specialisation); these spill less (--resources --dropout 0.1 prints them).
CANDIDATES_DROPOUT = {
    64: ([(64, 32, 4, 3), (32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
         CANDIDATES[64][1]),
    128: ([(32, 128, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3)],
          CANDIDATES[128][1]),
    256: CANDIDATES[256],
}


def bench_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_case(head_dim, seqlen, causal, dtype=torch.bfloat16, dropout_p=0.0):
    batch, num_heads = 16384 // seqlen, 2048 // head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(batch, seqlen, num_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
                     for _ in range(4))
    scale = head_dim ** -0.5
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, None, None, seqlen, seqlen, 0.0, causal,
                                                           False, scale=scale)
    flops = 2.5 * 4 * batch * num_heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    return dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse, causal=causal, scale=scale, flops=flops,
                seqlens=Seqlens(batch, seqlen, seqlen), dropout_p=dropout_p)


def ours(case, config=None, deterministic=False, use_tma=None):
    q, k, v = case["q"], case["k"], case["v"]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    softmax_d = torch.empty_like(case["lse"])
    params = AttentionParams(case["scale"], -1, 0 if case["causal"] else -1, dropout_p=case["dropout_p"],
                             philox_seed=1, philox_offset=0)
    return lambda: backward(case["dout"], q, k, v, case["out"], case["lse"], dq, dk, dv, softmax_d, params,
                            case["seqlens"], deterministic, config=config, use_tma=use_tma)


def sdpa(case, backend):
    q, k, v = (case[n].transpose(1, 2).detach().requires_grad_() for n in ("q", "k", "v"))
    dout = case["dout"].transpose(1, 2)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=case["causal"], scale=case["scale"],
                                             dropout_p=case["dropout_p"])
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def timed(case, fn_factory, label, log):
    try:
        ms = bench_ms(fn_factory())
    except Exception as exc:  # a config that does not compile (shared memory) or a peer without the case
        print(f"  {label}: failed ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
        return None
    tflops = case["flops"] / ms * 1e-9
    print(f"  {label}: {ms:.3f} ms {tflops:.0f} TFLOP/s", flush=True)
    log(dict(label=label, ms=ms, tflops=tflops))
    return ms


def sweep(case, log):
    """dK/dV configs with a fixed dQ config, then dQ configs with the best dK/dV, then atomic dQ
    with the two best dK/dV configs."""
    dropout = case["dropout_p"] > 0
    base = backward_config(case["q"], case["q"].shape[-1], case["causal"], dropout)
    dkdv_candidates, dq_candidates = (CANDIDATES_DROPOUT if dropout else CANDIDATES)[case["q"].shape[-1]]
    dkdv_ms = {}
    for dkdv in dkdv_candidates:
        ms = timed(case, lambda: ours(case, BackwardConfig(dkdv, base.dq, False), True), f"det dkdv={dkdv}", log)
        if ms is not None:
            dkdv_ms[dkdv] = ms
    ranked = sorted(dkdv_ms, key=dkdv_ms.get) or [base.dkdv]
    best_dkdv = ranked[0]
    best_dq, best_ms = base.dq, float("inf")
    for dq in dq_candidates:
        ms = timed(case, lambda: ours(case, BackwardConfig(best_dkdv, dq, False), True), f"det dq={dq}", log)
        if ms is not None and ms < best_ms:
            best_dq, best_ms = dq, ms
    best_atomic, best_atomic_ms = base.dkdv, float("inf")
    for dkdv in ranked[:2]:
        ms = timed(case, lambda: ours(case, BackwardConfig(dkdv, best_dq, True)), f"atomic dkdv={dkdv}", log)
        if ms is not None and ms < best_atomic_ms:
            best_atomic, best_atomic_ms = dkdv, ms
    print(f"  best deterministic: dkdv={best_dkdv} dq={best_dq} {best_ms:.3f} ms; "
          f"best atomic: dkdv={best_atomic} {best_atomic_ms:.3f} ms", flush=True)


def resource_usage(kernel, constexprs, num_warps, num_stages):
    """Registers, spill stack and shared memory of kernel compiled for sm_90 with the benchmark's specialisation."""
    import triton

    from pyflash.kernels.aot import compile_for_sm90

    # Ints equal to 1 specialise to constants, as contiguous lse and MHA do in the benchmark.
    constexprs = dict(constexprs, **{name: 1 for name in ("stride_lse_m", "group_size") if name in kernel.arg_names})
    compiled = compile_for_sm90(kernel, constexprs, num_warps, num_stages, dtype="bf16")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                text=True).stdout
    return " ".join(re.findall(r"(?:REG|STACK):\d+", report)) + f" shared memory {compiled.metadata.shared} B"


def print_resources(head_dims, causals, dropout=False):
    import triton.language as tl

    from pyflash.kernels import backward as kernels

    for head_dim, causal in itertools.product(head_dims, causals):
        switches = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, IS_VARLEN=False, HAS_SEQUSED_K=False, HAS_LEFT=False,
                        HAS_RIGHT=causal, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=dropout,
                        MMA_DTYPE=tl.bfloat16, DOT_PRECISION="tf32")
        dkdv_candidates, dq_candidates = (CANDIDATES_DROPOUT if dropout else CANDIDATES)[head_dim]
        for block_m, block_n, warps, stages in dkdv_candidates:
            usage = resource_usage(kernels._dkdv_kernel, dict(switches, BLOCK_M=block_m, BLOCK_N=block_n,
                                                              ATOMIC_DQ=False), warps, stages)
            print(f"d={head_dim} causal={causal} dkdv={(block_m, block_n, warps, stages)}: {usage}", flush=True)
        for block_m, block_n, warps, stages in dq_candidates:
            usage = resource_usage(kernels._dq_kernel, dict(switches, BLOCK_M=block_m, BLOCK_N=block_n),
                                   warps, stages)
            print(f"d={head_dim} causal={causal} dq={(block_m, block_n, warps, stages)}: {usage}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096])
    parser.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--resources", action="store_true", help="compile for sm_90 and report (no GPU needed)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="p_dropout of every call (and the dropout candidates)")
    args = parser.parse_args()
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    if args.resources:
        print_resources(args.head_dims, causals, args.dropout > 0)
        return
    out_dir = os.environ.get("OUT")
    log_file = open(os.path.join(out_dir, "tune_backward.jsonl"), "a") if out_dir else None
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    for head_dim, seqlen, causal in itertools.product(args.head_dims, args.seqlens, causals):
        print(f"d={head_dim} s={seqlen} causal={causal}", flush=True)
        case = make_case(head_dim, seqlen, causal, dropout_p=args.dropout)
        tag = dict(head_dim=head_dim, seqlen=seqlen, causal=causal)

        def log(row):
            if log_file:
                log_file.write(json.dumps({**tag, **row}) + "\n")
                log_file.flush()

        timed(case, lambda: sdpa(case, SDPBackend.FLASH_ATTENTION), "sdpa FLASH", log)
        timed(case, lambda: sdpa(case, SDPBackend.CUDNN_ATTENTION), "sdpa CUDNN", log)
        timed(case, lambda: ours(case, deterministic=False), "pyflash", log)
        for tma in ((True, True), (True, False), (False, True), (False, False)):
            timed(case, lambda: ours(case, deterministic=False, use_tma=tma),
                  f"pyflash TMA loads in dK/dV {tma[0]}, dQ {tma[1]}", log)
        if backward_config(case["q"], head_dim, causal, args.dropout > 0).atomic_dq:
            timed(case, lambda: ours(case, deterministic=True), "pyflash deterministic", log)
        if args.sweep:
            sweep(case, log)
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
