"""Does Triton's Hopper warp specialization run, and pay, on this card? A minimal attention forward
(dense, non-causal, bf16, d=128, host TMA descriptors, one loop) timed with and without
``tl.range(..., warp_specialize=True)``; each variant in its own child process under a time limit,
since a warp-specialized kernel that deadlocks never returns.

    PYTHONPATH=src python3 scripts/ws_probe.py [--seconds 60]

(pyflash's forward with the hint did not finish on an H100 with triton 3.6: benchmarks/RESULTS.md.)
"""
import argparse
import subprocess
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(q_desc, k_desc, v_desc, out, seqlen, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    row0 = tl.program_id(1) * seqlen  # one (batch * head) per program column, rows of (bh * seqlen, d)
    q = q_desc.load([row0 + start_m, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in tl.range(0, seqlen, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([row0 + start_n, 0])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([row0 + start_n, 0])
        acc = tl.dot(p.to(tl.bfloat16), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    rows = row0 + start_m + tl.arange(0, BLOCK_M)
    tl.store(out + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], acc.to(tl.bfloat16))


def run_one(ws: bool, block_n: int, stages: int) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    bh, seqlen, d, block_m = 64, 4096, 128, 128
    q, k, v = (torch.randn(bh * seqlen, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.full_like(q, float("nan"))
    descs = [TensorDescriptor(t, [bh * seqlen, d], [d, 1], [rows, d]) for t, rows in ((q, block_m), (k, block_n), (v, block_n))]
    grid = (seqlen // block_m, bh)
    call = lambda: _probe_kernel[grid](*descs, out, seqlen, d ** -0.5 * 1.4426950408889634,  # noqa: E731
                                       BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, WS=ws, num_warps=4,
                                       num_stages=stages)
    call()
    torch.cuda.synchronize()
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.view(bh, seqlen, d) for t in (q, k, v)))
    err = (out.view(bh, seqlen, d).float() - ref.float()).abs().max().item()
    ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
    print(f"| {ws} | {block_n} | {stages} | {4 * bh * seqlen * seqlen * d / ms / 1e9:.0f} | {err:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=60, help="limit per variant")
    parser.add_argument("--one", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(bool(args.one[0]), args.one[1], args.one[2])
        return
    print("| warp_specialize | block_n | stages | TFLOP/s | max err vs SDPA |\n|---|---|---|---|---|", flush=True)
    for ws, block_n, stages in ((0, 64, 2), (1, 64, 2), (1, 128, 2)):
        try:
            subprocess.run([sys.executable, __file__, "--one", str(ws), str(block_n), str(stages)],
                           timeout=args.seconds, check=False)
        except subprocess.TimeoutExpired:
            print(f"| {bool(ws)} | {block_n} | {stages} | did not finish in {args.seconds} s | - |", flush=True)


if __name__ == "__main__":
    main()
