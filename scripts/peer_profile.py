"""Kernel by kernel: pyflash against SDPA's cuDNN backend on BENCHMARK.md's workload (bf16).

    PYTHONPATH=src python3 scripts/peer_profile.py [--mode fwd bwd] [--seqlens 512 1024] [--head-dims 64 128]
        [--causal 0 1]

For each row, each side's call is timed whole (do_bench median, as the benchmark times it) and then run
under torch.profiler: every kernel's device time per call and their sum. Where a short row loses, this
says whether the main kernel or the small ones around it (delta preprocess, dQ zero fill and convert)
make the difference, and what cuDNN launches instead.
"""
import argparse

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyflash
from two_pass_check import kernel_times  # scripts/, beside this file


def bench_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sides(mode, q, k, v, causal):
    """{name: fn} of one row: pyflash's mha_fwd / mha_bwd and the cuDNN forward / backward alone."""
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5
    result = pyflash.mha_fwd(q, k, v, None, None, 0.0, scale, causal, -1, -1, False, None)
    out, lse, seed, offset = result[0], result[4], result[5], result[6]
    dout = torch.randn_like(out)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out_t = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dout_t = dout.transpose(1, 2)
    if mode == "fwd":
        def ours():
            return pyflash.mha_fwd(q, k, v, None, None, 0.0, scale, causal, -1, -1, False, None)

        def cudnn():
            with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    else:
        def ours():
            return pyflash.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, scale, causal, -1, -1,
                                   False, seed, offset)

        def cudnn():
            return torch.autograd.grad(out_t, (qt, kt, vt), dout_t, retain_graph=True)
    return {"pyflash": ours, "cudnn": cudnn}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", nargs="+", default=["bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    for mode in args.mode:
        for head_dim in args.head_dims:
            for causal in map(bool, args.causal):
                for seqlen in args.seqlens:
                    batch, heads = 16384 // seqlen, 2048 // head_dim
                    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                               for _ in range(3))
                    flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                    flops *= 2.5 if mode == "bwd" else 1.0
                    row = f"{mode} d={head_dim} causal={int(causal)} s={seqlen}"
                    for name, fn in sides(mode, q, k, v, causal).items():
                        ms = bench_ms(fn)
                        parts = kernel_times(fn)
                        print(f"CALL {row} {name:8s} {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  kernels sum "
                              f"{sum(t for t, _ in parts):8.3f} ms", flush=True)
                        for t, key in parts:
                            print(f"KERNEL {row} {name:8s} {t:8.3f} ms  {key[:90]}", flush=True)
                    del q, k, v


if __name__ == "__main__":
    main()
