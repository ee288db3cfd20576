"""The independent oracle: naive attention with materialised scores, written from SPEC.md alone.

Nothing here imports ``pyflash.reference`` or ``pyflash.masks``; only the Philox generator itself
(``pyflash.philox.philox4x32``, checked against ``tl.philox`` and known-answer vectors in ``test_philox.py``)
is borrowed to build a dropout keep mask, and the mask layout (counter ``(j // 8, i, bh, offset)``, output
word ``(j % 8) // 2``, its low 16 bits for even ``j`` and high 16 for odd, key ``seed``) is written out again
here.

Run it in float64 (``compute_dtype=torch.float64``) for the reference, or in the input dtype for the
"low-precision torch math" baseline of the error rule. Differentiable: autograd through it gives the
reference gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def visible(seqlen_q: int, seqlen_k: int, window_left: int = -1, window_right: int = -1,
            causal: bool = False, device=None) -> torch.Tensor:
    """(seqlen_q, seqlen_k) bool: key j visible to query i, bottom-right aligned (SPEC section 1)."""
    if causal:
        window_right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        mask &= j >= diag - window_left
    if window_right >= 0:
        mask &= j <= diag + window_right
    return mask


def keep_mask(seed: int, offset: int, p_dropout: float, batch_index: int, num_heads: int,
              seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """(num_heads, seqlen_q, seqlen_k) bool dropout keep mask of one sequence.

    Philox4x32-10, key (seed lo, seed hi), counter (j // 8, i, bh, offset) with bh = batch * h + head;
    u = 16 bits of output word (j % 8) // 2 (the low ones for even j) divided by 2**16; kept iff u >= p
    (fp32 comparison).
    """
    from pyflash.philox import philox4x32

    head = torch.arange(num_heads, dtype=torch.int64)[:, None, None]
    i = torch.arange(seqlen_q, dtype=torch.int64)[None, :, None]
    j = torch.arange(seqlen_k, dtype=torch.int64)[None, None, :]
    bh = batch_index * num_heads + head
    shape = (num_heads, seqlen_q, seqlen_k)
    words = torch.stack([w.expand(shape) for w in philox4x32(seed, j // 8, i, bh, offset)], dim=-1)
    word = torch.gather(words, -1, ((j % 8) // 2).expand(shape).unsqueeze(-1)).squeeze(-1)
    bits = torch.bitwise_right_shift(word, 16 * (j % 2)) % 65536
    return bits.to(torch.float32) / 65536 >= torch.tensor(p_dropout, dtype=torch.float32)


def attention_one(q, k, v, *, softmax_scale: float, causal=False, window_left=-1, window_right=-1,
                  softcap=0.0, alibi_slopes: Optional[torch.Tensor] = None,
                  keep: Optional[torch.Tensor] = None, p_dropout=0.0, compute_dtype=None,
                  return_probs=False):
    """One sequence. q (sq, h, d), k/v (sk, hk, d); alibi_slopes (h,); keep (h, sq, sk) bool.

    Returns out (sq, h, d) in compute_dtype and lse (h, sq) (+inf where a row sees no key);
    with return_probs also the normalised probabilities (h, sq, sk) before dropout.
    """
    compute_dtype = compute_dtype or q.dtype
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    seqlen_q, num_heads, _ = q.shape
    seqlen_k, num_heads_k, _ = k.shape
    assert num_heads % num_heads_k == 0
    group = num_heads // num_heads_k
    # GQA by repeating K/V heads: the oracle may be slow, it must be obvious.
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * softmax_scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        i = torch.arange(seqlen_q)[:, None]
        j = torch.arange(seqlen_k)[None, :]
        dist = (i + seqlen_k - seqlen_q - j).abs().to(compute_dtype)
        scores = scores - alibi_slopes.to(compute_dtype)[:, None, None] * dist
    vis = visible(seqlen_q, seqlen_k, window_left, window_right, causal).expand(num_heads, -1, -1)
    scores = scores.masked_fill(~vis, -math.inf)
    row_sees_key = vis.any(-1)  # (h, sq)
    # A row with no visible key has lse = +inf and probabilities 0; keep every branch finite
    # so autograd stays NaN-free.
    zero = torch.zeros((), dtype=compute_dtype)
    row_max = torch.where(row_sees_key, scores.amax(-1), zero) if seqlen_k > 0 else zero.expand(num_heads, seqlen_q)
    row_max = row_max.detach()
    sum_exp = torch.exp(scores - row_max[..., None]).sum(-1)
    sum_exp = torch.where(row_sees_key, sum_exp, torch.ones((), dtype=compute_dtype))
    lse_finite = row_max + torch.log(sum_exp)
    probs = torch.exp(scores - lse_finite[..., None])  # exp(-inf) = 0 where invisible
    lse = torch.where(row_sees_key, lse_finite, torch.full((), math.inf, dtype=compute_dtype))
    dropped = probs
    if keep is not None and p_dropout > 0:
        dropped = probs * keep.to(compute_dtype) / (1.0 - p_dropout)
    out = torch.einsum("hij,jhd->ihd", dropped, v)
    if return_probs:
        return out, lse, probs
    return out, lse


def _normalise_window(window_left, window_right, seqlen_k):
    """SPEC: windows at or past seqlen_k (max_seqlen_k for varlen) count as unbounded (-1)."""
    return (-1 if window_left >= seqlen_k else window_left,
            -1 if window_right >= seqlen_k else window_right)


def _slopes_row(alibi_slopes, batch_index, num_heads):
    if alibi_slopes is None:
        return None
    if alibi_slopes.dim() == 1:
        return alibi_slopes
    return alibi_slopes[batch_index]


def attention(q, k, v, *, softmax_scale: Optional[float] = None, causal=False, window_left=-1,
              window_right=-1, softcap=0.0, alibi_slopes=None, p_dropout=0.0,
              seed_offset: Optional[Sequence[int]] = None, compute_dtype=None, return_probs=False):
    """Dense: q (b, sq, h, d), k/v (b, sk, hk, d). Returns out (b, sq, h, d), lse (b, h, sq)
    [, probs (b, h, sq, sk)]. Dropout uses ``keep_mask(*seed_offset, ...)`` when p_dropout > 0."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    window_left, window_right = _normalise_window(window_left, window_right, seqlen_k)
    outs, lses, probs = [], [], []
    for b in range(batch):
        keep = None
        if p_dropout > 0:
            keep = keep_mask(seed_offset[0], seed_offset[1], p_dropout, b, num_heads, seqlen_q, seqlen_k)
        res = attention_one(q[b], k[b], v[b], softmax_scale=scale, causal=causal,
                            window_left=window_left, window_right=window_right, softcap=softcap,
                            alibi_slopes=_slopes_row(alibi_slopes, b, num_heads), keep=keep,
                            p_dropout=p_dropout, compute_dtype=compute_dtype, return_probs=True)
        outs.append(res[0])
        lses.append(res[1])
        probs.append(res[2])
    dtype = compute_dtype or q.dtype
    if batch == 0:
        out = torch.zeros(q.shape, dtype=dtype)
        lse = torch.zeros(0, num_heads, seqlen_q, dtype=dtype)
        p = torch.zeros(0, num_heads, seqlen_q, seqlen_k, dtype=dtype)
    else:
        out, lse, p = torch.stack(outs), torch.stack(lses), torch.stack(probs)
    return (out, lse, p) if return_probs else (out, lse)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, *, seqused_k=None,
                     softmax_scale: Optional[float] = None, causal=False, window_left=-1,
                     window_right=-1, softcap=0.0, alibi_slopes=None, p_dropout=0.0,
                     seed_offset: Optional[Sequence[int]] = None, compute_dtype=None):
    """Varlen: q (total_q, h, d), k/v (total_k, hk, d). Loops over sequences.

    Returns out (total_q, h, d) (rows outside every sequence are 0) and lse (h, total_q)
    (rows outside every sequence are +inf: callers compare only sequence rows)."""
    total_q, num_heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    dtype = compute_dtype or q.dtype
    window_left, window_right = _normalise_window(window_left, window_right, max_seqlen_k)
    cu_q = [int(x) for x in cu_seqlens_q]
    cu_k = [int(x) for x in cu_seqlens_k]
    out_rows, lse_cols = [], []
    covered = 0
    for s in range(len(cu_q) - 1):
        q_start, q_end = cu_q[s], cu_q[s + 1]
        k_start = cu_k[s]
        seqlen_k = cu_k[s + 1] - k_start
        if seqused_k is not None:
            seqlen_k = int(seqused_k[s])
        seqlen_q = q_end - q_start
        keep = None
        if p_dropout > 0:
            keep = keep_mask(seed_offset[0], seed_offset[1], p_dropout, s, num_heads, seqlen_q, seqlen_k)
        out_s, lse_s = attention_one(
            q[q_start:q_end], k[k_start:k_start + seqlen_k], v[k_start:k_start + seqlen_k],
            softmax_scale=scale, causal=causal, window_left=window_left, window_right=window_right,
            softcap=softcap, alibi_slopes=_slopes_row(alibi_slopes, s, num_heads), keep=keep,
            p_dropout=p_dropout, compute_dtype=dtype)
        assert q_start == covered
        covered = q_end
        out_rows.append(out_s)
        lse_cols.append(lse_s)
    tail = total_q - covered
    out_rows.append(torch.zeros(tail, num_heads, head_dim, dtype=dtype))
    lse_cols.append(torch.full((num_heads, tail), math.inf, dtype=dtype))
    return torch.cat(out_rows, 0), torch.cat(lse_cols, 1)


