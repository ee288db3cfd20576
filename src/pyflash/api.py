"""The seed API (PyTorch's vendored FlashAttention-2 ``flash_api.h``): mha_fwd, mha_varlen_fwd, mha_bwd,
mha_varlen_bwd. Inputs are validated here, once; the backends trust what they receive.

Head dims that are not a multiple of 8 are zero-padded (the padded q/k/v are returned, as the seed
does); outputs come back in the caller's head dim.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from pyflash import backend, philox
from pyflash.params import AttentionParams, Seqlens

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _require(condition: bool, message, error=ValueError) -> None:
    """Raise ``error(message)`` unless condition holds; message may be a callable, so that the hot
    path (valid input) formats no strings."""
    if not condition:
        raise error(message() if callable(message) else message)


def _check_tensor(name: str, t, ndim: int, device: torch.device, dtype=None) -> None:
    # The common case in one expression (no message closures: this runs 3-6 times a call).
    if (isinstance(t, torch.Tensor) and t.dim() == ndim and t.device == device and (dtype is None or t.dtype == dtype)
            and (ndim == 0 or t.stride(-1) == 1 or t.numel() == 0)):
        return
    _require(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _require(t.dim() == ndim, lambda: f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    _require(t.device == device, lambda: f"{name} must be on {device} like q, got {t.device}")
    if dtype is not None:
        _require(t.dtype == dtype, lambda: f"{name} must have dtype {dtype}, got {t.dtype}", TypeError)
    if t.numel() > 0 and ndim > 0:
        _require(t.stride(-1) == 1, lambda: f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}")


def _check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_qkv(q, k, v, ndim: int) -> None:
    if (isinstance(q, torch.Tensor) and q.dtype in _DTYPES and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor)
            and q.dim() == k.dim() == v.dim() == ndim and q.device == k.device == v.device
            and q.dtype == k.dtype == v.dtype and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and 0 < q.shape[-1] <= MAX_HEAD_DIM and k.shape[-1] == q.shape[-1] and v.shape == k.shape
            and k.shape[-2] > 0 and q.shape[-2] % k.shape[-2] == 0):
        return  # the common case in one expression; below, each rule with its message
    _require(isinstance(q, torch.Tensor), lambda: f"q must be a torch.Tensor, got {type(q).__name__}", TypeError)
    _require(q.dtype in _DTYPES, lambda: f"q must have dtype float16, bfloat16 or float32, got {q.dtype}", TypeError)
    _check_tensor("q", q, ndim, q.device)
    _check_tensor("k", k, ndim, q.device, q.dtype)
    _check_tensor("v", v, ndim, q.device, q.dtype)
    head_dim = q.shape[-1]
    _require(0 < head_dim <= MAX_HEAD_DIM, lambda: f"head dim (q.shape[-1]) must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    _require(k.shape[-1] == head_dim, lambda: f"k must have head dim {head_dim} like q, got shape {tuple(k.shape)}")
    _require(v.shape == k.shape, lambda: f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    num_heads, num_heads_k = q.shape[-2], k.shape[-2]
    _require(num_heads_k > 0 and num_heads % num_heads_k == 0,
             lambda: f"num_heads ({num_heads}, q) must be a multiple of num_heads_k ({num_heads_k}, k)")


def _check_dropout(p_dropout: float, return_softmax: bool) -> None:
    if p_dropout == 0.0 and not return_softmax:
        return
    _require(0.0 <= p_dropout < 1.0, lambda: f"p_dropout must be in [0, 1), got {p_dropout}")
    _require(not return_softmax or p_dropout > 0, "return_softmax requires p_dropout > 0 (as the seed does)")


def _check_window(window_size_left: int, window_size_right: int) -> None:
    if (type(window_size_left) is int and type(window_size_right) is int
            and window_size_left >= -1 and window_size_right >= -1):
        return
    for name, value in (("window_size_left", window_size_left), ("window_size_right", window_size_right)):
        _require(isinstance(value, int) and value >= -1, lambda: f"{name} must be an int >= -1 (-1: unbounded), got {value!r}")


def _check_softcap(softcap: float) -> None:
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")


def _alibi(alibi_slopes, batch_size: int, num_heads: int, device: torch.device) -> Optional[torch.Tensor]:
    if alibi_slopes is None:
        return None
    _require(isinstance(alibi_slopes, torch.Tensor), "alibi_slopes must be a torch.Tensor", TypeError)
    _require(alibi_slopes.dtype == torch.float32, lambda: f"alibi_slopes must have dtype float32, got {alibi_slopes.dtype}", TypeError)
    _require(alibi_slopes.device == device, lambda: f"alibi_slopes must be on {device} like q, got {alibi_slopes.device}")
    _require(tuple(alibi_slopes.shape) in ((num_heads,), (batch_size, num_heads)),
             lambda: f"alibi_slopes must have shape ({num_heads},) or ({batch_size}, {num_heads}), got {tuple(alibi_slopes.shape)}")
    _require(alibi_slopes.stride(-1) == 1, "alibi_slopes must have a contiguous last dimension")
    return alibi_slopes.expand(batch_size, num_heads)


def _check_cu_seqlens_tensor(name: str, cu, device: torch.device) -> None:
    _require(isinstance(cu, torch.Tensor), lambda: f"{name} must be a torch.Tensor", TypeError)
    _require(cu.dtype == torch.int32, lambda: f"{name} must have dtype int32, got {cu.dtype}", TypeError)
    _require(cu.device == device, lambda: f"{name} must be on {device} like q, got {cu.device}")
    _require(cu.dim() == 1 and cu.numel() >= 2, lambda: f"{name} must have shape (batch_size + 1,) with batch_size > 0, got {tuple(cu.shape)}")
    _require(cu.is_contiguous(), lambda: f"{name} must be contiguous")


def _check_offsets(name: str, values: Sequence[int], total: int) -> None:
    _require(values[0] == 0, lambda: f"{name} must start at 0, got {values[0]}")
    _require(all(a <= b for a, b in zip(values, values[1:])), lambda: f"{name} must be non-decreasing, got {values}")
    _require(values[-1] <= total, lambda: f"{name}[-1] = {values[-1]} exceeds the {total} rows of its tensor")


def _varlen_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k) -> Seqlens:
    """Validates the varlen description and returns it as Seqlens."""
    _check_cu_seqlens_tensor("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens_tensor("cu_seqlens_k", cu_seqlens_k, q.device)
    batch_size = cu_seqlens_q.numel() - 1
    _check_shape("cu_seqlens_k", cu_seqlens_k, (batch_size + 1,))
    parts = [cu_seqlens_q, cu_seqlens_k]
    if seqused_k is not None:
        _check_tensor("seqused_k", seqused_k, 1, q.device, torch.int32)
        _check_shape("seqused_k", seqused_k, (batch_size,))
        parts.append(seqused_k)
    # One device-to-host copy for every value check.
    values = torch.cat(parts).tolist()
    cu_q, cu_k, used = values[:batch_size + 1], values[batch_size + 1:2 * batch_size + 2], values[2 * batch_size + 2:]
    _check_offsets("cu_seqlens_q", cu_q, q.shape[0])
    _check_offsets("cu_seqlens_k", cu_k, k.shape[0])
    lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if seqused_k is not None:
        _require(all(0 <= u <= n for u, n in zip(used, lengths_k)),
                 lambda: f"seqused_k must lie in [0, sequence length of k], got {used} for lengths {lengths_k}")
    _require(int(max_seqlen_q) >= max(lengths_q),
             lambda: f"max_seqlen_q ({max_seqlen_q}) is below the longest query sequence ({max(lengths_q)})")
    _require(int(max_seqlen_k) >= max(lengths_k),
             lambda: f"max_seqlen_k ({max_seqlen_k}) is below the longest key sequence ({max(lengths_k)})")
    return Seqlens(batch_size, int(max_seqlen_q), int(max_seqlen_k), cu_seqlens_q, cu_seqlens_k, seqused_k)


def _check_out(name: str, out, like: torch.Tensor, shape: Sequence[int]) -> None:
    if out is None:
        return
    _check_tensor(name, out, len(shape), like.device, like.dtype)
    _check_shape(name, out, shape)


def _normalize_window(left: int, right: int, is_causal: bool, seqlen_k: int) -> Tuple[int, int]:
    """The seed's rules: windows at or past seqlen_k are unbounded; causal means right = 0."""
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if is_causal:
        right = 0
    return left, right


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    pad = _round_up(t.shape[-1], 8) - t.shape[-1]
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def _scale(softmax_scale, head_dim: int) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def _rng(p_dropout: float, gen_, device: torch.device) -> Tuple[int, int]:
    return philox.next_seed_offset(gen_, device) if p_dropout > 0 else (0, 0)


