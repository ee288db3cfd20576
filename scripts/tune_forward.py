"""Tune the Triton forward and print its TFLOP/s next to SDPA's FLASH_ATTENTION and CUDNN_ATTENTION.

    PYTHONPATH=src python3 scripts/tune_forward.py [--sweep 64 128] [--head-dims 64 128 256] [--seqlens 1024 4096 16384]

--sweep: per (head dim, causal) of the dims given, at seqlen --sweep-seqlen, time each candidate
(block_m, block_n, num_warps, num_stages) on the TMA path and the best one on the pointer path too;
the Hopper rows of kernels/configs.py come from this. Then the table: BENCHMARK.md's workload
(bf16, batch * seqlen = 16384, heads * head_dim = 2048), pyflash with the configs.py table against
the SDPA backends in the same process, plus the extra rows (GQA, sliding window, dropout, varlen).
Markdown goes to stdout and to $OUT/forward_bench.md.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyflash.kernels.forward import forward, forward_config
from pyflash.params import AttentionParams, Seqlens

TOKENS, HIDDEN = 16384, 2048
CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 2), (128, 128, 4, 2), (64, 64, 4, 3),
         (256, 64, 8, 3), (256, 128, 8, 3), (256, 128, 8, 2)],
    128: [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 4, 2),
          (256, 64, 8, 2), (256, 64, 8, 3), (128, 32, 4, 3)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 1), (64, 32, 4, 2)],
}
# Warp-specialized (5th element True): Triton's Hopper pass turns a 4-warp kernel into a TMA producer
# warp group and two consumer warp groups of block_m / 2 rows each.
WS_CANDIDATES = {
    64: [(128, 64, 4, 2, True), (128, 128, 4, 2, True), (128, 128, 4, 3, True), (256, 64, 4, 2, True)],
    128: [(128, 64, 4, 2, True), (128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 128, 4, 3, True),
          (256, 64, 4, 2, True)],
    256: [(128, 64, 4, 2, True), (128, 32, 4, 2, True), (128, 64, 4, 1, True), (64, 64, 4, 2, True)],
}


def median_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def make_qkv(batch, seqlen, heads, heads_k, head_dim, dtype=torch.bfloat16):
    shapes = [(batch, seqlen, heads, head_dim)] + [(batch, seqlen, heads_k, head_dim)] * 2
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


def pyflash_call(q, k, v, params, seqlens, config=None, use_tma=None):
    out = torch.empty_like(q)
    heads = q.shape[-2]
    lse_shape = (heads, q.shape[0]) if seqlens.is_varlen else (q.shape[0], heads, q.shape[1])
    lse = torch.empty(lse_shape, device="cuda")

    def call():
        forward(q, k, v, out, lse, None, params, seqlens, config=config, use_tma=use_tma)

    call.out = out
    return call


def sdpa_ms(backend, q, k, v, causal, **kwargs):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    try:
        with sdpa_kernel(backend):
            return median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **kwargs))
    except RuntimeError:
        return float("nan")


def sweep(head_dims, seqlen, lines, ws=False):
    lines += [f"### Sweep at seqlen {seqlen} (bf16, b*s = {TOKENS}, h*d = {HIDDEN}): TFLOP/s", "",
              "| d | causal | config (BM, BN, warps, stages) | TMA | TFLOP/s |", "|---|---|---|---|---|"]
    for head_dim in head_dims:
        batch, heads = TOKENS // seqlen, HIDDEN // head_dim
        q, k, v = make_qkv(batch, seqlen, heads, heads, head_dim)
        for causal in (False, True):
            params = AttentionParams(head_dim ** -0.5, -1, 0 if causal else -1)
            flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
            results = []
            candidates = [forward_config(q, head_dim, causal)] + WS_CANDIDATES[head_dim] if ws else CANDIDATES[head_dim]
            for config in candidates:
                try:
                    ms = median_ms(pyflash_call(q, k, v, params, Seqlens(batch, seqlen, seqlen), config))
                except Exception as error:  # out of shared memory etc.: report and go on
                    print(f"d={head_dim} causal={causal} {config}: {type(error).__name__}: {str(error)[:120]}")
                    continue
                results.append((tflops(flops, ms), config))
                lines.append(f"| {head_dim} | {causal} | {config} | yes | {results[-1][0]:.0f} |")
                print(lines[-1], flush=True)
            best = max(results)
            ms = median_ms(pyflash_call(q, k, v, params, Seqlens(batch, seqlen, seqlen), best[1], use_tma=False))
            lines.append(f"| {head_dim} | {causal} | {best[1]} | no | {tflops(flops, ms):.0f} |")
            lines.append(f"| {head_dim} | {causal} | **best {best[1]}** | yes | **{best[0]:.0f}** |")
            print(lines[-2], lines[-1], sep="\n", flush=True)
    lines.append("")


def table(head_dims, seqlens, lines):
    lines += ["### pyflash (configs.py) vs SDPA backends: forward TFLOP/s (bf16)", "",
              "| d | causal | s | config | pyflash | FA2 (SDPA FLASH) | cuDNN | vs FA2 | vs cuDNN |",
              "|---|---|---|---|---|---|---|---|---|"]
    for head_dim in head_dims:
        for causal in (False, True):
            for seqlen in seqlens:
                batch, heads = TOKENS // seqlen, HIDDEN // head_dim
                q, k, v = make_qkv(batch, seqlen, heads, heads, head_dim)
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
                params = AttentionParams(head_dim ** -0.5, -1, 0 if causal else -1)
                ours = tflops(flops, median_ms(pyflash_call(q, k, v, params, Seqlens(batch, seqlen, seqlen))))
                fa2 = tflops(flops, sdpa_ms(SDPBackend.FLASH_ATTENTION, q, k, v, causal))
                cudnn = tflops(flops, sdpa_ms(SDPBackend.CUDNN_ATTENTION, q, k, v, causal))
                config = forward_config(q, head_dim, causal)
                lines.append(f"| {head_dim} | {causal} | {seqlen} | {config} | {ours:.0f} | {fa2:.0f} | {cudnn:.0f} "
                             f"| {ours / fa2:.2f} | {ours / cudnn:.2f} |")
                print(lines[-1], flush=True)
                del q, k, v
    lines.append("")


def extras(lines):
    """GQA, sliding window, dropout and varlen rows at head dim 128 against PyTorch's FA2 op."""
    lines += ["### Extra rows, d = 128, bf16: forward TFLOP/s", "", "| row | pyflash | FA2 | vs FA2 |", "|---|---|---|---|"]
    flash = torch.ops.aten._flash_attention_forward

    def row(name, flops, ours_fn, fa2_fn):
        ours, fa2 = tflops(flops, median_ms(ours_fn)), tflops(flops, median_ms(fa2_fn))
        lines.append(f"| {name} | {ours:.0f} | {fa2:.0f} | {ours / fa2:.2f} |")
        print(lines[-1], flush=True)

    scale = 128 ** -0.5
    q, k, v = make_qkv(4, 4096, 32, 8, 128)
    row("GQA h=32 hk=8 s=4096 b=4 causal", 4 * 4 * 32 * 4096 * 4096 * 128 / 2,
        pyflash_call(q, k, v, AttentionParams(scale, -1, 0), Seqlens(4, 4096, 4096)),
        lambda: flash(q, k, v, None, None, 4096, 4096, 0.0, True, False, scale=scale))
    q, k, v = make_qkv(1, 16384, 16, 16, 128)
    pairs = sum(min(i, 4096) + 1 for i in range(16384))
    row("window 4096 causal, s=16384 b=1 h=16", 4 * 16 * 128 * pairs,
        pyflash_call(q, k, v, AttentionParams(scale, 4096, 0), Seqlens(1, 16384, 16384)),
        lambda: flash(q, k, v, None, None, 16384, 16384, 0.0, True, False, scale=scale, window_size_left=4096,
                      window_size_right=0))
    q, k, v = make_qkv(4, 4096, 16, 16, 128)
    row("dropout 0.1 s=4096 b=4 h=16", 4 * 4 * 16 * 4096 * 4096 * 128,
        pyflash_call(q, k, v, AttentionParams(scale, -1, -1, dropout_p=0.1, philox_seed=1, philox_offset=0),
                     Seqlens(4, 4096, 4096)),
        lambda: flash(q, k, v, None, None, 4096, 4096, 0.1, False, False, scale=scale))
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(256, 4096, (8,), generator=gen)
    lens = (lens * TOKENS / lens.sum()).long().clamp(min=1)
    lens[-1] += TOKENS - lens.sum()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32).cuda()
    max_len = int(lens.max())
    q, k, v = (x[0] for x in make_qkv(1, TOKENS, 16, 16, 128))
    for use_tma in (None, False):
        row(f"varlen {len(lens)} seqs summing {TOKENS}, h=16, causal, {'pointers' if use_tma is False else 'default'}",
            sum(4 * 16 * 128 * n * n / 2 for n in lens.tolist()),
            pyflash_call(q, k, v, AttentionParams(scale, -1, 0), Seqlens(len(lens), max_len, max_len, cu, cu),
                         use_tma=use_tma),
            lambda: flash(q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale))
    lines.append("")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", type=int, nargs="*", metavar="HEAD_DIM", help="sweep these head dims")
    parser.add_argument("--sweep-seqlen", type=int, default=4096)
    parser.add_argument("--ws", action="store_true", help="sweep the table's config and the warp-specialized ones")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--no-extras", action="store_true")
    args = parser.parse_args()
    started = time.time()
    name = torch.cuda.get_device_name()
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul = tflops(2 * 8192 ** 3, median_ms(lambda: a @ b))
    del a, b
    lines = [f"## Forward, {name}, torch {torch.__version__}, triton {triton.__version__}",
             f"bf16 8192^3 matmul: {matmul:.0f} TFLOP/s", ""]
    print(*lines, sep="\n", flush=True)
    if args.sweep:
        sweep(args.sweep, args.sweep_seqlen, lines, args.ws)
    if not args.no_table:
        table(args.head_dims, args.seqlens, lines)
        if not args.no_extras:
            extras(lines)
    lines.append(f"({time.time() - started:.0f} s)")
    text = "\n".join(lines)
    print("\n" + text)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "forward_bench.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
