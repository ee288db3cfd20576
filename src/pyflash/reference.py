"""The PyTorch reference backend: blockwise attention with an online softmax, on any device.

Memory stays O(seqlen * block) per head: scores exist only for one (query block, key block) tile at a
time, in fp32. The backward recomputes the tiles from the saved logsumexp, as FlashAttention does.
Rules (visibility, softcap, ALiBi, dropout mask) come from ``pyflash.masks`` and ``pyflash.philox``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from pyflash import masks, philox
from pyflash.params import AttentionParams, Seqlens

BLOCK_M = 128
BLOCK_N = 128


@dataclass
class _Sequence:
    """One sequence of the batch: views into the caller's tensors and its lengths."""

    index: int
    rows: slice  # rows of q/out in the (varlen-flattened or per-batch) layout
    keys: slice
    seqlen_q: int
    seqlen_k: int


def _sequences(seqlens: Seqlens) -> Iterator[_Sequence]:
    if not seqlens.is_varlen:
        for b in range(seqlens.batch_size):
            yield _Sequence(b, slice(None), slice(None), seqlens.max_seqlen_q, seqlens.max_seqlen_k)
        return
    cu_q = seqlens.cu_seqlens_q.tolist()
    cu_k = seqlens.cu_seqlens_k.tolist()
    used = seqlens.seqused_k.tolist() if seqlens.seqused_k is not None else None
    for b in range(seqlens.batch_size):
        seqlen_k = used[b] if used is not None else cu_k[b + 1] - cu_k[b]
        yield _Sequence(b, slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + seqlen_k),
                        cu_q[b + 1] - cu_q[b], seqlen_k)


def _select(t: torch.Tensor, seq: _Sequence, rows: slice, varlen: bool) -> torch.Tensor:
    """The (s, h, d) slice of a sequence: t[b] for dense tensors, t[rows] for varlen ones."""
    return t[rows] if varlen else t[seq.index]


def _lse_view(lse: torch.Tensor, seq: _Sequence, varlen: bool) -> torch.Tensor:
    """(h, seqlen_q) view of the sequence's logsumexp (or delta)."""
    return lse[:, seq.rows] if varlen else lse[seq.index]


def _key_block_range(m_start: int, m_end: int, seq: _Sequence, params: AttentionParams):
    """Key range [lo, hi) that rows [m_start, m_end) can see; blocks outside it are skipped."""
    shift = seq.seqlen_k - seq.seqlen_q
    lo, hi = 0, seq.seqlen_k
    if params.window_left >= 0:
        lo = max(lo, m_start + shift - params.window_left)
    if params.window_right >= 0:
        hi = min(hi, m_end - 1 + shift + params.window_right + 1)
    return lo, max(lo, hi)


class _Tile:
    """Scores of a (query block, key block) tile for all heads, shaped (hk, groups, m, n)."""

    def __init__(self, q_blk, k_blk, rows, cols, seq: _Sequence, params: AttentionParams,
                 slopes: Optional[torch.Tensor]):
        raw = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * params.softmax_scale
        self.tanh = None
        if params.softcap > 0:
            self.tanh = torch.tanh(raw / params.softcap)
            raw = params.softcap * self.tanh
        if slopes is not None:
            raw = raw + masks.alibi_bias(slopes, rows, cols, seq.seqlen_q, seq.seqlen_k)
        visible = masks.visible(rows, cols, seq.seqlen_q, seq.seqlen_k, params.window_left, params.window_right)
        self.scores = raw.masked_fill(~visible, float("-inf"))


def _dropout_scale(params: AttentionParams, bh: torch.Tensor, rows, cols) -> torch.Tensor:
    """keep / (1 - p) for the tile: 0 where dropped."""
    keep = philox.dropout_keep(params.philox_seed, params.philox_offset, params.dropout_p, bh, rows, cols)
    return keep.to(torch.float32) / (1.0 - params.dropout_p)


