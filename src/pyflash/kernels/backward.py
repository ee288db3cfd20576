"""FlashAttention-2 backward in Triton: one set of kernels for dense and varlen inputs, every
feature a compile-time switch (see DEVELOPERS.md for the backend contract and the rules).

Three launches:
1. ``_delta_kernel``: delta = rowsum(dO * O) per query row, written to ``softmax_d``; only with atomic dQ
   (or FUSE_DELTA off): otherwise the dQ kernel computes delta and runs first (``FUSED_DELTA``).
2. ``_dkdv_kernel``: one program per (key block, kv head, sequence) holds its K, V tile and dK, dV
   accumulators, and walks the query blocks that see its keys, for every query head of its GQA
   group (no atomics, no expanded copies). Optionally it also adds dS K into an fp32 dQ buffer
   with atomics (``ATOMIC_DQ``), then ``_dq_from_accumulator_kernel`` scales and casts it.
3. ``_dq_kernel`` (when not atomic): one program per (query block, head, sequence) walks the key
   blocks its rows see; a fixed order, so deterministic.

Scores are recomputed as in the forward, in the log2 domain: P = exp2(log2(e) * s - log2(e) * lse).
Given dP = dO V^T (times keep / (1 - p) under dropout) and delta = rowsum(dO * O):
dV = P_dropped^T dO, dS = P * (dP - delta) (times tanh' under softcap),
dK = scale * dS^T Q, dQ = scale * dS K.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from pyflash.kernels import configs, gluon_backward
from pyflash.kernels import launch as recorded_launches
from pyflash.kernels.launch import call_key, current_device, launch_into, optional_tensors
from pyflash.kernels.common import (INTERPRET, alibi_bias, cdiv, device_capability, dropout_keep_tile,
                                     launch_fitting, load_block, load_tile, next_power_of_2, tanh, tma_descriptor,
                                     tma_view_ok, tuned_generation, visible_block_ranges, visible_mask)

LOG2E = math.log2(math.e)
# Query rows per program of the two row-wise kernels (delta, dQ from the fp32 accumulator).
ROW_BLOCK = 64


@triton.jit
def _sequence(batch, cu_seqlens_q, cu_seqlens_k, seqused_k, dense_seqlen_q, dense_seqlen_k,
              IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr):
    """(first query row, seqlen_q, first key row, keys used, keys stored) of sequence ``batch``.
    Keys past the used ones (seqused_k) get dK = dV = 0."""
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + batch)
        seqlen_q = tl.load(cu_seqlens_q + batch + 1) - q_start
        k_start = tl.load(cu_seqlens_k + batch)
        stored_k = tl.load(cu_seqlens_k + batch + 1) - k_start
        if HAS_SEQUSED_K:
            seqlen_k = tl.load(seqused_k + batch)
        else:
            seqlen_k = stored_k
    else:
        q_start = 0
        seqlen_q = dense_seqlen_q
        k_start = 0
        seqlen_k = dense_seqlen_k
        stored_k = dense_seqlen_k
    # 64-bit starts: a varlen start * row stride can pass 2**31.
    return tl.cast(q_start, tl.int64), seqlen_q, tl.cast(k_start, tl.int64), seqlen_k, stored_k


@triton.jit
def _load_rows(ptr, rows, stride_row, row_limit, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr, MMA_DTYPE: tl.constexpr):
    """A (rows, BLOCK_D) tile from ``ptr`` (offset to the sequence and head), 0 where out of bounds."""
    return load_tile(ptr, rows, stride_row, row_limit, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS).to(MMA_DTYPE)


@triton.jit
def _store_rows(ptr, tile, rows, stride_row, row_limit, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride_row + offs_d[None, :]
    tl.store(ptrs, tile.to(ptr.dtype.element_ty), mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _row_lse_log2(lse_ptr, rows, stride_row, seqlen_q, CHECK_ROWS: tl.constexpr):
    """log2(e) * lse of query rows; rows past the sequence get +inf, so P = 0."""
    if CHECK_ROWS:
        lse = tl.load(lse_ptr + rows * stride_row, mask=rows < seqlen_q, other=float("inf"))
    else:
        lse = tl.load(lse_ptr + rows * stride_row)
    return lse * 1.4426950408889634


@triton.jit
def _row_stats(lse_ptr, delta_ptr, rows, stride_row, seqlen_q, CHECK_ROWS: tl.constexpr):
    """log2(e) * lse and delta of query rows (_row_lse_log2; delta 0 past the sequence)."""
    if CHECK_ROWS:
        delta = tl.load(delta_ptr + rows * stride_row, mask=rows < seqlen_q, other=0.0)
    else:
        delta = tl.load(delta_ptr + rows * stride_row)
    return _row_lse_log2(lse_ptr, rows, stride_row, seqlen_q, CHECK_ROWS), delta


@triton.jit
def _score_grads(qk, dp, rows, cols, lse_log2, delta, seqlen_q, seqlen_k, qk_scale, softcap_scale,
                 alibi_slope, window_left, window_right, dropout_p, dropout_scale, philox_seed,
                 philox_offset, bh, start_n, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """The softmax backward of one tile, in either orientation (rows, cols, lse_log2 and delta
    broadcast against qk = q.k and dp = dO.v). Returns the dropped P (which multiplies dO into dV)
    and dS = dL/d(q.k) / softmax_scale (which multiplies K into dQ and Q into dK).
    The keys are start_n + arange(BLOCK_N); KEYS_FIRST: the tile is (keys, queries), rows (1, M)."""
    if HAS_SOFTCAP:
        # s = softcap * tanh(scale * qk / softcap): qk_scale = scale / softcap, softcap_scale = log2(e) * softcap
        capped = tanh(qk * qk_scale)
        s = softcap_scale * capped
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s += alibi_bias(alibi_slope, rows, cols, seqlen_q, seqlen_k)
    p = tl.exp2(s - lse_log2)
    if MASKED:
        visible = visible_mask(rows, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT, True)
        p = tl.where(visible, p, 0.0)
    if HAS_DROPOUT:
        # O = (P * keep / (1 - p_dropout)) V: the same factor scales dP, and dV sees the dropped P.
        if KEYS_FIRST:
            # The mask is drawn (queries, keys), 4 keys per Philox call, then transposed.
            keep = tl.trans(dropout_keep_tile(philox_seed, philox_offset, dropout_p, bh, tl.trans(rows),
                                              start_n, BLOCK_N))
        else:
            keep = dropout_keep_tile(philox_seed, philox_offset, dropout_p, bh, rows, start_n, BLOCK_N)
        # keep (i1) meets P and dP directly: the layout change from the mask's tile to the MMA layout
        # then moves 1 byte an element through shared memory (a fp32 keep_scale cost 4: past Hopper's
        # 227 KB in the dQ kernel with (128, 128, 8, 2)).
        p_dropped = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        p_dropped = p
    ds = p * (dp - delta)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    return p_dropped, ds


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_src, do_src, tma_row, tma_col, lse_ptr, delta_ptr, dq_ptr, stride_qm, stride_dom,
               stride_dqm, stride_lse_m, row_lo, row_hi, start_n, cols, offs_d, seqlen_q, seqlen_k, qk_scale,
               softcap_scale, alibi_slope, window_left, window_right, dropout_p, dropout_scale, philox_seed,
               philox_offset, bh,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
               MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
               IS_VARLEN: tl.constexpr, DQ_TMA: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [row_lo, row_hi). Tiles are
    (keys, queries): the accumulators take them without a transpose. Q and dO come from q_src and
    do_src (TMA descriptors read at row tma_row + start_m, column tma_col, or pointers). ATOMIC_DQ: dS K
    is added into dq_ptr, element by element, or DQ_TMA one tile at a time by a TMA reduce through the
    descriptor dq_ptr (at [tma_row + start_m, tma_col]; rows past the sequence add dS = 0)."""
    for start_m in range(row_lo, row_hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        # Through TMA, varlen rows past the sequence may be NaN (padding): zeroed in masked blocks.
        q = load_block(q_src, tma_row + start_m, tma_col, rows, stride_qm, seqlen_q, offs_d, HEAD_DIM, BLOCK_D,
                       MASKED, USE_TMA, MASKED and IS_VARLEN).to(MMA_DTYPE)
        do = load_block(do_src, tma_row + start_m, tma_col, rows, stride_dom, seqlen_q, offs_d, HEAD_DIM,
                        BLOCK_D, MASKED, USE_TMA, MASKED and IS_VARLEN).to(MMA_DTYPE)
        lse_log2, delta = _row_stats(lse_ptr, delta_ptr, rows, stride_lse_m, seqlen_q, MASKED)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        p_t, ds_t = _score_grads(qk_t, dp_t, rows[None, :], cols[:, None], lse_log2[None, :], delta[None, :],
                                 seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left,
                                 window_right, dropout_p, dropout_scale, philox_seed, philox_offset, bh, start_n,
                                 MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, BLOCK_N, True)
        ds_t = ds_t.to(MMA_DTYPE)
        dv = tl.dot(p_t.to(MMA_DTYPE), do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            if DQ_TMA:
                dq_ptr.atomic_add([tma_row + start_m, tma_col], dq)
            else:
                dq_ptrs = dq_ptr + rows[:, None] * stride_dqm + offs_d[None, :]
                tl.atomic_add(dq_ptrs, dq, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM),
                              sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(
    q, k, v, dout, softmax_lse, softmax_d, dq_accum, dk, dv, alibi_slopes,
    cu_seqlens_q, cu_seqlens_k, seqused_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_lse_b, stride_lse_h, stride_lse_m, stride_alibi_b, stride_alibi_h,
    num_heads, group_size, dense_seqlen_q, dense_seqlen_k, softmax_scale, qk_scale, softcap_scale,
    window_left, window_right, dropout_p, dropout_scale, philox_seed, philox_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr = False,
    DQ_TMA: tl.constexpr = False,
):
    """DQ_TMA (with ATOMIC_DQ): dq_accum is a TMA descriptor over the fp32 accumulator viewed as
    (rows, heads * head_dim), tiles (BLOCK_M, BLOCK_D), which takes dS K by reduce-adds."""
    # Key blocks vary fastest: programs running together share one head's Q and dO in L2.
    start_n = tl.program_id(0) * BLOCK_N
    head_k = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)  # 64-bit base offsets: batch * stride can pass 2**31
    q_start, seqlen_q, k_start, seqlen_k, stored_k = _sequence(
        batch, cu_seqlens_q, cu_seqlens_k, seqused_k, dense_seqlen_q, dense_seqlen_k, IS_VARLEN, HAS_SEQUSED_K)
    if start_n >= stored_k:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_tile = _load_rows(k + batch * stride_kb + k_start * stride_kn + head_k * stride_kh, cols, stride_kn,
                        seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True, MMA_DTYPE)
    v_tile = _load_rows(v + batch * stride_vb + k_start * stride_vn + head_k * stride_vh, cols, stride_vn,
                        seqlen_k, offs_d, HEAD_DIM, BLOCK_D, True, MMA_DTYPE)
    dk_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    row_lo, full_lo, full_hi, row_hi = visible_block_ranges(
        start_n, seqlen_k, seqlen_q, seqlen_q - seqlen_k, window_right, window_left,
        BLOCK_N, BLOCK_M, HAS_RIGHT, HAS_LEFT)
    if start_n + BLOCK_N > seqlen_k:
        # Keys past seqlen_k load as 0 but their P need not vanish: mask every query block.
        full_hi = full_lo
    # Q, dO rows of this sequence in the (rows, heads * d) view that TMA reads.
    tma_row = (batch * dense_seqlen_q + q_start).to(tl.int32)
    for head in range(head_k * group_size, (head_k + 1) * group_size):
        if USE_TMA:
            q_src = q
            do_src = dout
        else:
            q_src = q + batch * stride_qb + q_start * stride_qm + head * stride_qh
            do_src = dout + batch * stride_dob + q_start * stride_dom + head * stride_doh
        tma_col = head * HEAD_DIM
        if DQ_TMA:
            dq_ptr = dq_accum
        else:
            dq_ptr = dq_accum + batch * stride_dqb + q_start * stride_dqm + head * stride_dqh
        stats_offset = batch * stride_lse_b + head * stride_lse_h + q_start * stride_lse_m
        lse_ptr = softmax_lse + stats_offset
        delta_ptr = softmax_d + stats_offset
        alibi_slope = 0.0
        if HAS_ALIBI:
            alibi_slope = tl.load(alibi_slopes + batch * stride_alibi_b + head * stride_alibi_h) * 1.4426950408889634
        bh = batch * num_heads + head
        dk_acc, dv_acc = _dkdv_loop(
            dk_acc, dv_acc, k_tile, v_tile, q_src, do_src, tma_row, tma_col, lse_ptr, delta_ptr, dq_ptr,
            stride_qm, stride_dom, stride_dqm, stride_lse_m, row_lo, full_lo, start_n, cols, offs_d, seqlen_q,
            seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left, window_right, dropout_p, dropout_scale,
            philox_seed, philox_offset, bh,
            True, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ATOMIC_DQ, MMA_DTYPE, DOT_PRECISION, USE_TMA, IS_VARLEN, DQ_TMA)
        dk_acc, dv_acc = _dkdv_loop(
            dk_acc, dv_acc, k_tile, v_tile, q_src, do_src, tma_row, tma_col, lse_ptr, delta_ptr, dq_ptr,
            stride_qm, stride_dom, stride_dqm, stride_lse_m, full_lo, full_hi, start_n, cols, offs_d, seqlen_q,
            seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left, window_right, dropout_p, dropout_scale,
            philox_seed, philox_offset, bh,
            False, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ATOMIC_DQ, MMA_DTYPE, DOT_PRECISION, USE_TMA, IS_VARLEN, DQ_TMA)
        dk_acc, dv_acc = _dkdv_loop(
            dk_acc, dv_acc, k_tile, v_tile, q_src, do_src, tma_row, tma_col, lse_ptr, delta_ptr, dq_ptr,
            stride_qm, stride_dom, stride_dqm, stride_lse_m, full_hi, row_hi, start_n, cols, offs_d, seqlen_q,
            seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left, window_right, dropout_p, dropout_scale,
            philox_seed, philox_offset, bh,
            True, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
            ATOMIC_DQ, MMA_DTYPE, DOT_PRECISION, USE_TMA, IS_VARLEN, DQ_TMA)
    _store_rows(dk + batch * stride_dkb + k_start * stride_dkn + head_k * stride_dkh, dk_acc * softmax_scale,
                cols, stride_dkn, stored_k, offs_d, HEAD_DIM)
    _store_rows(dv + batch * stride_dvb + k_start * stride_dvn + head_k * stride_dvh, dv_acc,
                cols, stride_dvn, stored_k, offs_d, HEAD_DIM)


@triton.jit
def _dq_loop(dq, q, do, lse_log2, delta, k_src, v_src, tma_row, tma_col, stride_kn, stride_vn, col_lo, col_hi,
             rows, offs_d, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left, window_right,
             dropout_p, dropout_scale, philox_seed, philox_offset, bh,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MMA_DTYPE: tl.constexpr,
             DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [col_lo, col_hi). K and V come from
    k_src and v_src (TMA descriptors read at row tma_row + start_n, column tma_col, or pointers)."""
    for start_n in range(col_lo, col_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        # Through TMA, varlen keys past the sequence may be NaN (unused cache slots): zeroed in masked blocks.
        k = load_block(k_src, tma_row + start_n, tma_col, cols, stride_kn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D,
                       MASKED, USE_TMA, MASKED and IS_VARLEN).to(MMA_DTYPE)
        v = load_block(v_src, tma_row + start_n, tma_col, cols, stride_vn, seqlen_k, offs_d, HEAD_DIM, BLOCK_D,
                       MASKED, USE_TMA, MASKED and IS_VARLEN).to(MMA_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        _, ds = _score_grads(qk, dp, rows[:, None], cols[None, :], lse_log2[:, None], delta[:, None],
                             seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left,
                             window_right, dropout_p, dropout_scale, philox_seed, philox_offset, bh, start_n,
                             MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, BLOCK_N, False)
        dq = tl.dot(ds.to(MMA_DTYPE), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    q, k, v, dout, out, softmax_lse, softmax_d, dq, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh, stride_ob, stride_om, stride_oh, stride_dqb, stride_dqm, stride_dqh,
    stride_lse_b, stride_lse_h, stride_lse_m, stride_alibi_b, stride_alibi_h,
    num_heads, group_size, dense_seqlen_q, dense_seqlen_k, softmax_scale, qk_scale, softcap_scale,
    window_left, window_right, dropout_p, dropout_scale, philox_seed, philox_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MMA_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr = False,
    FUSED_DELTA: tl.constexpr = False,
):
    """FUSED_DELTA: delta = rowsum(dO * O) of the block's rows is computed here (dO is loaded anyway) and
    stored to softmax_d, in place of _delta_kernel; the dK/dV kernel, launched after this one, reads it."""
    # Query blocks vary fastest: programs running together share one head's K and V in L2. (Taking the
    # last, heaviest-under-causal, blocks first measured 3-6% slower at d=128 on H100: RESULTS.md.)
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_start, seqlen_q, k_start, seqlen_k, _ = _sequence(
        batch, cu_seqlens_q, cu_seqlens_k, seqused_k, dense_seqlen_q, dense_seqlen_k, IS_VARLEN, HAS_SEQUSED_K)
    if start_m >= seqlen_q:
        return
    head_k = head // group_size
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_tile = _load_rows(q + batch * stride_qb + q_start * stride_qm + head * stride_qh, rows, stride_qm,
                        seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True, MMA_DTYPE)
    do_tile = _load_rows(dout + batch * stride_dob + q_start * stride_dom + head * stride_doh, rows, stride_dom,
                         seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True, MMA_DTYPE)
    stats_offset = batch * stride_lse_b + head * stride_lse_h + q_start * stride_lse_m
    if FUSED_DELTA:
        o_tile = _load_rows(out + batch * stride_ob + q_start * stride_om + head * stride_oh, rows, stride_om,
                            seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True, tl.float32)
        delta = tl.sum(o_tile * do_tile.to(tl.float32), axis=1)
        tl.store(softmax_d + stats_offset + rows * stride_lse_m, delta, mask=rows < seqlen_q)
        lse_log2 = _row_lse_log2(softmax_lse + stats_offset, rows, stride_lse_m, seqlen_q, True)
    else:
        lse_log2, delta = _row_stats(softmax_lse + stats_offset, softmax_d + stats_offset, rows, stride_lse_m,
                                     seqlen_q, True)
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(alibi_slopes + batch * stride_alibi_b + head * stride_alibi_h) * 1.4426950408889634
    bh = batch * num_heads + head
    if USE_TMA:
        k_src = k
        v_src = v
    else:
        k_src = k + batch * stride_kb + k_start * stride_kn + head_k * stride_kh
        v_src = v + batch * stride_vb + k_start * stride_vn + head_k * stride_vh
    # K, V rows of this sequence and the kv head's columns in the (rows, heads_k * d) view that TMA reads.
    tma_row = (batch * dense_seqlen_k + k_start).to(tl.int32)
    tma_col = head_k * HEAD_DIM
    col_lo, full_lo, full_hi, col_hi = visible_block_ranges(
        start_m, seqlen_q, seqlen_k, seqlen_k - seqlen_q, window_left, window_right,
        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq_acc = _dq_loop(dq_acc, q_tile, do_tile, lse_log2, delta, k_src, v_src, tma_row, tma_col,
                      stride_kn, stride_vn, col_lo, full_lo,
                      rows, offs_d, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left,
                      window_right, dropout_p, dropout_scale, philox_seed, philox_offset, bh,
                      True, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                      HAS_DROPOUT, MMA_DTYPE, DOT_PRECISION, USE_TMA, IS_VARLEN)
    dq_acc = _dq_loop(dq_acc, q_tile, do_tile, lse_log2, delta, k_src, v_src, tma_row, tma_col,
                      stride_kn, stride_vn, full_lo, full_hi,
                      rows, offs_d, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left,
                      window_right, dropout_p, dropout_scale, philox_seed, philox_offset, bh,
                      False, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                      HAS_DROPOUT, MMA_DTYPE, DOT_PRECISION, USE_TMA, IS_VARLEN)
    dq_acc = _dq_loop(dq_acc, q_tile, do_tile, lse_log2, delta, k_src, v_src, tma_row, tma_col,
                      stride_kn, stride_vn, full_hi, col_hi,
                      rows, offs_d, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope, window_left,
                      window_right, dropout_p, dropout_scale, philox_seed, philox_offset, bh,
                      True, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                      HAS_DROPOUT, MMA_DTYPE, DOT_PRECISION, USE_TMA, IS_VARLEN)
    _store_rows(dq + batch * stride_dqb + q_start * stride_dqm + head * stride_dqh, dq_acc * softmax_scale,
                rows, stride_dqm, seqlen_q, offs_d, HEAD_DIM)


@triton.jit
def _delta_kernel(out, dout, softmax_d, dq_accum, cu_seqlens_q, stride_ob, stride_om, stride_oh,
                  stride_dob, stride_dom, stride_doh, stride_d_b, stride_d_h, stride_d_m,
                  stride_ab, stride_am, stride_ah, dense_seqlen_q,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                  ZERO_DQ: tl.constexpr = False):
    """softmax_d = rowsum(dO * O) in fp32; ZERO_DQ: the rows of the fp32 dQ accumulator zeroed too (atomic dQ
    adds into it; no fill launch of its own)."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_start, seqlen_q, _, _, _ = _sequence(batch, cu_seqlens_q, cu_seqlens_q, cu_seqlens_q, dense_seqlen_q,
                                           dense_seqlen_q, IS_VARLEN, False)
    if start_m >= seqlen_q:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(out + batch * stride_ob + q_start * stride_om + head * stride_oh, rows, stride_om, seqlen_q,
                   offs_d, HEAD_DIM, BLOCK_D, True, tl.float32)
    do = _load_rows(dout + batch * stride_dob + q_start * stride_dom + head * stride_doh, rows, stride_dom,
                    seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True, tl.float32)
    tl.store(softmax_d + batch * stride_d_b + head * stride_d_h + (q_start + rows) * stride_d_m,
             tl.sum(o * do, axis=1), mask=rows < seqlen_q)
    if ZERO_DQ:
        _store_rows(dq_accum + batch * stride_ab + q_start * stride_am + head * stride_ah,
                    tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), rows, stride_am, seqlen_q, offs_d, HEAD_DIM)


