"""Where the short-sequence rows lose: GPU time against host time.

    PYTHONPATH=src python3 scripts/short_rows.py [--seqlens 512 1024] [--head-dims 64 128 256]

For BENCHMARK.md's workload (bf16, batch * seqlen = 16384, heads * head_dim = 2048) the forward is timed
four ways: ``pyflash.mha_fwd`` as the benchmark calls it (do_bench: the L2 flush before each call
hides host time only up to its own length), the same call replayed from a CUDA graph (GPU time alone,
no host work), and SDPA's cuDNN backend both ways. The gap between a call and its graph replay is host
time the GPU waited for.
"""
import argparse

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyflash


def bench_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn, replays: int = 50) -> float:
    """Median GPU time of fn replayed from a CUDA graph (captured on a side stream after a warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    print("| d | causal | s | pyflash call | pyflash graph | cuDNN call | cuDNN graph | graph / cuDNN graph |")
    print("|---|---|---|---|---|---|---|---|")
    for head_dim in args.head_dims:
        for causal in (False, True):
            for seqlen in args.seqlens:
                batch, heads = 16384 // seqlen, 2048 // head_dim
                q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)

                def ours():
                    return pyflash.mha_fwd(q, k, v, None, None, 0.0, head_dim ** -0.5, causal, -1, -1, False, None)

                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

                def cudnn():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                times = [bench_ms(ours), graph_ms(ours), bench_ms(cudnn), graph_ms(cudnn)]
                tf = [flops / (ms * 1e-3) / 1e12 for ms in times]
                print(f"| {head_dim} | {causal} | {seqlen} | {tf[0]:.0f} | {tf[1]:.0f} | {tf[2]:.0f} | {tf[3]:.0f} "
                      f"| {tf[1] / tf[3]:.2f} |", flush=True)
                del q, k, v


if __name__ == "__main__":
    main()