def _head_layout(t: torch.Tensor, num_heads_k: int) -> torch.Tensor:
    """(s, h, d) -> (hk, h // hk, s, d) in fp32, a view of the group structure (no K/V repeat)."""
    s, h, d = t.shape
    return t.permute(1, 0, 2).reshape(num_heads_k, h // num_heads_k, s, d).float()


def _sequence_context(q, k, params: AttentionParams, seq: _Sequence):
    num_heads, num_heads_k = q.shape[-2], k.shape[-2]
    groups = num_heads // num_heads_k
    device = q.device
    heads = torch.arange(num_heads, device=device).view(num_heads_k, groups, 1, 1)
    bh = seq.index * num_heads + heads
    slopes = None
    if params.alibi_slopes is not None:
        slopes = params.alibi_slopes[seq.index].to(device).view(num_heads_k, groups, 1, 1)
    return bh, slopes


def forward(q, k, v, out, softmax_lse, p, params: AttentionParams, seqlens: Seqlens) -> None:
    varlen = seqlens.is_varlen
    num_heads_k = k.shape[-2]
    for seq in _sequences(seqlens):
        q_s = _head_layout(_select(q, seq, seq.rows, varlen), num_heads_k)
        k_s = _head_layout(_select(k, seq, seq.keys, varlen), num_heads_k)
        v_s = _head_layout(_select(v, seq, seq.keys, varlen), num_heads_k)
        out_s = _select(out, seq, seq.rows, varlen)
        lse_s = _lse_view(softmax_lse, seq, varlen)
        bh, slopes = _sequence_context(q, k, params, seq)
        hk, groups, _, d = q_s.shape
        for m_start in range(0, seq.seqlen_q, BLOCK_M):
            m_end = min(m_start + BLOCK_M, seq.seqlen_q)
            rows = torch.arange(m_start, m_end, device=q.device).view(-1, 1)
            q_blk = q_s[:, :, m_start:m_end]
            row_max = torch.full((hk, groups, m_end - m_start, 1), float("-inf"), device=q.device)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros(hk, groups, m_end - m_start, d, device=q.device)
            lo, hi = _key_block_range(m_start, m_end, seq, params)
            for n_start in range(lo, hi, BLOCK_N):
                n_end = min(n_start + BLOCK_N, hi)
                cols = torch.arange(n_start, n_end, device=q.device).view(1, -1)
                tile = _Tile(q_blk, k_s[:, :, n_start:n_end], rows, cols, seq, params, slopes)
                new_max = torch.maximum(row_max, tile.scores.amax(-1, keepdim=True))
                # Rows that have seen no key yet keep max -inf; shift them by 0 so exp gives 0, not NaN.
                shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                probs = torch.exp(tile.scores - shift)
                rescale = torch.exp(row_max - shift)
                row_sum = row_sum * rescale + probs.sum(-1, keepdim=True)
                if params.dropout_p > 0:
                    probs = probs * _dropout_scale(params, bh, rows, cols)
                acc = acc * rescale + torch.matmul(probs, v_s[:, :, n_start:n_end])
                row_max = new_max
            seen = row_sum > 0
            out_blk = torch.where(seen, acc / torch.where(seen, row_sum, torch.ones_like(row_sum)), 0.0)
            lse_blk = torch.where(seen, row_max + torch.log(row_sum), float("inf"))
            out_s[m_start:m_end] = out_blk.reshape(hk * groups, m_end - m_start, d).permute(1, 0, 2).to(out.dtype)
            lse_s[:, m_start:m_end] = lse_blk.reshape(hk * groups, m_end - m_start)
            if p is not None:
                _write_probs(p[seq.index], q_blk, k_s, rows, lse_blk, seq, params, bh, slopes, m_start, m_end)


def _write_probs(p_b, q_blk, k_s, rows, lse_blk, seq, params, bh, slopes, m_start, m_end) -> None:
    """return_softmax: normalised probabilities, dropped entries negated, into p_b (h, sq_r, sk_r)."""
    hk, groups = q_blk.shape[:2]
    for n_start in range(0, seq.seqlen_k, BLOCK_N):
        n_end = min(n_start + BLOCK_N, seq.seqlen_k)
        cols = torch.arange(n_start, n_end, device=q_blk.device).view(1, -1)
        tile = _Tile(q_blk, k_s[:, :, n_start:n_end], rows, cols, seq, params, slopes)
        probs = torch.exp(tile.scores - lse_blk)
        keep = philox.dropout_keep(params.philox_seed, params.philox_offset, params.dropout_p, bh, rows, cols)
        signed = torch.where(keep, probs, -probs)
        p_b[:, m_start:m_end, n_start:n_end] = signed.reshape(hk * groups, m_end - m_start, n_end - n_start).to(p_b.dtype)


def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params: AttentionParams,
             seqlens: Seqlens, deterministic: bool) -> None:
    """Gradients by recomputation; the reference path is deterministic whatever ``deterministic`` says."""
    varlen = seqlens.is_varlen
    num_heads_k = k.shape[-2]
    for seq in _sequences(seqlens):
        q_s = _head_layout(_select(q, seq, seq.rows, varlen), num_heads_k)
        k_s = _head_layout(_select(k, seq, seq.keys, varlen), num_heads_k)
        v_s = _head_layout(_select(v, seq, seq.keys, varlen), num_heads_k)
        dout_s = _head_layout(_select(dout, seq, seq.rows, varlen), num_heads_k)
        out_s = _head_layout(_select(out, seq, seq.rows, varlen), num_heads_k)
        hk, groups, _, d = q_s.shape
        lse_s = _lse_view(softmax_lse, seq, varlen).view(hk, groups, -1, 1)
        delta = (dout_s * out_s).sum(-1, keepdim=True)  # (hk, g, sq, 1)
        _lse_view(softmax_d, seq, varlen).copy_(delta.view(hk * groups, -1))
        bh, slopes = _sequence_context(q, k, params, seq)
        dq_s = torch.zeros_like(q_s)
        dk_s = torch.zeros(hk, seq.seqlen_k, d, device=q.device)
        dv_s = torch.zeros_like(dk_s)
        for m_start in range(0, seq.seqlen_q, BLOCK_M):
            m_end = min(m_start + BLOCK_M, seq.seqlen_q)
            rows = torch.arange(m_start, m_end, device=q.device).view(-1, 1)
            q_blk, do_blk = q_s[:, :, m_start:m_end], dout_s[:, :, m_start:m_end]
            lse_blk, delta_blk = lse_s[:, :, m_start:m_end], delta[:, :, m_start:m_end]
            lo, hi = _key_block_range(m_start, m_end, seq, params)
            for n_start in range(lo, hi, BLOCK_N):
                n_end = min(n_start + BLOCK_N, hi)
                cols = torch.arange(n_start, n_end, device=q.device).view(1, -1)
                k_blk, v_blk = k_s[:, :, n_start:n_end], v_s[:, :, n_start:n_end]
                tile = _Tile(q_blk, k_blk, rows, cols, seq, params, slopes)
                probs = torch.exp(tile.scores - lse_blk)  # lse = +inf rows give 0
                dprobs = torch.matmul(do_blk, v_blk.transpose(-1, -2))
                dropped = probs
                if params.dropout_p > 0:
                    scale = _dropout_scale(params, bh, rows, cols)
                    dropped = probs * scale
                    dprobs = dprobs * scale
                dv_s[:, n_start:n_end] += torch.einsum("kgmn,kgmd->knd", dropped, do_blk)
                dscores = probs * (dprobs - delta_blk)
                if tile.tanh is not None:
                    dscores = dscores * (1 - tile.tanh * tile.tanh)
                dscores = dscores * params.softmax_scale
                dq_s[:, :, m_start:m_end] += torch.matmul(dscores, k_blk)
                dk_s[:, n_start:n_end] += torch.einsum("kgmn,kgmd->knd", dscores, q_blk)
        _select(dq, seq, seq.rows, varlen).copy_(dq_s.reshape(hk * groups, -1, d).permute(1, 0, 2))
        dk_out, dv_out = _select(dk, seq, seq.keys, varlen), _select(dv, seq, seq.keys, varlen)
        dk_out.copy_(dk_s.permute(1, 0, 2))
        dv_out.copy_(dv_s.permute(1, 0, 2))