def _rng_tensors(seed: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # scalar_tensor: exact for any int64 seed / offset, and ~2.5x cheaper than torch.tensor per call.
    return torch.scalar_tensor(seed, dtype=torch.int64), torch.scalar_tensor(offset, dtype=torch.int64)


def _as_int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _philox(name: str, value, p_dropout) -> int:
    """A backward call's philox_seed / philox_offset (a tensor or an int) as an int; None is 0, and allowed only
    without dropout (flash_attn passes no rng state then)."""
    if value is None:
        if p_dropout > 0:
            raise ValueError(f"{name} is required when p_dropout > 0 (the forward's returned {name})")
        return 0
    return _as_int(value)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

def _forward(q, k, v, out_, params: AttentionParams, seqlens: Seqlens, return_softmax: bool, zero_tensors: bool):
    """Pads, allocates, runs the backend. Returns the seed's 8-tuple."""
    head_dim = q.shape[-1]
    q_padded, k_padded, v_padded = _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v)
    padded = q_padded.shape[-1] != head_dim
    out = out_ if out_ is not None and not padded else torch.empty_like(q_padded)
    num_heads = q.shape[-2]
    if seqlens.is_varlen:
        softmax_lse = torch.empty(num_heads, q.shape[0], dtype=torch.float32, device=q.device)
    else:
        softmax_lse = torch.empty(seqlens.batch_size, num_heads, seqlens.max_seqlen_q, dtype=torch.float32, device=q.device)
    p = None
    if return_softmax:
        p = torch.zeros(seqlens.batch_size, num_heads, _round_up(seqlens.max_seqlen_q, 128),
                        _round_up(seqlens.max_seqlen_k, 128), dtype=q.dtype, device=q.device)
    if seqlens.is_varlen:
        # Rows past cu_seqlens_q[-1] belong to no sequence: the seed leaves them alone unless zero_tensors.
        if zero_tensors:
            out.zero_()
            softmax_lse.fill_(float("-inf"))
    if seqlens.max_seqlen_k == 0 or k.shape[0] == 0:
        # No keys at all (the seed's seqlen_k == 0 case): every row sees nothing.
        out.zero_()
        softmax_lse.fill_(float("inf"))
    elif seqlens.batch_size > 0 and q.numel() > 0:
        backend.get(q.device).forward(q_padded, k_padded, v_padded, out, softmax_lse, p, params, seqlens)
    if padded:
        out = out[..., :head_dim]
        if out_ is not None:
            out_.copy_(out)
            out = out_
    seed, offset = _rng_tensors(params.philox_seed, params.philox_offset)
    if p is None:
        p = torch.empty(0, dtype=q.dtype, device=q.device)
    return out, q_padded, k_padded, v_padded, softmax_lse, seed, offset, p


