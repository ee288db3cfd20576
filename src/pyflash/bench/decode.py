"""Decoding benchmark: one new query token per sequence against a KV cache (BENCHMARK.md's decode row).

Shapes: h=32 query heads, hk=8 kv heads, d=128, bf16; batch 1..64, cache 1k..128k tokens, contiguous
and paged (256-token pages in a shuffled order). Reported: microseconds per call, GB/s of K/V read
(``2 * batch * cache_len * hk * d * 2`` bytes), that as a fraction of the card's copy bandwidth
(1 GiB device-to-device copy, read + write bytes counted, as ``pyflash.bench.timing``), and SDPA
(PyTorch's default dispatch, ``enable_gqa=True``) on the same contiguous cache.

Timing: each call is replayed from a CUDA graph (how decoding is served, and it takes Python launch
overhead out for every contender alike); the graph cycles through enough copies of the cache that
no call finds its K/V in L2. Use: ``run_decode_bench(args)`` or ``python -m pyflash.bench.decode``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from pyflash.kernels import decode
from pyflash.kvcache import flash_attn_with_kvcache

NUM_HEADS, NUM_HEADS_K, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 256
L2_FLUSH_BYTES = 512 << 20  # the copies one graph cycles through: ten times an H100's L2
MAX_TOKENS = 1 << 21  # batch * cache_len above this is skipped (16 GiB of K/V per copy at d=128)


def graph_time_us(calls: Sequence[Callable[[], object]], replays: int = 20) -> float:
    """Median microseconds per call of a CUDA graph that runs ``calls`` back to back."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth_GBps(nbytes: int = 1 << 30) -> float:
    """Best of a 1 GiB device-to-device copy as bytes and as 4-byte words, read + write counted."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    best_us = min(graph_time_us([lambda a=a, b=b: b.copy_(a)] * 4)
                  for a, b in ((src, dst), (src.view(torch.float32), dst.view(torch.float32))))
    return 2 * nbytes / (best_us * 1e-6) / 1e9


def _caches(batch: int, cache_len: int, paged: bool, copies: int, dtype, gen: torch.Generator):
    """``copies`` independent (k_cache, v_cache, block_table) sets holding ``cache_len`` tokens per sequence."""
    sets = []
    for _ in range(copies):
        if paged:
            pages_per_seq = math.ceil(cache_len / PAGE_SIZE)
            num_pages = batch * pages_per_seq
            shape = (num_pages, PAGE_SIZE, NUM_HEADS_K, HEAD_DIM)
            table = torch.randperm(num_pages, device="cuda", generator=gen).view(batch, pages_per_seq).to(torch.int32)
        else:
            shape = (batch, cache_len, NUM_HEADS_K, HEAD_DIM)
            table = None
        k_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        v_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        sets.append((k_cache, v_cache, table))
    return sets


def decode_row(batch: int, cache_len: int, paged: bool, num_splits: int = 0, with_sdpa: bool = True,
               dtype=torch.bfloat16) -> Dict[str, object]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv_bytes = 2 * batch * cache_len * NUM_HEADS_K * HEAD_DIM * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(L2_FLUSH_BYTES / kv_bytes))
    q = torch.randn(batch, 1, NUM_HEADS, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    sets = _caches(batch, cache_len, paged, copies, dtype, gen)
    calls = [lambda kc=kc, vc=vc, bt=bt: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt,
                                                                 num_splits=num_splits)
             for kc, vc, bt in sets]
    ours_us = graph_time_us(calls)
    row = {"batch": batch, "cache_len": cache_len, "paged": paged, "num_splits": num_splits,
           "kv_MB": kv_bytes / 1e6, "pyflash_us": ours_us, "pyflash_GBps": kv_bytes / (ours_us * 1e-6) / 1e9}
    del sets, calls
    if with_sdpa:
        # SDPA reads the same contiguous cache as (b, hk, s, d) views; it has no paged layout.
        sets = _caches(batch, cache_len, False, copies, dtype, gen)
        q_t = q.transpose(1, 2)
        calls = [lambda kc=kc, vc=vc: F.scaled_dot_product_attention(q_t, kc.transpose(1, 2), vc.transpose(1, 2),
                                                                     enable_gqa=True)
                 for kc, vc, _ in sets]
        sdpa_us = graph_time_us(calls)
        row.update(sdpa_us=sdpa_us, sdpa_GBps=kv_bytes / (sdpa_us * 1e-6) / 1e9, speedup_vs_sdpa=sdpa_us / ours_us)
        del sets, calls
    torch.cuda.empty_cache()
    return row


def decode_table(rows: List[Dict[str, object]], copy_GBps: float) -> str:
    """Markdown table of ``decode_row`` results against the copy bandwidth."""
    lines = [f"copy bandwidth (1 GiB d2d, read + write): {copy_GBps:.0f} GB/s",
             "",
             "| batch | cache | paged | splits | config | KV MB | pyflash us | pyflash GB/s | % of copy | SDPA us | SDPA GB/s | pyflash / SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sdpa = (f"{r['sdpa_us']:.1f} | {r['sdpa_GBps']:.0f} | {r['speedup_vs_sdpa']:.2f}x" if "sdpa_us" in r
                else "- | - | -")
        lines.append(f"| {r['batch']} | {r['cache_len']} | {'yes' if r['paged'] else 'no'} | "
                     f"{r['num_splits'] or 'auto'} | {r.get('config', '')} | {r['kv_MB']:.0f} | {r['pyflash_us']:.1f} | "
                     f"{r['pyflash_GBps']:.0f} | {100 * r['pyflash_GBps'] / copy_GBps:.0f}% | {sdpa} |")
    return "\n".join(lines)


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--decode-*`` options (a host CLI adds its own ``--out``; results go there when set)."""
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--decode-cache-lens", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--decode-paged", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--decode-splits", type=int, nargs="+", default=[0], help="num_splits values (0: auto)")
    parser.add_argument("--decode-no-sdpa", action="store_true")
    parser.add_argument("--decode-tma", choices=["on", "off", "both"], default="on",
                        help="K/V blocks through TMA descriptors (kernels/decode.USE_TMA), pointer loads, or both")
    parser.add_argument("--decode-configs", nargs="+", default=[],
                        help="BLOCK_N,WARPS,STAGES entries to try in place of the d=128 tuning table row")
    parser.add_argument("--decode-paged-extra-stages", type=int, nargs="+", default=None,
                        help="values of kernels/decode.PAGED_TMA_EXTRA_STAGES to try on the paged rows")


