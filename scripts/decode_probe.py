"""Where the time of the batch 1 x 8k decode row goes (issue 8), on a GPU:

    PYTHONPATH=src python3 scripts/decode_probe.py [--out DIR]

Every number is microseconds per call in a CUDA graph that cycles through enough cache copies that no
call finds its K/V in L2 (pyflash.bench.decode.graph_time_us). Rows:

- ``empty kernel``: a Triton kernel on the decode grid that does nothing (the per-launch floor);
- ``read only``: a Triton kernel on the decode grid that reads the same K/V blocks and nothing else
  (the floor for streaming 34 MB with one program per (kv head, split));
- ``decode, 0 keys``: the decode kernel with ``cache_seqlens`` 0 (query load, partial writes, arrival
  counter and merge: the fixed cost of a split call), with and without splits;
- ``decode``: the row itself, by split count.

``--before FILE`` (a copy of an earlier kernels/decode.py) repeats the decode rows with that module in
place of the current one, so a change is measured against its baseline on the same card in one call.
"""
import argparse
import importlib.util
import itertools
import json
import math
import os

import torch
import triton
import triton.language as tl

from pyflash.bench.decode import L2_FLUSH_BYTES, graph_time_us
from pyflash.kvcache import flash_attn_with_kvcache

BATCH, HEADS, HEADS_K, DIM = 1, 32, 8, 128


@triton.jit
def _empty(Out):
    pass


@triton.jit
def _read_only(K, V, Out, keys_per_program, stride_s, num_heads_k, BLOCK_N: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    head = pid % num_heads_k
    first = (pid // num_heads_k) * keys_per_program
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D)
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(first, first + keys_per_program, BLOCK_N):
        offs = (start + rows)[:, None] * stride_s + head * D + cols[None, :]
        k = tl.load(K + offs)
        v = tl.load(V + offs)
        acc += tl.sum(k.to(tl.float32) + v.to(tl.float32), axis=0)
    tl.store(Out + pid * D + cols, acc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-len", type=int, default=8192)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--before", default=None, help="an earlier kernels/decode.py to measure beside this one")
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 8, 16, 32], help="num_splits of the decode rows")
    parser.add_argument("--no-floors", action="store_true", help="skip the empty / read-only / 0-key rows")
    parser.add_argument("--prefetch-rows", type=int, nargs="+", default=[None],
                        help="kernels/decode.PREFETCH_ROWS values to measure the decode rows with (default: as set)")
    args = parser.parse_args()
    cache_len = args.cache_len
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_bytes = 2 * BATCH * cache_len * HEADS_K * DIM * 2
    copies = max(1, math.ceil(L2_FLUSH_BYTES / kv_bytes))
    caches = [(torch.randn(BATCH, cache_len, HEADS_K, DIM, device="cuda", dtype=torch.bfloat16, generator=gen),
               torch.randn(BATCH, cache_len, HEADS_K, DIM, device="cuda", dtype=torch.bfloat16, generator=gen))
              for _ in range(copies)]
    q = torch.randn(BATCH, 1, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    full = torch.full((BATCH,), cache_len, dtype=torch.int32, device="cuda")
    none = torch.zeros((BATCH,), dtype=torch.int32, device="cuda")
    sink = torch.empty(4096 * DIM, dtype=torch.float32, device="cuda")
    rows = []

    def row(name, calls, **extra):
        us = graph_time_us(calls)
        rows.append(dict(name=name, us=us, GBps=kv_bytes / (us * 1e-6) / 1e9, **extra))
        print(f"{name:40s} {us:7.2f} us  {rows[-1]['GBps']:6.0f} GB/s", flush=True)

    for splits in () if args.no_floors else (16, 32):
        programs = HEADS_K * splits
        row(f"empty kernel, {programs} programs",
            [lambda: _empty[(programs,)](sink)] * copies, programs=programs)
        for block_n, warps, stages in ((128, 4, 3), (64, 4, 4), (128, 8, 3)):
            keys = cache_len // splits
            row(f"read only, {programs} programs, {block_n},{warps},{stages}",
                [lambda kc=kc, vc=vc: _read_only[(programs,)](kc, vc, sink, keys, HEADS_K * DIM, HEADS_K, BLOCK_N=block_n,
                                                              D=DIM, num_warps=warps, num_stages=stages)
                 for kc, vc in caches], programs=programs, config=(block_n, warps, stages))
    import pyflash.kernels

    modules = [("", pyflash.kernels.decode)]
    if args.before:
        spec = importlib.util.spec_from_file_location("pyflash.kernels.decode_before", args.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        modules.append((" (before)", before))
    for (label, module), prefetch in itertools.product(modules, args.prefetch_rows):
        pyflash.kernels.decode = module  # what flash_attn_with_kvcache imports
        if prefetch is not None:
            module.PREFETCH_ROWS = prefetch
            label += f" prefetch {prefetch}"
        for splits in () if args.no_floors else (1, 16):
            row(f"decode, 0 keys, splits {splits}{label}",
                [lambda kc=kc, vc=vc: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=none, num_splits=splits)
                 for kc, vc in caches], splits=splits)
        for splits in args.splits:
            row(f"decode, splits {splits or 'auto'}{label}",
                [lambda kc=kc, vc=vc: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=full, num_splits=splits)
                 for kc, vc in caches], splits=splits)
    pyflash.kernels.decode = modules[0][1]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_probe.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), cache_len=cache_len, kv_bytes=kv_bytes, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