def mha_fwd(q, k, v, out_, alibi_slopes_, p_dropout, softmax_scale, is_causal, window_size_left,
            window_size_right, return_softmax, gen_, *, softcap=0.0):
    """Attention forward on dense inputs.

    q (b, sq, h, d), k/v (b, sk, hk, d) -> (out (b, sq, h, d), q_padded, k_padded, v_padded,
    softmax_lse (b, h, sq) fp32, philox_seed, philox_offset, p (b, h, round128(sq), round128(sk)) or empty).
    """
    _check_qkv(q, k, v, 4)
    batch_size, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    if k.shape[0] != batch_size:
        raise ValueError(f"k must have batch size {batch_size} like q, got shape {tuple(k.shape)}")
    _check_out("out_", out_, q, q.shape)
    _check_dropout(p_dropout, return_softmax)
    _check_window(window_size_left, window_size_right)
    _check_softcap(softcap)
    slopes = _alibi(alibi_slopes_, batch_size, num_heads, q.device)
    left, right = _normalize_window(window_size_left, window_size_right, is_causal, seqlen_k)
    seed, offset = _rng(p_dropout, gen_, q.device)
    params = AttentionParams(_scale(softmax_scale, head_dim), left, right, float(softcap), slopes,
                             float(p_dropout), seed, offset)
    return _forward(q, k, v, out_, params, Seqlens(batch_size, seqlen_q, seqlen_k), return_softmax, False)