@triton.jit
def _dq_from_accumulator_kernel(dq_accum, dq, cu_seqlens_q, stride_ab, stride_am, stride_ah,
                                stride_dqb, stride_dqm, stride_dqh, dense_seqlen_q, softmax_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                IS_VARLEN: tl.constexpr):
    """dq = softmax_scale * (the fp32 sum of dS K that the dK/dV programs added atomically)."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_start, seqlen_q, _, _, _ = _sequence(batch, cu_seqlens_q, cu_seqlens_q, cu_seqlens_q, dense_seqlen_q,
                                           dense_seqlen_q, IS_VARLEN, False)
    if start_m >= seqlen_q:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    acc = _load_rows(dq_accum + batch * stride_ab + q_start * stride_am + head * stride_ah, rows, stride_am,
                     seqlen_q, offs_d, HEAD_DIM, BLOCK_D, True, tl.float32)
    _store_rows(dq + batch * stride_dqb + q_start * stride_dqm + head * stride_dqh, acc * softmax_scale,
                rows, stride_dqm, seqlen_q, offs_d, HEAD_DIM)


_GENERATIONS = sorted({key[0] for key in configs.BACKWARD if key[0] > 0})


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


class BackwardConfig(NamedTuple):
    """One row of configs.BACKWARD, named."""

    dkdv: Tuple[int, int, int, int]  # (block_m, block_n, num_warps, num_stages) of the dK/dV kernel
    dq: Tuple[int, int, int, int]  # the same for the dQ kernel
    atomic_dq: bool  # when not deterministic: dQ by fp32 atomics inside the dK/dV kernel
    tma: bool = True  # Hopper: the loops' tiles through TMA descriptors


def backward_config(q: torch.Tensor, head_dim: int, causal: bool, dropout: bool = False) -> BackwardConfig:
    """The tuning row of configs.BACKWARD (with dropout: configs.BACKWARD_DROPOUT's where it has one) for q's
    device, dtype and head dim."""
    major = 0
    if q.is_cuda and not INTERPRET:
        major = device_capability(q.device)[0]
    key = (tuned_generation(major, _GENERATIONS), q.element_size(), _block_d(head_dim), causal)
    row = configs.BACKWARD_DROPOUT.get(key) if dropout else None
    return BackwardConfig(*(row or configs.BACKWARD[key]))


def _row_strides(t: torch.Tensor, varlen: bool):
    """(batch, row, head) strides of a (b, s, h, d) or varlen (total, h, d) tensor."""
    return (0, t.stride(0), t.stride(1)) if varlen else t.stride()[:3]


def _stat_strides(t: torch.Tensor, varlen: bool):
    """(batch, head, row) strides of a (b, h, s) or varlen (h, total) tensor."""
    return (0, t.stride(0), t.stride(1)) if varlen else t.stride()


# Head dims where the Gluon backward (kernels/gluon_backward.py) runs the calls it supports: it measured
# faster than these kernels at d=128 (473 vs 396 TFLOP/s at s=4096, causal 420 vs 314), slower at
# d=64 (331 vs 373, causal 312 vs 331) on an H100 (benchmarks/RESULTS.md). Deterministic calls only where
# it has two passes (gluon_backward.two_pass: d=128, 256): its deterministic mode (dQ tiles in a fixed order of key
# blocks) measured 296 / 255 TFLOP/s against these kernels' 401 / 313 (d=128 s=4096;
# scripts/deterministic_check.py). At d=256 its split_d layout measured 352 / 274 TFLOP/s against these
# kernels' 244 / 216 (bf16 s=4096, H200; python -m pyflash.bench). At d=64 its two passes (the first pass,
# then the Gluon dQ kernel) took 1.09-1.20x these kernels' time (bf16 s=1024-16384, H100, thirteenth session).
GLUON_HEAD_DIMS = frozenset({128, 256})
# Whether the dQ kernel computes delta = rowsum(dO * O) (FUSED_DELTA; it then runs before the dK/dV kernel) instead
# of a _delta_kernel launch of its own: one launch and one read of dO fewer (~50 us a call at BENCHMARK.md's
# 16k tokens x 2048 features). Not yet timed on a GPU (benchmarks/RESULTS.md, fourteenth session).
FUSE_DELTA = True
# Plan sources (launch.Launch) of the kernels' four optional tensors, in their argument order (`tensors` below).
TENSOR_SOURCES = ("alibi", "cu_q", "cu_k", "seqused_k")


class _Plan(NamedTuple):
    """The recorded launches of one backward() call through these kernels and its buffers: delta (a
    tensor of its own when softmax_d's strides differ from softmax_lse's) and the fp32 dQ accumulator (which
    the delta kernel zeroes)."""

    launches: tuple
    separate_delta: bool
    accumulate_dq: bool

    def __call__(self, named) -> None:
        named["delta"] = torch.empty_like(named["softmax_lse"]) if self.separate_delta else named["softmax_d"]
        dq = named["dq"]
        named["dq_target"] = torch.empty(dq.shape, dtype=torch.float32, device=dq.device) if self.accumulate_dq else dq
        for launch in self.launches:
            launch(named)
        if self.separate_delta:
            named["softmax_d"].copy_(named["delta"])


_PLANS = recorded_launches.Plans()  # launch.call_key -> _Plan


def _named_tensors(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens):
    """A call's tensors by the names plan sources (launch.Launch) use (absent ones: softmax_lse, never read)."""
    return dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, dq=dq, dk=dk, dv=dv, softmax_d=softmax_d,
                **optional_tensors(params, seqlens, softmax_lse))


