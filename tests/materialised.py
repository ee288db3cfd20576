"""Materialised attention on the inputs' device, vectorised over batch and heads, for the GPU tests
at sizes where tests/naive.py's per-sequence float64 oracle is too slow. Built on pyflash.masks and
pyflash.philox (which the CPU tests check against the oracle); differentiable and NaN-free."""
import math

import torch

from pyflash import masks, philox
from pyflash.params import AttentionParams


def keep_mask(params: AttentionParams, batch, num_heads, seqlen_q, seqlen_k, batch_offset=0, device="cuda"):
    """The dropout keep mask (batch, heads, sq, sk) of sequences batch_offset .. batch_offset + batch."""
    bh = ((torch.arange(batch, device=device)[:, None] + batch_offset) * num_heads
          + torch.arange(num_heads, device=device)[None, :])
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return philox.dropout_keep(params.philox_seed, params.philox_offset, params.dropout_p,
                               bh[:, :, None, None], rows, cols)


def reference(q, k, v, params: AttentionParams, batch_offset=0, compute_dtype=torch.float32):
    """Dense (b, s, h, d) attention: out (b, sq, h, d), lse (b, h, sq) (+inf where a row sees no key)
    and the undropped probabilities (b, h, sq, sk). batch_offset: the sequence index of q[0] (varlen
    sequences are checked one at a time)."""
    batch, seqlen_q, num_heads, _ = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    k = k.repeat_interleave(num_heads // num_heads_k, dim=2)
    v = v.repeat_interleave(num_heads // num_heads_k, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * params.softmax_scale
    scores = masks.apply_softcap(scores, params.softcap)
    rows = torch.arange(seqlen_q, device=q.device)[:, None]
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    if params.alibi_slopes is not None:
        slopes = params.alibi_slopes[batch_offset:batch_offset + batch, :, None, None]
        scores = scores + masks.alibi_bias(slopes, rows, cols, seqlen_q, seqlen_k).to(compute_dtype)
    visible = masks.visible(rows, cols, seqlen_q, seqlen_k, params.window_left, params.window_right)
    scores = scores.masked_fill(~visible, -math.inf)
    # Rows that see no key: probabilities 0, and every branch finite so autograd stays NaN-free.
    sees_key = visible.any(-1)
    row_max = torch.where(sees_key, scores.amax(-1) if seqlen_k else 0.0, 0.0).detach()
    probs = torch.exp(scores - row_max[..., None])
    probs = probs / torch.where(sees_key, probs.sum(-1), 1.0)[..., None]
    dropped = probs
    if params.dropout_p > 0:
        keep = keep_mask(params, batch, num_heads, seqlen_q, seqlen_k, batch_offset, q.device)
        dropped = probs * keep / (1 - params.dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", dropped, v)
    lse = torch.where(sees_key, torch.logsumexp(scores, -1), math.inf)
    return out, lse, probs