def mha_varlen_fwd(q, k, v, out_, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes_, max_seqlen_q,
                   max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
                   window_size_right, return_softmax, gen_, *, softcap=0.0, block_table=None, num_splits=0):
    """Attention forward on packed variable-length sequences.

    q (total_q, h, d), k/v (total_k, hk, d), cu_seqlens_q/k (b + 1,) int32, seqused_k (b,) int32 or None
    -> the 8-tuple of :func:`mha_fwd`, with softmax_lse (h, total_q).
    """
    paged = None
    if block_table is not None:
        # Paged K/V (num_blocks, page_block_size, hk, d): gathered into the packed varlen layout.
        from pyflash.kvcache import gather_paged_varlen

        paged = (k, v)
        k, v = gather_paged_varlen(k, v, block_table, cu_seqlens_k)
    _check_qkv(q, k, v, 3)
    seqlens = _varlen_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    batch_size = seqlens.batch_size
    _check_out("out_", out_, q, q.shape)
    _check_dropout(p_dropout, return_softmax)
    _check_window(window_size_left, window_size_right)
    _check_softcap(softcap)
    num_heads = q.shape[1]
    slopes = _alibi(alibi_slopes_, batch_size, num_heads, q.device)
    left, right = _normalize_window(window_size_left, window_size_right, is_causal, int(max_seqlen_k))
    seed, offset = _rng(p_dropout, gen_, q.device)
    params = AttentionParams(_scale(softmax_scale, q.shape[-1]), left, right, float(softcap), slopes,
                             float(p_dropout), seed, offset)
    result = _forward(q, k, v, out_, params, seqlens, return_softmax, zero_tensors)
    return result if paged is None else result[:2] + paged + result[4:]


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

def _backward(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, params: AttentionParams, seqlens: Seqlens,
              deterministic: bool):
    head_dim = q.shape[-1]
    dout_p, q_p, k_p, v_p, out_p = (_pad_head_dim(t) for t in (dout, q, k, v, out))
    padded = q_p.shape[-1] != head_dim
    # Varlen rows outside every sequence (and keys past seqused_k) get no gradient: start from zero.
    dq = dq_ if dq_ is not None and not padded else torch.empty_like(q_p)
    dk = dk_ if dk_ is not None and not padded else torch.empty_like(k_p)
    dv = dv_ if dv_ is not None and not padded else torch.empty_like(v_p)
    if seqlens.is_varlen:
        for given in (dq, dk, dv):
            given.zero_()
    runs = seqlens.max_seqlen_k > 0 and k.shape[0] > 0 and seqlens.batch_size > 0 and q.numel() > 0
    # A backend writes every row of a dense softmax_d; varlen padding rows and calls without keys get 0.
    softmax_d = torch.empty_like(softmax_lse) if runs and not seqlens.is_varlen else torch.zeros_like(softmax_lse)
    if seqlens.max_seqlen_k == 0 or k.shape[0] == 0:
        for grad in (dq, dk, dv):
            grad.zero_()
    elif seqlens.batch_size > 0 and q.numel() > 0:
        backend.get(q.device).backward(dout_p, q_p, k_p, v_p, out_p, softmax_lse, dq, dk, dv, softmax_d, params,
                                       seqlens, deterministic)
    if padded:
        dq, dk, dv = dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
        for given, grad in ((dq_, dq), (dk_, dk), (dv_, dv)):
            if given is not None:
                given.copy_(grad)
        dq, dk, dv = (given if given is not None else grad for given, grad in ((dq_, dq), (dk_, dk), (dv_, dv)))
    return dq, dk, dv, softmax_d


