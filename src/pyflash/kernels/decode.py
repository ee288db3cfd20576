"""Split-KV decoding: attention of a few query tokens to a long (optionally paged) KV cache.

Decoding reads the whole cache once per step and does little math, so the goal is memory
bandwidth. Each program owns one (batch, kv head) pair, the query heads of its GQA group packed as
the rows of one tile (``row = query_index * groups + group_member``), so K/V are read once per group;
and one of ``num_splits`` contiguous parts of the key range, so a small batch still fills the card.
Each part leaves an fp32 partial output and its logsumexp; the last part of a tile to finish (an
arrival counter) merges them in the same launch: ``lse = log(sum_s exp(lse_s))``,
``out = sum_s exp(lse_s - lse) * out_s``. A split program first asks L2 to prefetch its first
``PREFETCH_ROWS`` key rows of K and V, so that HBM streams them while its loop is being set up (a
split call is short: at batch 1 x 8k each program reads four 128-key blocks).

Keys are addressed by sequence-local index ``j`` at memory position ``leftpad[b] + j`` of cache row
``batch_rows[b]``, or of page ``block_table[b, pos // PAGE_SIZE]`` row ``pos % PAGE_SIZE``: each key
row is gathered by its own address, so any page size works with any ``block_n``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pyflash.kernels.common import (INTERPRET, alibi_bias, cdiv, device_capability, launch_fitting,
                                     multiprocessor_count, next_power_of_2, tanh, tma_descriptor, tma_view_ok,
                                     visible_mask)
from pyflash.kernels import launch as recorded_launches
from pyflash.kernels.launch import current_device, describe, launch_into

MAX_SPLITS = 128
# Parts the merge loads at once (a power of two; fewer when there are fewer splits or larger tiles:
# merge_chunk) and the registers a thread may give their outputs.
MERGE_CHUNK = 16
MERGE_REGISTERS = 64
# Key rows of K and V a split program asks L2 to prefetch when it starts (0: none; a power of two).
# Batch 1 x 8k on an H100 (scripts/decode_probe.py --prefetch-rows): 0 rows 18.1-18.5 us, 64 17.7,
# 128 17.4-17.5, 256 17.8, 512 19.1 (benchmarks/RESULTS.md).
PREFETCH_ROWS = 128

# (block_n, num_warps, num_stages) by the largest head dim they serve. Under the interpreter small
# blocks keep the CPU tests fast while still crossing block, page and split boundaries.
DECODE_CONFIGS = {64: (128, 4, 3), 128: (128, 4, 3), 256: (64, 4, 2)}
INTERPRET_BLOCK_N = 32
# K/V blocks through TMA descriptors on Hopper (contiguous caches, and paged ones whose pages hold whole
# blocks); the bench flips it to compare.
USE_TMA = True
# Pipeline stages a paged TMA loop adds to the config's: Triton's pipeliner gives the block table's
# load (the page of each block) stages of its own, so at the config's 3 stages a paged loop kept one
# K/V buffer (no copy in flight during a block's math; the contiguous loop keeps two). Compiled for
# sm_90 (d=128, block_n 128): 3 and 4 stages give 1 buffer (106 KB), 5 give 2 (172 KB, as contiguous).
PAGED_TMA_EXTRA_STAGES = 2


def _config(head_dim: int, element_size: int = 2):
    block_d = max(16, next_power_of_2(head_dim))
    block_n, num_warps, num_stages = next(c for d, c in sorted(DECODE_CONFIGS.items()) if block_d <= d)
    if element_size == 4:
        # fp32 K/V tiles are twice the bytes: (128, d=128, 3 stages) would need 278528 B of shared memory.
        block_n //= 2
    if INTERPRET:
        block_n = INTERPRET_BLOCK_N
    return block_d, block_n, num_warps, num_stages


def merge_chunk(num_splits: int, merge_m: int, block_d: int) -> int:
    """Parts the merge holds in flight at once: at most MERGE_CHUNK, and their output tiles within
    MERGE_REGISTERS fp32 a thread (a 64-row tile at d=128 spills from two parts on: ptxas)."""
    if num_splits <= 1:
        return 1
    fit = max(1, MERGE_REGISTERS * 128 // (merge_m * block_d))
    return min(MERGE_CHUNK, next_power_of_2(num_splits), 1 << (fit.bit_length() - 1))


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return multiprocessor_count(device)
    return 8  # interpreter: small, so the heuristic still splits the tests' short caches


def pick_num_splits(programs: int, max_seqlen_k: int, block_n: int, multiprocessors: int) -> int:
    """Split while fewer than half the multiprocessors would be busy: as many parts as fill every
    multiprocessor once without a partial second wave, and at least two key blocks per part."""
    if 2 * programs > multiprocessors:
        return 1
    key_blocks = cdiv(max(max_seqlen_k, 1), block_n)
    return max(1, min(multiprocessors // programs, key_blocks // 2, MAX_SPLITS))


@triton.jit
def _block_by_pointers(K, V, BlockTable, cache_row, kh_offset_k, kh_offset_v, pos, cols, seqlen_k,
                       stride_kb, stride_ks, stride_vb, stride_vs, offs_d, d_ok,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
                       PAGED: tl.constexpr, MASKED: tl.constexpr):
    """K and V rows of memory positions ``pos`` (sequence-local keys ``cols``), each row gathered by
    its own address (any page size); 0 past the sequence (MASKED) and past HEAD_DIM."""
    load_ok = d_ok[None, :]
    if MASKED:
        load_ok = load_ok & (cols < seqlen_k)[:, None]
    if PAGED:
        if MASKED:
            page = tl.load(BlockTable + pos // PAGE_SIZE, mask=cols < seqlen_k, other=0)
        else:
            page = tl.load(BlockTable + pos // PAGE_SIZE)
        page = page.to(tl.int64)
        k_rows = page * stride_kb + (pos % PAGE_SIZE) * stride_ks
        v_rows = page * stride_vb + (pos % PAGE_SIZE) * stride_vs
    else:
        k_rows = cache_row * stride_kb + pos.to(tl.int64) * stride_ks
        v_rows = cache_row * stride_vb + pos.to(tl.int64) * stride_vs
    if HEAD_DIM == BLOCK_D and not MASKED:
        k = tl.load(K + kh_offset_k + k_rows[:, None] + offs_d[None, :])
        v = tl.load(V + kh_offset_v + v_rows[:, None] + offs_d[None, :])
    else:
        k = tl.load(K + kh_offset_k + k_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
        v = tl.load(V + kh_offset_v + v_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
    return k, v


@triton.jit
def _block_by_tma(K, V, BlockTable, first, cols, seqlen_k, tma_row, tma_col, PAGE_SIZE: tl.constexpr,
                  PAGED: tl.constexpr, MASKED: tl.constexpr):
    """K and V of the block at memory position ``first`` through descriptors over the cache's
    (rows, heads_k * d) view: rows from ``tma_row + first`` (contiguous cache) or from the block's
    page (decode() takes this path only when a page holds whole blocks)."""
    if PAGED:
        row = tl.load(BlockTable + first // PAGE_SIZE) * PAGE_SIZE + first % PAGE_SIZE
    else:
        row = tma_row + first
    k = K.load([row, tma_col])
    v = V.load([row, tma_col])
    if MASKED:
        # Past the sequence lie unused cache slots (maybe NaN), and p = 0 does not cancel NaN in P V.
        v = tl.where((cols < seqlen_k)[:, None], v, 0.0)
    return k, v


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, slope, rows, K, V, BlockTable, cache_row, kh_offset_k, kh_offset_v,
                   start_pos, seqlen_k, seqlen_q, key_lo, t_begin, t_end,
                   stride_kb, stride_ks, stride_vb, stride_vs,
                   scale, softcap, window_left, window_right, offs_d, d_ok, tma_row, tma_col,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr):
    """Online softmax over key blocks ``key_lo + t * BLOCK_N`` for t in [t_begin, t_end).
    MASKED blocks apply the visibility rule; the others are known to be fully visible.
    USE_TMA: K and V are TMA descriptors (_block_by_tma), else pointers (_block_by_pointers)."""
    for t in range(t_begin, t_end):
        cols = key_lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_TMA:
            k, v = _block_by_tma(K, V, BlockTable, start_pos + key_lo + t * BLOCK_N, cols, seqlen_k, tma_row,
                                 tma_col, PAGE_SIZE, PAGED, MASKED)
        else:
            k, v = _block_by_pointers(K, V, BlockTable, cache_row, kh_offset_k, kh_offset_v, start_pos + cols, cols,
                                      seqlen_k, stride_kb, stride_ks, stride_vb, stride_vs, offs_d, d_ok,
                                      HEAD_DIM, BLOCK_D, PAGE_SIZE, PAGED, MASKED)
        if UPCAST:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = qk * scale
        if HAS_SOFTCAP:
            s = softcap * tanh(s / softcap)
        if HAS_ALIBI:
            s += alibi_bias(slope[:, None], rows[:, None], cols[None, :], seqlen_q, seqlen_k)
        s = s * 1.4426950408889634  # log2(e): the softmax runs in base 2
        if MASKED:
            visible = visible_mask(rows[:, None], cols[None, :], seqlen_q, seqlen_k, window_left, window_right,
                                   HAS_LEFT, HAS_RIGHT, True)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(Q, K, V, Out, Lse, OutPartial, LsePartial, Counters, SeqlensK, Leftpad, BatchRows, BlockTable,
                   Alibi, KData, VData,
                   stride_qb, stride_qs, stride_qh,
                   stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh,
                   stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
                   stride_part, stride_lse_part,
                   stride_bt, stride_alibi,
                   seqlen_q, num_heads_k, groups, num_splits, cache_len,
                   scale, softcap, window_left, window_right,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, IS_SPLIT: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                   HAS_BATCH_ROWS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   USE_TMA: tl.constexpr = False, MERGE_CHUNK: tl.constexpr = 1,
                   MERGE_M: tl.constexpr = 16, PREFETCH: tl.constexpr = 0, PREFETCH_LINES: tl.constexpr = 1):
    pid_m = tl.program_id(0)
    pid_bkh = tl.program_id(1)
    split = tl.program_id(2)
    batch = pid_bkh // num_heads_k
    head_k = pid_bkh % num_heads_k

    # Rows of the tile: the query heads of this kv head's group for each query index.
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_r // groups  # query index within the sequence
    heads = head_k * groups + offs_r % groups
    row_ok = rows < seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + batch * stride_qb + rows[:, None] * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + batch * stride_alibi + heads, mask=row_ok, other=0.0)

    start_pos = 0
    if HAS_LEFTPAD:
        start_pos = tl.load(Leftpad + batch)
    seqlen_k = tl.load(SeqlensK + batch) - start_pos
    # Keys any row of the tile may see ([lo, hi)), and keys every row sees ([full_lo, full_hi)).
    # (Not common.visible_block_ranges: a tile's rows span a query range that need not be a
    # power of two, and the split parts start at lo rather than at block multiples.)
    row_first = (pid_m * BLOCK_M) // groups
    row_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // groups, seqlen_q - 1)
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(row_first + seqlen_k - seqlen_q - window_left, 0)
        full_lo = tl.maximum(row_last + seqlen_k - seqlen_q - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(row_last + seqlen_k - seqlen_q + window_right + 1, seqlen_k)
        full_hi = tl.minimum(row_first + seqlen_k - seqlen_q + window_right + 1, seqlen_k)
    if USE_TMA and PAGED:
        lo = lo // BLOCK_N * BLOCK_N  # blocks at multiples of BLOCK_N never straddle a page (the mask trims)
    hi = tl.maximum(hi, lo)
    # This split's share: whole blocks, so neighbouring splits never overlap.
    blocks_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    key_lo = lo + split * blocks_per_split * BLOCK_N
    n_blocks = tl.minimum(tl.cdiv(tl.maximum(hi - key_lo, 0), BLOCK_N), blocks_per_split)
    # Blocks t in [t_full_begin, t_full_end) lie inside [full_lo, full_hi): no mask needed.
    t_full_begin = tl.minimum(tl.cdiv(tl.maximum(full_lo - key_lo, 0), BLOCK_N), n_blocks)
    t_full_end = tl.maximum(tl.minimum(tl.maximum(full_hi - key_lo, 0) // BLOCK_N, n_blocks), t_full_begin)

    cache_row = batch.to(tl.int64)
    if HAS_BATCH_ROWS:
        cache_row = tl.load(BatchRows + batch).to(tl.int64)
    BlockTable += batch.to(tl.int64) * stride_bt
    kh_offset_k = head_k.to(tl.int64) * stride_kh
    kh_offset_v = head_k.to(tl.int64) * stride_vh
    tma_row = (cache_row * cache_len).to(tl.int32)  # the sequence's first row in the (rows, hk * d) view
    tma_col = head_k * HEAD_DIM
    if PREFETCH > 0:
        # Ask L2 for this part's first PREFETCH key rows of K and V (128-byte lines) now, so that HBM
        # streams them while the loop's first copies are still being set up. Positions stop at the
        # sequence's last key (row 0 for an empty one): an empty part's key_lo may lie past the cache,
        # where a paged part would read its table row out of bounds.
        offs_p = tl.arange(0, PREFETCH)
        last = tl.maximum(start_pos + seqlen_k - 1, 0)
        pos = tl.minimum(start_pos + key_lo + offs_p, last).to(tl.int64)
        if PAGED:
            page = tl.load(BlockTable + pos // PAGE_SIZE).to(tl.int64)
            k_rows = page * stride_kb + (pos % PAGE_SIZE) * stride_ks
            v_rows = page * stride_vb + (pos % PAGE_SIZE) * stride_vs
        else:
            k_rows = cache_row * stride_kb + pos * stride_ks
            v_rows = cache_row * stride_vb + pos * stride_vs
        lines = tl.minimum(tl.arange(0, PREFETCH_LINES) * 64, HEAD_DIM - 1)  # inside the head's row
        _prefetch_l2(KData + kh_offset_k + k_rows[:, None] + lines[None, :])
        _prefetch_l2(VData + kh_offset_v + v_rows[:, None] + lines[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, slope, rows, K, V, BlockTable, cache_row, kh_offset_k, kh_offset_v,
        start_pos, seqlen_k, seqlen_q, key_lo, 0, t_full_begin, stride_kb, stride_ks, stride_vb, stride_vs,
        scale, softcap, window_left, window_right, offs_d, d_ok, tma_row, tma_col, HEAD_DIM, BLOCK_D, BLOCK_N,
        PAGE_SIZE, PAGED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST, DOT_PRECISION,
        USE_TMA)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, slope, rows, K, V, BlockTable, cache_row, kh_offset_k, kh_offset_v,
        start_pos, seqlen_k, seqlen_q, key_lo, t_full_begin, t_full_end, stride_kb, stride_ks, stride_vb,
        stride_vs, scale, softcap, window_left, window_right, offs_d, d_ok, tma_row, tma_col, HEAD_DIM, BLOCK_D,
        BLOCK_N, PAGE_SIZE, PAGED, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST, DOT_PRECISION,
        USE_TMA)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, slope, rows, K, V, BlockTable, cache_row, kh_offset_k, kh_offset_v,
        start_pos, seqlen_k, seqlen_q, key_lo, t_full_end, n_blocks, stride_kb, stride_ks, stride_vb, stride_vs,
        scale, softcap, window_left, window_right, offs_d, d_ok, tma_row, tma_col, HEAD_DIM, BLOCK_D, BLOCK_N,
        PAGE_SIZE, PAGED, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST, DOT_PRECISION,
        USE_TMA)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    io_mask = row_ok[:, None] & d_ok[None, :]
    out_offs = batch * stride_ob + rows[:, None] * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    lse_offs = batch * stride_lb + heads * stride_lh + rows
    if IS_SPLIT:
        # Partial results share out's/lse's layout, one copy per split; an empty part has weight 0.
        tl.store(OutPartial + split * stride_part + out_offs, out, mask=io_mask)
        tl.store(LsePartial + split * stride_lse_part + lse_offs, tl.where(empty, float("-inf"), lse), mask=row_ok)
        # The last part of this tile to finish merges them all: every thread's stores precede the
        # counter's release; its acquire makes the other parts' stores visible.
        tl.debug_barrier()
        counter = Counters + pid_m * tl.num_programs(1) + pid_bkh
        finished = tl.atomic_add(counter, 1, sem="acq_rel")
        if finished == num_splits - 1:
            # Ready for the next call (and CUDA graph replays): relaxed, so the merge's loads need not
            # wait for it (acq_rel cost an L2 round trip before them); every part has arrived, so
            # nothing else touches the counter in this launch.
            tl.atomic_xchg(counter, 0, sem="relaxed")
            # The tile's rows that can hold a query (the first MERGE_M of BLOCK_M), as above.
            merge_r = pid_m * BLOCK_M + tl.arange(0, MERGE_M)
            merge_rows = merge_r // groups
            merge_heads = head_k * groups + merge_r % groups
            merge_ok = merge_rows < seqlen_q
            merge_mask = merge_ok[:, None] & d_ok[None, :]
            merge_out = (batch * stride_ob + merge_rows[:, None] * stride_os + merge_heads[:, None] * stride_oh
                         + offs_d[None, :])
            merge_lse = batch * stride_lb + merge_heads * stride_lh + merge_rows
            merged, merged_lse = _merge_parts(OutPartial, LsePartial, merge_out, merge_lse, num_splits, stride_part,
                                              stride_lse_part, merge_mask, merge_ok, MERGE_M, BLOCK_D, MERGE_CHUNK)
            tl.store(Out + merge_out, merged.to(Out.dtype.element_ty), mask=merge_mask)
            tl.store(Lse + merge_lse, merged_lse, mask=merge_ok)
    else:
        tl.store(Out + out_offs, out.to(Out.dtype.element_ty), mask=io_mask)
        tl.store(Lse + lse_offs, tl.where(empty, float("inf"), lse), mask=row_ok)


@triton.jit
def _prefetch_l2(ptrs):
    """prefetch.global.L2 of every address (a hint: no value, no fault)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _merge_parts(OutPartial, LsePartial, out_offs, lse_offs, num_splits, stride_part, stride_lse_part, io_mask,
                 row_ok, MERGE_M: tl.constexpr, BLOCK_D: tl.constexpr, MERGE_CHUNK: tl.constexpr):
    """``lse = log(sum_s exp(lse_s))``, ``out = sum_s exp(lse_s - lse) * out_s``; no key at all:
    out 0, lse +inf. Loads bypass L1 (``.cg``): other programs wrote the parts.

    The merge runs after the last part of the tile arrives, so its latency is the call's tail. A chunk
    of ``MERGE_CHUNK`` parts is one block of straight-line code (unrolled: their lse for the maximum,
    then their lse and outputs again for the sum) whose loads depend on nothing before them, so all are
    in flight at once: about one L2 round trip per chunk, and a call has one chunk unless it has more
    than MERGE_CHUNK splits. The tile is only the ``MERGE_M`` rows the parts can hold (a decode tile's
    GQA group, not the dot's 16-row minimum), so a chunk's outputs fit in registers. Measured on an H100
    at batch 1 x 8k, a 16-split call that reads no key against 2.8 us unsplit: one part per step ~0.45 us
    a part; four parts per step 7.1 us; all lse first then the outputs, two loops, 5.9 us
    (benchmarks/RESULTS.md)."""
    lse_max = tl.full([MERGE_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([MERGE_M], dtype=tl.float32)
    acc = tl.zeros([MERGE_M, BLOCK_D], dtype=tl.float32)
    for first in range(0, num_splits, MERGE_CHUNK):
        m_new = lse_max
        for i in tl.static_range(MERGE_CHUNK):
            lse = tl.load(LsePartial + (first + i) * stride_lse_part + lse_offs,
                          mask=row_ok & (first + i < num_splits), other=float("-inf"), cache_modifier=".cg")
            m_new = tl.maximum(m_new, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows no part has a key for yet
        alpha = tl.exp(lse_max - m_safe)
        acc = acc * alpha[:, None]
        total = total * alpha
        for i in tl.static_range(MERGE_CHUNK):
            present = first + i < num_splits
            lse = tl.load(LsePartial + (first + i) * stride_lse_part + lse_offs, mask=row_ok & present,
                          other=float("-inf"), cache_modifier=".cg")
            out = tl.load(OutPartial + (first + i) * stride_part + out_offs, mask=io_mask & present, other=0.0,
                          cache_modifier=".cg")
            weight = tl.exp(lse - m_safe)
            acc += weight[:, None] * out
            total += weight
        lse_max = m_new
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    return out, tl.where(empty, float("inf"), lse_max + tl.log(tl.where(empty, 1.0, total)))


# Arrival counters of the split kernels, one int32 per (row block, batch, kv head), kept zero between
# calls by the program that merges. One buffer per (device, stream) so concurrent streams never share;
# replaced buffers stay alive because captured CUDA graphs may still point at them.
_COUNTERS = {}
_RETIRED = []


def _counters(size: int, device: torch.device) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < size:
        if buffer is not None:
            _RETIRED.append(buffer)
        buffer = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
    return buffer


def decode(q, k_cache, v_cache, seqlens_k, leftpad, batch_rows, block_table, softmax_scale, window_left,
           window_right, softcap, alibi_slopes, num_splits, out, softmax_lse, use_tma=None) -> None:
    """Attention of ``q (b, sq, h, d)`` to the cache; writes ``out`` (b, sq, h, d) and ``softmax_lse``
    (b, h, sq), both contiguous. Inputs validated by ``pyflash.kvcache``: ``seqlens_k``/``leftpad``
    (b,) int32 memory positions ending/starting each sequence (leftpad None: 0), ``batch_rows`` (b,)
    cache rows (None: row b; unused when paged), ``alibi_slopes`` None or fp32 (b, h).
    use_tma: K/V blocks through TMA descriptors (default USE_TMA; Hopper, where the layout allows)."""
    launches = key = None
    if recorded_launches.RECORD_TRITON and q.is_cuda and not INTERPRET:
        # A call like an earlier one replays its recorded launch (kernels/launch.py).
        named = dict(q=q, k_cache=k_cache, v_cache=v_cache, out=out, softmax_lse=softmax_lse, seqlens_k=seqlens_k,
                     leftpad=leftpad if leftpad is not None else seqlens_k,
                     batch_rows=batch_rows if batch_rows is not None else seqlens_k,
                     block_table=block_table if block_table is not None else seqlens_k,
                     alibi=alibi_slopes if alibi_slopes is not None else seqlens_k)
        key = (tuple(describe(t) for t in named.values()), leftpad is None, batch_rows is None, block_table is None,
               alibi_slopes is None, softmax_scale, window_left, window_right, softcap, num_splits, use_tma, USE_TMA,
               PREFETCH_ROWS, PAGED_TMA_EXTRA_STAGES,
               _config(q.shape[-1], k_cache.element_size()), current_device())
        plan = _PLANS.get(key)
        if plan is not None:
            plan(named)
            return
        launches = []
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_heads_k = k_cache.shape[2]
    groups = num_heads // num_heads_k
    paged = block_table is not None
    block_d, block_n, num_warps, num_stages = _config(head_dim, k_cache.element_size())
    block_m = max(16, min(64, next_power_of_2(groups * seqlen_q)))
    m_blocks = cdiv(groups * seqlen_q, block_m)
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if num_splits == 0:
        num_splits = pick_num_splits(batch * num_heads_k * m_blocks, capacity, block_n,
                                     _multiprocessors(q.device))
    num_splits = max(1, min(num_splits, MAX_SPLITS, cdiv(max(capacity, 1), block_n)))
    merge_m = min(block_m, next_power_of_2(groups * seqlen_q))  # the rows a tile's queries can fill
    dummy = seqlens_k  # stands in for absent optional tensors (never read)
    if num_splits > 1:
        out_partial = torch.empty((num_splits,) + tuple(out.shape), dtype=torch.float32, device=q.device)
        lse_partial = torch.empty((num_splits,) + tuple(softmax_lse.shape), dtype=torch.float32, device=q.device)
        counters = _counters(m_blocks * batch * num_heads_k, q.device)
    else:
        out_partial = lse_partial = counters = dummy
    rows = k_cache.shape[0] * k_cache.shape[1]  # of the (rows, heads_k * d) view TMA reads
    use_tma = (USE_TMA if use_tma is None else use_tma) and (INTERPRET or (
        q.is_cuda and device_capability(q.device)[0] >= 9))
    use_tma = use_tma and all(tma_view_ok(t, rows, block_d, head_dim) for t in (k_cache, v_cache))
    # Paged: a block must lie inside one page, so pages of whole blocks and no left padding.
    use_tma = use_tma and not (paged and (leftpad is not None or k_cache.shape[1] % block_n))
    if use_tma and paged:
        num_stages += PAGED_TMA_EXTRA_STAGES
    switches = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m,
        PAGE_SIZE=k_cache.shape[1] if paged else 1, PAGED=paged,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, IS_SPLIT=num_splits > 1,
        HAS_LEFTPAD=leftpad is not None, HAS_BATCH_ROWS=batch_rows is not None and not paged,
        MERGE_CHUNK=merge_chunk(num_splits, merge_m, block_d), MERGE_M=merge_m,
        PREFETCH=PREFETCH_ROWS if num_splits > 1 and not INTERPRET else 0, PREFETCH_LINES=max(1, block_d // 64),
        UPCAST=INTERPRET or q.dtype == torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=use_tma)

    def launch(blocks, num_warps, num_stages):
        # A smaller fallback block_n (launch_fitting) is fine: splits are whole blocks of any size
        # (and a smaller power of two still divides a page).
        k_arg, v_arg, sources = k_cache, v_cache, ["k_cache", "v_cache"]
        if use_tma:
            k_arg, v_arg = (tma_descriptor(t, rows, blocks[0], block_d) for t in (k_cache, v_cache))
            sources = [("desc", name, d.shape, d.strides) for name, d in (("k_cache", k_arg), ("v_cache", v_arg))]
        launch_into(launches, _decode_kernel, (m_blocks, batch * num_heads_k, num_splits), (
            q, k_arg, v_arg, out, softmax_lse, out_partial, lse_partial, counters, seqlens_k,
            leftpad if leftpad is not None else dummy, batch_rows if batch_rows is not None else dummy,
            block_table if paged else dummy, alibi_slopes if alibi_slopes is not None else dummy, k_cache, v_cache,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2), softmax_lse.stride(0), softmax_lse.stride(1),
            out.numel(), softmax_lse.numel(),
            block_table.stride(0) if paged else 0, alibi_slopes.stride(0) if alibi_slopes is not None else 0,
            seqlen_q, num_heads_k, groups, num_splits, k_cache.shape[1],
            softmax_scale, softcap, window_left, window_right), dict(
            BLOCK_N=blocks[0], **switches, num_warps=num_warps, num_stages=num_stages),
            dict(enumerate(("q", *sources, "out", "softmax_lse", "out_partial", "lse_partial", "counters", "seqlens_k",
                            "leftpad", "batch_rows", "block_table", "alibi", "k_cache", "v_cache"))))

    launch_fitting(("decode", q.device, q.dtype, block_n, num_warps, num_stages, *switches.values()),
                   (block_n,), num_warps, num_stages, launch)
    if launches and None not in launches:
        _PLANS[key] = _Plan(tuple(launches), num_splits, m_blocks * batch * num_heads_k)


class _Plan(NamedTuple):
    """The recorded launch of a decode() call and its buffers: per-split partial results (num_splits > 1)
    and the arrival counters (this stream's buffer, _counters)."""

    launches: tuple
    num_splits: int
    counters_size: int

    def __call__(self, named) -> None:
        out, softmax_lse = named["out"], named["softmax_lse"]
        if self.num_splits > 1:
            device = out.device
            named["out_partial"] = torch.empty((self.num_splits,) + tuple(out.shape), dtype=torch.float32,
                                               device=device)
            named["lse_partial"] = torch.empty((self.num_splits,) + tuple(softmax_lse.shape), dtype=torch.float32,
                                               device=device)
            named["counters"] = _counters(self.counters_size, device)
        else:
            named["out_partial"] = named["lse_partial"] = named["counters"] = named["seqlens_k"]
        for launch in self.launches:
            launch(named)


_PLANS = recorded_launches.Plans()  # the key in decode() -> _Plan