# The error rule (flash_attn's): max|ours - ref64| <= 2 * max|lowp - ref64| + atol, NaN never passes.
RULE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-10}


def assert_rule(ours: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, name: str,
                atol: float) -> None:
    """``ours`` within twice the low-precision baseline's error of the float64 reference.

    Infinities (lse of rows that see no key) must match exactly; the rule applies to the rest.
    ``atol`` is scaled by the reference's magnitude (gradients of long rows grow with the length).
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN in {int(torch.isnan(ours).sum())} elements"
    ours64, lowp64 = ours.detach().double(), lowp.detach().double()
    ref_inf = torch.isinf(ref64)
    mismatch = (torch.isinf(ours64) != ref_inf) | (ref_inf & (ours64 != ref64))
    assert not mismatch.any(), f"{name}: infinities differ at {int(mismatch.sum())} elements"
    if ref_inf.all():
        return
    finite = ~ref_inf
    err = (ours64 - ref64)[finite].abs().max().item()
    base = (lowp64 - ref64)[finite].abs().nan_to_num(nan=0.0, posinf=0.0).max().item()
    scale = 1.0 + ref64[finite].abs().max().item()
    assert err <= 2 * base + atol * scale, (
        f"{name}: max err {err:.3g} > 2 * baseline {base:.3g} + atol {atol * scale:.3g}")