def _check_backward_common(dout, out, softmax_lse, dq_, dk_, dv_, q, k, lse_shape, p_dropout, window_size_left,
                           window_size_right, softcap):
    _check_tensor("dout", dout, q.dim(), q.device, q.dtype)
    # The seed's callers hand in q/k/v/out padded to a multiple of 8 and dout at the original head dim.
    if not (dout.shape[:-1] == q.shape[:-1] and dout.shape[-1] <= q.shape[-1]
            and _round_up(dout.shape[-1], 8) == _round_up(q.shape[-1], 8)):
        raise ValueError(f"dout must have shape {tuple(q.shape)} (or q's head dim before padding), "
                         f"got {tuple(dout.shape)}")
    _check_tensor("out", out, q.dim(), q.device, q.dtype)
    if not (out.shape[:-1] == q.shape[:-1] and out.shape[-1] in (q.shape[-1], _round_up(q.shape[-1], 8))):
        raise ValueError(f"out must have shape {tuple(q.shape)}, got {tuple(out.shape)}")
    _check_tensor("softmax_lse", softmax_lse, len(lse_shape), q.device, torch.float32)
    _check_shape("softmax_lse", softmax_lse, lse_shape)
    _check_out("dq_", dq_, q, q.shape)
    _check_out("dk_", dk_, k, k.shape)
    _check_out("dv_", dv_, k, k.shape)
    _check_dropout(p_dropout, False)
    _check_window(window_size_left, window_size_right)
    _check_softcap(softcap)


def mha_bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, alibi_slopes_, p_dropout, softmax_scale, is_causal,
            window_size_left, window_size_right, deterministic, philox_seed, philox_offset, *, softcap=0.0):
    """Attention backward on dense inputs -> (dq (b, sq, h, d), dk, dv (b, sk, hk, d), softmax_d (b, h, sq) fp32)."""
    _check_qkv(q, k, v, 4)
    batch_size, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    if k.shape[0] != batch_size:
        raise ValueError(f"k must have batch size {batch_size} like q, got shape {tuple(k.shape)}")
    _check_backward_common(dout, out, softmax_lse, dq_, dk_, dv_, q, k, (batch_size, num_heads, seqlen_q), p_dropout,
                           window_size_left, window_size_right, softcap)
    slopes = _alibi(alibi_slopes_, batch_size, num_heads, q.device)
    left, right = _normalize_window(window_size_left, window_size_right, is_causal, seqlen_k)
    params = AttentionParams(_scale(softmax_scale, head_dim), left, right, float(softcap), slopes, float(p_dropout),
                             _philox("philox_seed", philox_seed, p_dropout),
                             _philox("philox_offset", philox_offset, p_dropout))
    return _backward(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, params, Seqlens(batch_size, seqlen_q, seqlen_k),
                     deterministic)


def mha_varlen_bwd(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, cu_seqlens_q, cu_seqlens_k, alibi_slopes_,
                   max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
                   window_size_right, deterministic, philox_seed, philox_offset, *, softcap=0.0, seqused_k=None):
    """Attention backward on packed variable-length sequences -> (dq, dk, dv, softmax_d (h, total_q) fp32)."""
    _check_qkv(q, k, v, 3)
    seqlens = _varlen_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    batch_size = seqlens.batch_size
    num_heads = q.shape[1]
    _check_backward_common(dout, out, softmax_lse, dq_, dk_, dv_, q, k, (num_heads, q.shape[0]), p_dropout,
                           window_size_left, window_size_right, softcap)
    slopes = _alibi(alibi_slopes_, batch_size, num_heads, q.device)
    left, right = _normalize_window(window_size_left, window_size_right, is_causal, int(max_seqlen_k))
    params = AttentionParams(_scale(softmax_scale, q.shape[-1]), left, right, float(softcap), slopes, float(p_dropout),
                             _philox("philox_seed", philox_seed, p_dropout),
                             _philox("philox_offset", philox_offset, p_dropout))
    return _backward(dout, q, k, v, out, softmax_lse, dq_, dk_, dv_, params, seqlens, deterministic)
