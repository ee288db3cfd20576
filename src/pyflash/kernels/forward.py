"""FlashAttention-2 forward in Triton: one kernel for dense and varlen inputs, every feature a
compile-time switch (see DEVELOPERS.md for the backend contract and the rules it implements).

Each program owns one block of BLOCK_M query rows of one (sequence, head) and walks only the key
blocks its rows can see. The key range splits into blocks that need masking (window edges, the
diagonal, the end of the keys) and blocks every row sees whole; the latter run a loop that carries
no mask code. Scores live in the log2 domain (log2(e) folded into the scale) so the online softmax
uses exp2.

Loads: on Hopper, Q/K/V tiles come through TMA descriptors over the (rows, heads * d) view when the
layout allows it (head dim a power of two, rows of one stride); otherwise (Ampere, the interpreter,
padded head dims, odd strides) through masked pointer loads. Tuning: configs.FORWARD.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from pyflash.kernels import gluon_forward
from pyflash.kernels.common import (INTERPRET, alibi_bias, cdiv, device_capability, dropout_keep_tile,
                                     launch_fitting, load_block, next_power_of_2, tanh, tma_descriptor, tma_view_ok,
                                     tuned_generation, visible_block_ranges, visible_mask)
from pyflash.kernels.configs import FORWARD, FORWARD_DROPOUT_MIN_WARPS
from pyflash.kernels import launch as recorded_launches
from pyflash.kernels.launch import call_key, current_device, launch_into, optional_tensors

LOG2E = math.log2(math.e)


@triton.jit
def _load_rows(src, tma_row, tma_col, rows, stride_row, row_limit, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr,
               CHECK_ROWS: tl.constexpr, UPCAST: tl.constexpr, ZERO_TAIL: tl.constexpr = False):
    """A (rows, BLOCK_D) tile of K or V (common.load_block). Through TMA, rows past the sequence read
    whatever follows it: K's scores there are masked, V's rows are zeroed where that may be NaN."""
    tile = load_block(src, tma_row, tma_col, rows, stride_row, row_limit, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS,
                      USE_TMA, ZERO_TAIL)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _scores(q, k, rows, cols, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope,
            window_left, window_right, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
            HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """log2(e) * s for q (M, D) against k (N, D): -inf where the key is not visible (MASKED)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        # softcap * tanh(scale * qk / softcap): qk_scale = scale / softcap, softcap_scale = log2(e) * softcap
        s = softcap_scale * tanh(qk * qk_scale)
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s += alibi_bias(alibi_slope, rows[:, None], cols[None, :], seqlen_q, seqlen_k)
    if MASKED:
        visible = visible_mask(rows[:, None], cols[None, :], seqlen_q, seqlen_k, window_left, window_right,
                               HAS_LEFT, HAS_RIGHT, True)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _attend(acc, l_i, m_i, q, k_src, v_src, kv_row, kv_col, stride_kn, stride_vn,
            key_lo, key_hi, rows, offs_n, offs_d, seqlen_q, seqlen_k,
            qk_scale, softcap_scale, alibi_slope, window_left, window_right,
            dropout_p, philox_seed, philox_offset, bh,
            MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
            UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Online softmax over the key blocks [key_lo, key_hi): running max m_i, running sum l_i (both of
    the undropped probabilities) and the unnormalised output acc."""
    for start_n in tl.range(key_lo, key_hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        k = _load_rows(k_src, kv_row + start_n, kv_col, cols, stride_kn, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, USE_TMA, MASKED, UPCAST)
        s = _scores(q, k, rows, cols, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope,
                    window_left, window_right, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                    DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row that has seen no visible key keeps m = -inf; subtracting 0 makes its p and alpha 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep_tile(philox_seed, philox_offset, dropout_p, bh, rows[:, None], start_n, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        # Past a varlen sequence's keys TMA reads anything (an unused KV-cache slot, padding: NaN).
        # Dense rows past the keys are the next batch's (the caller's data) or TMA's zero fill.
        v = _load_rows(v_src, kv_row + start_n, kv_col, cols, stride_vn, seqlen_k, offs_d,
                       HEAD_DIM, BLOCK_D, USE_TMA, MASKED, UPCAST, MASKED and IS_VARLEN)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _forward_kernel(
    q, k, v, out, softmax_lse, probs, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_lm,
    stride_pb, stride_ph, stride_pm, stride_pn, stride_ab, stride_ah,
    num_heads, head_group, dense_seqlen_q, dense_seqlen_k,
    qk_scale, softcap_scale, window_left, window_right, dropout_p, philox_seed, philox_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED_K: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    RETURN_SOFTMAX: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ONE_PASS: tl.constexpr = False, ONE_PASS_MASKED: tl.constexpr = True, WARP_SPECIALIZE: tl.constexpr = False,
):
    batch = tl.program_id(1) // num_heads
    head = tl.program_id(1) % num_heads
    kv_head = head // head_group
    # Reverse order: under causal masking the last query blocks see the most keys; start them first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + batch)
        seqlen_q = tl.load(cu_seqlens_q + batch + 1) - q_start
        k_start = tl.load(cu_seqlens_k + batch)
        if HAS_SEQUSED_K:
            seqlen_k = tl.load(seqused_k + batch)
        else:
            seqlen_k = tl.load(cu_seqlens_k + batch + 1) - k_start
        kv_row = k_start
    else:
        q_start = 0
        k_start = 0
        seqlen_q = dense_seqlen_q
        seqlen_k = dense_seqlen_k
        kv_row = batch * dense_seqlen_k
    if not ONE_PASS:
        if start_m >= seqlen_q:
            return
    # 64-bit element offsets for the bases: batch * stride or a varlen start * stride can pass 2**31.
    batch_64 = tl.cast(batch, tl.int64)
    q_start_64 = tl.cast(q_start, tl.int64)
    k_start_64 = tl.cast(k_start, tl.int64)

    rows = start_m + tl.arange(0, BLOCK_M)  # sequence-local query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < seqlen_q
    d_valid = offs_d < HEAD_DIM
    if USE_TMA:
        # Through TMA the Q tile stays in shared memory, where wgmma reads it, sparing registers.
        q_tile = q.load([batch * dense_seqlen_q + q_start + start_m, head * HEAD_DIM])
        if UPCAST:
            q_tile = q_tile.to(tl.float32)
        k_src = k
        v_src = v
    else:
        q_ptrs = q + batch_64 * stride_qb + head * stride_qh + (q_start_64 + rows[:, None]) * stride_qm + offs_d[None, :]
        q_tile = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        if UPCAST:
            q_tile = q_tile.to(tl.float32)
        k_src = k + batch_64 * stride_kb + k_start_64 * stride_kn + kv_head * stride_kh
        v_src = v + batch_64 * stride_vb + k_start_64 * stride_vn + kv_head * stride_vh
    kv_col = kv_head * HEAD_DIM  # this kv head's first column in the TMA view
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(alibi_slopes + batch * stride_ab + head * stride_ah) * 1.4426950408889634
    bh = batch * num_heads + head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = visible_block_ranges(start_m, seqlen_q, seqlen_k, seqlen_k - seqlen_q,
                                                    window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if ONE_PASS:
        # The shape Triton's Hopper warp specialization takes (a TMA producer warp group, two consumer
        # warp groups of BLOCK_M / 2 rows each): one loop and no early exit, so one pass over
        # [lo, hi), every block through the mask when any block needs it (ONE_PASS_MASKED).
        acc, l_i, m_i = _attend(acc, l_i, m_i, q_tile, k_src, v_src, kv_row, kv_col, stride_kn, stride_vn,
                                lo, hi, rows, offs_n, offs_d, seqlen_q, seqlen_k,
                                qk_scale, softcap_scale, alibi_slope, window_left, window_right,
                                dropout_p, philox_seed, philox_offset, bh,
                                ONE_PASS_MASKED, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                HAS_ALIBI, HAS_DROPOUT, IS_VARLEN, USE_TMA, UPCAST, DOT_PRECISION,
                                WARP_SPECIALIZE)
    else:
        if HAS_LEFT:
            acc, l_i, m_i = _attend(acc, l_i, m_i, q_tile, k_src, v_src, kv_row, kv_col, stride_kn, stride_vn,
                                    lo, full_lo, rows, offs_n, offs_d, seqlen_q, seqlen_k,
                                    qk_scale, softcap_scale, alibi_slope, window_left, window_right,
                                    dropout_p, philox_seed, philox_offset, bh,
                                    True, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                    HAS_ALIBI, HAS_DROPOUT, IS_VARLEN, USE_TMA, UPCAST, DOT_PRECISION, False)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q_tile, k_src, v_src, kv_row, kv_col, stride_kn, stride_vn,
                                full_lo, full_hi, rows, offs_n, offs_d, seqlen_q, seqlen_k,
                                qk_scale, softcap_scale, alibi_slope, window_left, window_right,
                                dropout_p, philox_seed, philox_offset, bh,
                                False, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                HAS_ALIBI, HAS_DROPOUT, IS_VARLEN, USE_TMA, UPCAST, DOT_PRECISION, False)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q_tile, k_src, v_src, kv_row, kv_col, stride_kn, stride_vn,
                                full_hi, hi, rows, offs_n, offs_d, seqlen_q, seqlen_k,
                                qk_scale, softcap_scale, alibi_slope, window_left, window_right,
                                dropout_p, philox_seed, philox_offset, bh,
                                True, HEAD_DIM, BLOCK_N, BLOCK_D, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP,
                                HAS_ALIBI, HAS_DROPOUT, IS_VARLEN, USE_TMA, UPCAST, DOT_PRECISION, False)

    # Rows that saw no key: l = 0, output 0 and lse = +inf.
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out_scale = 1.0 / l_safe
    if HAS_DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    acc = acc * out_scale[:, None]
    lse_log2 = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    lse_ptrs = softmax_lse + batch_64 * stride_lb + head * stride_lh + (q_start_64 + rows) * stride_lm
    tl.store(lse_ptrs, lse_log2 * 0.6931471805599453, mask=row_valid)
    out_ptrs = out + batch_64 * stride_ob + head * stride_oh + (q_start_64 + rows[:, None]) * stride_om + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])

    if RETURN_SOFTMAX:
        # Second pass with the final lse: p = exp2(s - lse), dropped entries negated.
        p_ptrs = probs + batch_64 * stride_pb + head * stride_ph + rows[:, None].to(tl.int64) * stride_pm
        for start_n in tl.range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k_tile = _load_rows(k_src, kv_row + start_n, kv_col, cols, stride_kn, seqlen_k, offs_d,
                                HEAD_DIM, BLOCK_D, USE_TMA, True, UPCAST)
            s = _scores(q_tile, k_tile, rows, cols, seqlen_q, seqlen_k, qk_scale, softcap_scale, alibi_slope,
                        window_left, window_right, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                        DOT_PRECISION)
            p = tl.exp2(s - lse_log2[:, None])
            if HAS_DROPOUT:
                keep = dropout_keep_tile(philox_seed, philox_offset, dropout_p, bh, rows[:, None], start_n, BLOCK_N)
                p = tl.where(keep, p, -p)
            tl.store(p_ptrs + cols[None, :] * stride_pn, p.to(probs.dtype.element_ty),
                     mask=row_valid[:, None] & (cols[None, :] < seqlen_k))


_GENERATIONS = sorted({key[0] for key in FORWARD if key[0] > 0})


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def forward_config(q: torch.Tensor, head_dim: int, causal: bool, dropout: bool = False):
    """(block_m, block_n, num_warps, num_stages, warp_specialize) from configs.FORWARD for q's device
    and dtype (a 4-tuple row means no warp specialization)."""
    major = 0
    if q.is_cuda and not INTERPRET:
        major = device_capability(q.device)[0]
    major = tuned_generation(major, _GENERATIONS)
    block_m, block_n, num_warps, num_stages, *rest = FORWARD[(major, q.element_size(), _block_d(head_dim), causal)]
    warp_specialize = bool(rest and rest[0])
    if dropout and major > 0:
        num_warps = max(num_warps, FORWARD_DROPOUT_MIN_WARPS)
    return block_m, block_n, num_warps, num_stages, warp_specialize


def _one_pass_allowed(dropout: bool, return_softmax: bool) -> bool:
    """RETURN_SOFTMAX's second pass is a second loop; dropout's Philox code is rejected by Triton's
    warp-specialization pass, so both keep the three-loop kernel."""
    return not dropout and not return_softmax


def forward(q, k, v, out, softmax_lse, p, params, seqlens, config=None, use_tma=None, kernel=None) -> None:
    """Fill out, softmax_lse (and p when given) per the backend contract (DEVELOPERS.md).

    kernel: None runs the Gluon kernel (kernels/gluon_forward.py: Hopper, the features it has) where
    it handles the call and this module's Triton kernel elsewhere; "triton" always runs the latter
    (so does an explicit config).

    config: (block_m, block_n, num_warps, num_stages[, warp_specialize]) instead of the table's (no
    fallback to smaller tiles then: common.launch_fitting serves the table's configs);
    use_tma: force the TMA path on or off (default: on for Hopper whenever the tensors allow it).
    warp_specialize (Hopper, TMA only) runs the one-pass kernel with Triton's warp-specialization hint;
    PYFLASH_FORWARD_ONE_PASS=1 runs the one-pass kernel without the hint (the tests check that path)."""
    varlen = seqlens.is_varlen
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_heads_k = k.shape[-2]
    batch = seqlens.batch_size
    if batch == 0 or q.numel() == 0:
        return
    if kernel not in (None, "triton"):
        raise ValueError(f"kernel must be None or 'triton', got {kernel!r}")
    if (kernel is None and config is None and use_tma is not False
            and gluon_forward.try_forward(q, k, v, out, softmax_lse, params, seqlens, p is not None)):
        return
    launches = key = None
    if (recorded_launches.RECORD_TRITON and config is None and use_tma is None and params.dropout_p == 0
            and q.is_cuda and not INTERPRET):
        # A call like an earlier one replays its recorded launch (kernels/launch.py). Dropout calls have
        # none: their seed and offset are arguments that change every call.
        named = _named_tensors(q, k, v, out, softmax_lse, p, params, seqlens)
        key = call_key(named.values(), params, seqlens, p is None, os.environ.get("PYFLASH_FORWARD_ONE_PASS"),
                       current_device())
        plan = _PLANS.get(key)
        if plan is not None:
            for recorded in plan:
                recorded(named)
            return
        launches = []
    block_d = _block_d(head_dim)
    block_m, block_n, num_warps, num_stages, *rest = config or forward_config(q, head_dim, params.is_causal,
                                                                             params.dropout_p > 0)
    warp_specialize = bool(rest and rest[0])

    if varlen:
        q_strides = (0, q.stride(0), q.stride(1))
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
        o_strides = (0, out.stride(0), out.stride(1))
        lse_strides = (0, softmax_lse.stride(0), softmax_lse.stride(1))
        dense_seqlen_q = dense_seqlen_k = 0
        kv_rows = k.shape[0]
    else:
        q_strides = q.stride()[:3]
        k_strides = k.stride()[:3]
        v_strides = v.stride()[:3]
        o_strides = out.stride()[:3]
        lse_strides = softmax_lse.stride()
        dense_seqlen_q, dense_seqlen_k = q.shape[1], k.shape[1]
        kv_rows = batch * dense_seqlen_k

    if use_tma is None:
        use_tma = q.is_cuda and not INTERPRET and device_capability(q.device)[0] >= 9
    q_rows = q.shape[0] if varlen else batch * dense_seqlen_q
    use_tma = use_tma and tma_view_ok(q, q_rows, block_d, head_dim) and all(
        tma_view_ok(t, kv_rows, block_d, head_dim) for t in (k, v))

    softcap = params.softcap
    scale = params.softmax_scale
    qk_scale, softcap_scale = (scale / softcap, softcap * LOG2E) if softcap > 0 else (scale * LOG2E, 0.0)
    alibi = params.alibi_slopes
    has_dropout = params.dropout_p > 0
    return_softmax = p is not None
    dummy = softmax_lse  # stands in for absent tensors; never read (its switch is off)
    one_pass_ok = _one_pass_allowed(has_dropout, return_softmax)
    hopper = not INTERPRET and q.is_cuda and device_capability(q.device)[0] == 9
    warp_specialize = warp_specialize and one_pass_ok and use_tma and hopper
    one_pass = one_pass_ok and (warp_specialize or os.environ.get("PYFLASH_FORWARD_ONE_PASS") == "1")
    switches = dict(
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        IS_VARLEN=varlen, HAS_SEQUSED_K=varlen and seqlens.seqused_k is not None,
        HAS_LEFT=params.window_left >= 0, HAS_RIGHT=params.window_right >= 0,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None, HAS_DROPOUT=has_dropout,
        RETURN_SOFTMAX=return_softmax, USE_TMA=use_tma, ONE_PASS=one_pass, WARP_SPECIALIZE=warp_specialize,
        UPCAST=INTERPRET, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")

    def launch(blocks, num_warps, num_stages):
        block_m, block_n = blocks
        q_arg, k_arg, v_arg = q, k, v
        if use_tma:
            q_arg = tma_descriptor(q, q_rows, block_m, block_d)
            k_arg, v_arg = (tma_descriptor(t, kv_rows, block_n, block_d) for t in (k, v))
        # One pass masks every block when any block needs it: windows, causal, varlen ends, or dense
        # keys that end inside a block (TMA reads the next sequence's rows there).
        one_pass_masked = (params.window_left >= 0 or params.window_right >= 0 or varlen
                           or dense_seqlen_k % block_n != 0)
        sources = ["q", "k", "v"]
        if use_tma:
            sources = [("desc", name, d.shape, d.strides) for name, d in (("q", q_arg), ("k", k_arg), ("v", v_arg))]
        launch_into(launches, _forward_kernel, (cdiv(seqlens.max_seqlen_q, block_m), batch * num_heads), (
            q_arg, k_arg, v_arg, out, softmax_lse, p if return_softmax else dummy,
            alibi if alibi is not None else dummy,
            seqlens.cu_seqlens_q if varlen else dummy, seqlens.cu_seqlens_k if varlen else dummy,
            seqlens.seqused_k if seqlens.seqused_k is not None else dummy,
            *q_strides, *k_strides, *v_strides, *o_strides, *lse_strides,
            *(p.stride() if return_softmax else (0, 0, 0, 0)),
            *(alibi.stride() if alibi is not None else (0, 0)),
            num_heads, num_heads // num_heads_k, dense_seqlen_q, dense_seqlen_k,
            qk_scale, softcap_scale, params.window_left, params.window_right,
            params.dropout_p, params.philox_seed, params.philox_offset), dict(
            BLOCK_M=block_m, BLOCK_N=block_n, ONE_PASS_MASKED=one_pass_masked, **switches,
            num_warps=num_warps, num_stages=num_stages),
            dict(enumerate((*sources, "out", "softmax_lse", "p", "alibi", "cu_q", "cu_k", "seqused_k"))))

    if config is not None:  # tuning and tests: this config or an error, never a stand-in
        launch((block_m, block_n), num_warps, num_stages)
        return
    # The table's tiles that outgrow a smaller part's shared memory fall back to smaller ones.
    launch_fitting(("forward", q.device, q.dtype, block_m, block_n, num_warps, num_stages, *switches.values()),
                   (block_m, block_n), num_warps, num_stages, launch)
    if launches and None not in launches:
        _PLANS[key] = tuple(launches)


_PLANS = recorded_launches.Plans()  # launch.call_key -> the recorded launches of a call through the Triton kernel


def _named_tensors(q, k, v, out, softmax_lse, p, params, seqlens):
    """A call's tensors by the names plan sources (launch.Launch) use (absent ones: softmax_lse, never read)."""
    return dict(q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, p=p if p is not None else softmax_lse,
                **optional_tensors(params, seqlens, softmax_lse))