def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, deterministic,
             config=None, use_tma=None, kernel=None, dq_only=False, delta_ready=False, fuse_delta=None) -> None:
    """Fill dq, dk, dv and softmax_d per the backend contract (DEVELOPERS.md).

    kernel: None runs the Gluon backward where it handles the call (GLUON_HEAD_DIMS, deterministic only where
    gluon_backward.two_pass, and what gluon_backward.supported accepts) and these Triton kernels
    elsewhere; "triton" always runs the latter (so does an explicit config or use_tma).

    config: a BackwardConfig (or a configs.BACKWARD row) instead of the table's (tuning and tests; no
    fallback to smaller tiles then); use_tma: force the loops' TMA loads (Q, dO in the dK/dV kernel;
    K, V in the dQ kernel) on or off, or a pair (dK/dV kernel, dQ kernel) (default: the config's tma
    on Hopper, when the tensors allow it). dq_only: dq and softmax_d alone, from the dQ kernel (a fixed
    order, so deterministic); the dK/dV kernel is not launched and dk, dv are not touched (a caller
    that has them from elsewhere, as the Gluon split_d kernel without its dQ work); delta_ready (with
    dq_only): softmax_d already holds rowsum(dO * O) (that kernel's preprocess wrote it), so the delta
    kernel is skipped where softmax_d can serve as delta (softmax_lse's strides). fuse_delta: whether the dQ
    kernel computes delta (launched first, no delta kernel; not with atomic dQ); None: FUSE_DELTA."""
    varlen = seqlens.is_varlen
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_heads_k = k.shape[-2]
    batch = seqlens.batch_size
    max_seqlen_q, max_seqlen_k = seqlens.max_seqlen_q, seqlens.max_seqlen_k
    if batch == 0:
        return
    if kernel not in (None, "triton"):
        raise ValueError(f"kernel must be None or 'triton', got {kernel!r}")
    # Deterministic calls: the Gluon backward's two passes where it has them (gluon_backward.two_pass), else
    # these kernels (the Gluon kernel's own deterministic mode is slower, above).
    if (kernel is None and config is None and use_tma is None and head_dim in GLUON_HEAD_DIMS and not dq_only
            and (not deterministic or gluon_backward.two_pass(head_dim, params.is_causal, True))
            and gluon_backward.try_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens,
                                            deterministic)):
        return
    launches = key = None
    if (recorded_launches.RECORD_TRITON and config is None and use_tma is None and fuse_delta is None
            and params.dropout_p == 0
            and q.is_cuda and not INTERPRET):
        # A call like an earlier one replays its recorded launches (kernels/launch.py).
        named = _named_tensors(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens)
        # Dropout calls have no plan: their seed and offset are arguments that change every call.
        key = call_key(named.values(), params, seqlens, deterministic, current_device(), dq_only, delta_ready)
        plan = _PLANS.get(key)
        if plan is not None:
            plan(named)
            return
        launches = []
    block_d = _block_d(head_dim)
    cfg = BackwardConfig(*(config or backward_config(q, head_dim, params.is_causal, params.dropout_p > 0)))
    dkdv_block_m, dkdv_block_n, dkdv_warps, dkdv_stages = cfg.dkdv
    dq_block_m, dq_block_n, dq_warps, dq_stages = cfg.dq
    atomic_dq = cfg.atomic_dq and not deterministic and not dq_only
    # softmax_d shares softmax_lse's layout: one set of strides serves both.
    delta = softmax_d if softmax_d.stride() == softmax_lse.stride() else torch.empty_like(softmax_lse)
    dummy = softmax_lse  # stands in for absent tensors; never read (its switch is off)
    cu_q = seqlens.cu_seqlens_q if varlen else dummy
    cu_k = seqlens.cu_seqlens_k if varlen else dummy
    dense_seqlen_q, dense_seqlen_k = (0, 0) if varlen else (q.shape[1], k.shape[1])
    stat_strides = _stat_strides(softmax_lse, varlen)

    need_delta = max_seqlen_q > 0 and not (dq_only and delta_ready and delta is softmax_d)
    # Without atomic dQ the dQ kernel runs first and computes delta itself (FUSED_DELTA), no _delta_kernel.
    fused_delta = need_delta and not atomic_dq and (FUSE_DELTA if fuse_delta is None else fuse_delta)
    # Atomic dQ adds into an fp32 buffer, which the delta kernel zeroes (it runs whenever there are queries).
    dq_target = torch.empty(dq.shape, dtype=torch.float32, device=dq.device) if atomic_dq else dq
    if need_delta and not fused_delta:
        grid = (cdiv(max_seqlen_q, ROW_BLOCK), num_heads, batch)
        launch_into(launches, _delta_kernel, grid, (out, dout, delta, dq_target, cu_q, *_row_strides(out, varlen),
                                                *_row_strides(dout, varlen), *stat_strides,
                                                *_row_strides(dq_target, varlen), dense_seqlen_q),
                dict(HEAD_DIM=head_dim, BLOCK_M=ROW_BLOCK, BLOCK_D=block_d, IS_VARLEN=varlen, ZERO_DQ=atomic_dq),
                {0: "out", 1: "dout", 2: "delta", 3: "dq_target", 4: "cu_q"})

    softcap, scale = params.softcap, params.softmax_scale
    qk_scale, softcap_scale = (scale / softcap, softcap * LOG2E) if softcap > 0 else (scale * LOG2E, 0.0)
    alibi = params.alibi_slopes
    common_args = (
        num_heads, num_heads // num_heads_k, dense_seqlen_q, dense_seqlen_k, scale, qk_scale, softcap_scale,
        params.window_left, params.window_right, params.dropout_p, 1.0 / (1.0 - params.dropout_p),
        params.philox_seed, params.philox_offset)
    switches = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen,
        HAS_SEQUSED_K=varlen and seqlens.seqused_k is not None,
        HAS_LEFT=params.window_left >= 0, HAS_RIGHT=params.window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi is not None, HAS_DROPOUT=params.dropout_p > 0,
        MMA_DTYPE=tl.float32 if INTERPRET or q.dtype == torch.float32 else
        {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[q.dtype],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    tensors = (alibi if alibi is not None else dummy, cu_q, cu_k,
               seqlens.seqused_k if varlen and seqlens.seqused_k is not None else dummy)
    input_strides = (*_row_strides(q, varlen), *_row_strides(k, varlen), *_row_strides(v, varlen),
                     *_row_strides(dout, varlen))
    alibi_strides = alibi.stride() if alibi is not None else (0, 0)

    hopper = q.is_cuda and not INTERPRET and device_capability(q.device)[0] >= 9
    if use_tma is None:
        use_tma = cfg.tma and hopper
    tma_dkdv, tma_dq = use_tma if isinstance(use_tma, tuple) else (use_tma, use_tma)
    q_rows = q.shape[0] if varlen else batch * dense_seqlen_q
    kv_rows = k.shape[0] if varlen else batch * dense_seqlen_k
    tma_q = tma_dkdv and all(tma_view_ok(t, q_rows, block_d, head_dim) for t in (q, dout))
    tma_kv = tma_dq and all(tma_view_ok(t, kv_rows, block_d, head_dim) for t in (k, v))

    # Atomic dQ on Hopper: one TMA reduce-add a tile into the fresh contiguous fp32 buffer (DQ_TMA), not one
    # atomic an element; under the interpreter (common.py adds the reduce) where the caller asks for TMA loads.
    dq_tma = (atomic_dq and (tma_dkdv if INTERPRET else hopper)
              and tma_view_ok(dq_target, q_rows, block_d, head_dim))
    # The table's tiles that outgrow a smaller part's shared memory fall back to smaller ones
    # (common.launch_fitting); a config given by the caller (tuning, tests) runs as given.
    fit_key = (q.device, atomic_dq, cfg, tma_q, tma_kv, dq_tma, *switches.values())

    def run(name, blocks, num_warps, num_stages, launch):
        if config is not None:
            launch(blocks, num_warps, num_stages)
        else:
            launch_fitting((name, *fit_key), blocks, num_warps, num_stages, launch)

    if max_seqlen_k > 0:
        def launch_dkdv(blocks, num_warps, num_stages):
            block_m, block_n = blocks
            q_arg, dout_arg, q_src, dout_src = q, dout, "q", "dout"
            if tma_q:
                q_arg, dout_arg = (tma_descriptor(t, q_rows, block_m, block_d) for t in (q, dout))
                q_src, dout_src = (("desc", name, d.shape, d.strides) for name, d in (("q", q_arg), ("dout", dout_arg)))
            dq_arg, dq_src = dq_target, "dq_target"
            if dq_tma:
                dq_arg = tma_descriptor(dq_target, q_rows, block_m, block_d)
                dq_src = ("desc", "dq_target", dq_arg.shape, dq_arg.strides)
            launch_into(launches, _dkdv_kernel, (cdiv(max_seqlen_k, block_n), num_heads_k, batch), (
                q_arg, k, v, dout_arg, softmax_lse, delta, dq_arg, dk, dv, *tensors,
                *input_strides, *_row_strides(dq_target, varlen), *_row_strides(dk, varlen),
                *_row_strides(dv, varlen), *stat_strides, *alibi_strides, *common_args), dict(
                BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC_DQ=atomic_dq, USE_TMA=tma_q, DQ_TMA=dq_tma, **switches,
                num_warps=num_warps, num_stages=num_stages), dict(enumerate(
                (q_src, "k", "v", dout_src, "softmax_lse", "delta", dq_src, "dk", "dv", *TENSOR_SOURCES))))

        if not dq_only and not fused_delta:
            run("dkdv", (dkdv_block_m, dkdv_block_n), dkdv_warps, dkdv_stages, launch_dkdv)
    if max_seqlen_q > 0 and atomic_dq:
        grid = (cdiv(max_seqlen_q, ROW_BLOCK), num_heads, batch)
        launch_into(launches, _dq_from_accumulator_kernel, grid, (
            dq_target, dq, cu_q, *_row_strides(dq_target, varlen), *_row_strides(dq, varlen), dense_seqlen_q,
            scale), dict(HEAD_DIM=head_dim, BLOCK_M=ROW_BLOCK, BLOCK_D=block_d, IS_VARLEN=varlen),
            {0: "dq_target", 1: "dq", 2: "cu_q"})
    elif max_seqlen_q > 0:
        def launch_dq(blocks, num_warps, num_stages):
            block_m, block_n = blocks
            k_arg, v_arg, k_src, v_src = k, v, "k", "v"
            if tma_kv:
                k_arg, v_arg = (tma_descriptor(t, kv_rows, block_n, block_d) for t in (k, v))
                k_src, v_src = (("desc", name, d.shape, d.strides) for name, d in (("k", k_arg), ("v", v_arg)))
            launch_into(launches, _dq_kernel, (cdiv(max_seqlen_q, block_m), num_heads, batch), (
                q, k_arg, v_arg, dout, out, softmax_lse, delta, dq, *tensors, *input_strides,
                *_row_strides(out, varlen), *_row_strides(dq, varlen), *stat_strides, *alibi_strides, *common_args),
                dict(BLOCK_M=block_m, BLOCK_N=block_n, USE_TMA=tma_kv, FUSED_DELTA=fused_delta, **switches,
                     num_warps=num_warps, num_stages=num_stages), dict(enumerate(
                    ("q", k_src, v_src, "dout", "out", "softmax_lse", "delta", "dq", *TENSOR_SOURCES))))

        run("dq", (dq_block_m, dq_block_n), dq_warps, dq_stages, launch_dq)
        if fused_delta and max_seqlen_k > 0 and not dq_only:
            run("dkdv", (dkdv_block_m, dkdv_block_n), dkdv_warps, dkdv_stages, launch_dkdv)
    if delta is not softmax_d:
        softmax_d.copy_(delta)
    if launches and None not in launches:
        _PLANS[key] = _Plan(tuple(launches), delta is not softmax_d, atomic_dq)