def run_decode_bench(args: argparse.Namespace) -> List[Dict[str, object]]:
    """The decode sweep: prints the table, writes ``decode.json``/``decode.md`` under ``args.out``."""
    if not torch.cuda.is_available():
        raise SystemExit("the decode benchmark needs a CUDA GPU (CUDA graphs, copy bandwidth)")
    copy_GBps = copy_bandwidth_GBps()
    paged_options = {"no": [False], "yes": [True], "both": [False, True]}[args.decode_paged]
    configs = [tuple(int(x) for x in c.split(",")) for c in args.decode_configs] or [decode.DECODE_CONFIGS[128]]
    default_config, default_tma = decode.DECODE_CONFIGS[128], decode.USE_TMA
    default_extra = decode.PAGED_TMA_EXTRA_STAGES
    extra_options = args.decode_paged_extra_stages or [default_extra]
    tma_options = {"on": [True], "off": [False], "both": [True, False]}[args.decode_tma]
    rows, sdpa = [], {}
    for cache_len in args.decode_cache_lens:
        for batch in args.decode_batches:
            if batch * cache_len > MAX_TOKENS:
                continue
            for paged in paged_options:
                extras = extra_options if paged else [default_extra]
                for config, tma, splits, extra in itertools.product(configs, tma_options, args.decode_splits, extras):
                    decode.DECODE_CONFIGS[128] = config
                    decode.USE_TMA = tma
                    decode.PAGED_TMA_EXTRA_STAGES = extra
                    # SDPA has no paged layout: paged rows compare with it on the contiguous cache.
                    row = decode_row(batch, cache_len, paged, splits,
                                     with_sdpa=not args.decode_no_sdpa and (batch, cache_len) not in sdpa)
                    if "sdpa_us" in row:
                        sdpa[batch, cache_len] = row["sdpa_us"]
                    elif (batch, cache_len) in sdpa:
                        row.update(sdpa_us=sdpa[batch, cache_len],
                                   sdpa_GBps=row["kv_MB"] * 1e6 / (sdpa[batch, cache_len] * 1e-6) / 1e9,
                                   speedup_vs_sdpa=sdpa[batch, cache_len] / row["pyflash_us"])
                    row.update(copy_GBps=copy_GBps, config=",".join(map(str, config)) + (",tma" if tma else "")
                               + (f",+{extra}" if paged and tma and extra else ""))
                    rows.append(row)
                    print(decode_table([row], copy_GBps).splitlines()[-1], flush=True)
    decode.DECODE_CONFIGS[128] = default_config
    decode.USE_TMA = default_tma
    decode.PAGED_TMA_EXTRA_STAGES = default_extra
    table = decode_table(rows, copy_GBps)
    print(f"\n{torch.cuda.get_device_name()}\n{table}", flush=True)
    out_dir = getattr(args, "out", None)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "decode.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": copy_GBps, "rows": rows}, f, indent=1)
        with open(os.path.join(out_dir, "decode.md"), "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_arguments(cli)
    cli.add_argument("--out", default=None, help="folder for decode.json / decode.md")
    run_decode_bench(cli.parse_args())
