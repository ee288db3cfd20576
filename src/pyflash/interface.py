"""flash_attn 2.x-compatible attention functions and a drop-in for torch's scaled_dot_product_attention.

Code written for ``flash_attn`` changes only its import::

    from pyflash import flash_attn_func  # was: from flash_attn import flash_attn_func

The public functions are thin wrappers over four ``torch.library`` custom ops in the ``pyflash``
namespace: ``fwd``/``bwd`` for dense batches, ``varlen_fwd``/``varlen_bwd`` for packed sequences of
different lengths. The ops call :mod:`pyflash.api` (validation, head-dim padding, backend choice),
have fake implementations that give every output's shape, and registered autograd, so
``torch.compile(model, fullgraph=True)`` traces a model that uses them without a graph break.

Layouts: dense ``q (batch, seqlen_q, nheads, headdim)``, ``k, v (batch, seqlen_k, nheads_k, headdim)``;
varlen ``q (total_q, nheads, headdim)``, ``k, v (total_k, nheads_k, headdim)`` with ``cu_seqlens_*``
int32 ``(batch + 1,)`` cumulative offsets. ``nheads % nheads_k == 0`` (MQA/GQA). Causal masks and
sliding windows are aligned to the bottom-right corner of the attention matrix, as in flash_attn 2.1+.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from pyflash import api

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "scaled_dot_product_attention",
]


def _round128(n: int) -> int:
    return (n + 127) // 128 * 128


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # The kernels accept any strides but the last; autograd may hand us expanded (stride 0) grads.
    return t if t.stride(-1) == 1 else t.contiguous()


def _rng_state_fake() -> Tensor:
    """philox_seed / philox_offset: int64 CPU scalars whatever the device (SPEC section 1)."""
    return torch.empty((), dtype=torch.int64, device="cpu")


# ---------------------------------------------------------------------------------------------
# Dense ops: q (b, sq, h, d), k/v (b, sk, hk, d); out like q, lse (b, h, sq) fp32.


@torch.library.custom_op("pyflash::fwd", mutates_args=())
def _fwd(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool,
         window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[Tensor],
         deterministic: bool, return_softmax: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, softmax_lse, p, philox_seed, philox_offset); p is empty unless return_softmax.

    ``deterministic`` is only carried to the backward."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _, _, _, _, softmax_lse, philox_seed, philox_offset, p = api.mha_fwd(
        q, k, v, out, alibi_slopes, dropout_p, softmax_scale, causal, window_size_left,
        window_size_right, return_softmax, None, softcap=softcap)
    return out, softmax_lse, p, philox_seed, philox_offset


@_fwd.register_fake
def _fwd_fake(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
              alibi_slopes, deterministic, return_softmax):
    batch, seqlen_q, num_heads, _ = q.shape
    softmax_lse = q.new_empty((batch, num_heads, seqlen_q), dtype=torch.float32)
    if return_softmax:
        p = q.new_empty((batch, num_heads, _round128(seqlen_q), _round128(k.shape[1])))
    else:
        p = q.new_empty((0,))
    return q.new_empty(q.shape), softmax_lse, p, _rng_state_fake(), _rng_state_fake()


@torch.library.custom_op("pyflash::bwd", mutates_args=())
def _bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
         philox_seed: Tensor, philox_offset: Tensor, dropout_p: float, softmax_scale: float,
         causal: bool, window_size_left: int, window_size_right: int, softcap: float,
         alibi_slopes: Optional[Tensor], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) in the shapes of q, k, v."""
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    api.mha_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, dropout_p, softmax_scale,
                causal, window_size_left, window_size_right, deterministic, philox_seed, philox_offset,
                softcap=softcap)
    return dq, dk, dv


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
     alibi_slopes, deterministic, _) = inputs
    out, softmax_lse, _, philox_seed, philox_offset = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, philox_seed, philox_offset, alibi_slopes)
    ctx.options = (dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap)
    ctx.deterministic = deterministic


def _fwd_backward(ctx, dout, *unused_grads):
    q, k, v, out, softmax_lse, philox_seed, philox_offset, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = _bwd(_last_dim_contiguous(dout), q, k, v, out, softmax_lse, philox_seed,
                      philox_offset, *ctx.options, alibi_slopes, ctx.deterministic)
    return (dq, dk, dv) + (None,) * 9


torch.library.register_autograd("pyflash::fwd", _fwd_backward, setup_context=_fwd_setup_context)


# ---------------------------------------------------------------------------------------------
# Varlen ops: q (total_q, h, d), k/v (total_k, hk, d); out like q, lse (h, total_q) fp32.


@torch.library.custom_op("pyflash::varlen_fwd", mutates_args=())
def _varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float,
                causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                alibi_slopes: Optional[Tensor], deterministic: bool, return_softmax: bool,
                block_table: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, softmax_lse, p, philox_seed, philox_offset); p is empty unless return_softmax.

    ``deterministic`` is only carried to the backward."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _, _, _, _, softmax_lse, philox_seed, philox_offset, p = api.mha_varlen_fwd(
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, None, alibi_slopes, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, False, causal, window_size_left, window_size_right, return_softmax,
        None, softcap=softcap, block_table=block_table)
    return out, softmax_lse, p, philox_seed, philox_offset


@_varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                     softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                     deterministic, return_softmax, block_table):
    total_q, num_heads, _ = q.shape
    softmax_lse = q.new_empty((num_heads, total_q), dtype=torch.float32)
    if return_softmax:
        batch = cu_seqlens_q.shape[0] - 1
        p = q.new_empty((batch, num_heads, _round128(max_seqlen_q), _round128(max_seqlen_k)))
    else:
        p = q.new_empty((0,))
    return q.new_empty(q.shape), softmax_lse, p, _rng_state_fake(), _rng_state_fake()


@torch.library.custom_op("pyflash::varlen_bwd", mutates_args=())
def _varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, philox_seed: Tensor,
                philox_offset: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                softcap: float, alibi_slopes: Optional[Tensor],
                deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) in the shapes of q, k, v."""
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    api.mha_varlen_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                       alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, False,
                       causal, window_size_left, window_size_right, deterministic, philox_seed,
                       philox_offset, softcap=softcap)
    return dq, dk, dv


@_varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
     window_size_left, window_size_right, softcap, alibi_slopes, deterministic, _, block_table) = inputs
    out, softmax_lse, _, philox_seed, philox_offset = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, philox_seed,
                          philox_offset, alibi_slopes)
    ctx.options = (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left,
                   window_size_right, softcap)
    ctx.deterministic = deterministic
    ctx.paged = block_table is not None


def _varlen_fwd_backward(ctx, dout, *unused_grads):
    if ctx.paged:
        raise NotImplementedError("flash_attn_varlen_func: no backward with a paged KV cache (block_table)")
    (q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, philox_seed, philox_offset,
     alibi_slopes) = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd(_last_dim_contiguous(dout), q, k, v, out, softmax_lse, cu_seqlens_q,
                             cu_seqlens_k, philox_seed, philox_offset, *ctx.options, alibi_slopes,
                             ctx.deterministic)
    return (dq, dk, dv) + (None,) * 14


torch.library.register_autograd("pyflash::varlen_fwd", _varlen_fwd_backward,
                                setup_context=_varlen_fwd_setup_context)


# ---------------------------------------------------------------------------------------------
# flash_attn's public functions.


def _result(out: Tensor, softmax_lse: Tensor, p: Tensor, dropout_p: float, return_attn_probs: bool):
    if not return_attn_probs:
        return out
    return out, softmax_lse, (p if dropout_p > 0 else None)


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_attn_probs):
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, softmax_lse, p, _, _ = _fwd(q, k, v, dropout_p, softmax_scale, causal, window_size[0],
                                     window_size[1], softcap, alibi_slopes, deterministic,
                                     return_attn_probs and dropout_p > 0)
    return _result(out, softmax_lse, p, dropout_p, return_attn_probs)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, block_table):
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, softmax_lse, p, _, _ = _varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
        causal, window_size[0], window_size[1], softcap, alibi_slopes, deterministic,
        return_attn_probs and dropout_p > 0, block_table)
    return _result(out, softmax_lse, p, dropout_p, return_attn_probs)


_COMMON_ARGS_DOC = """
        dropout_p: float. Dropout probability on the attention probabilities (pass 0.0 in evaluation).
        softmax_scale: float. Scaling of QK^T before the softmax; default 1 / sqrt(headdim).
        causal: bool. Causal mask, aligned to the bottom-right corner of the attention matrix.
        window_size: (left, right). Sliding window: query i sees keys in
            [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 means unbounded.
        softcap: float. > 0 applies softcap * tanh(scores / softcap) to the scores.
        alibi_slopes: (nheads,) or (batch, nheads), fp32. Adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: bool. Bit-identical gradients from run to run.
        return_attn_probs: bool. Also return the logsumexp and, with dropout, the probabilities
            (testing only: they may not have the right scaling).
"""


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over a padded batch; K/V may have fewer heads than Q (MQA/GQA).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim)
        k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0
        {common}
    Returns:
        out: (batch, seqlen_q, nheads, headdim)
        softmax_lse [if return_attn_probs]: (batch, nheads, seqlen_q) fp32, natural-log logsumexp
            of each row's scores (+inf for a row that sees no key).
        S_dmask [if return_attn_probs]: (batch, nheads, seqlen_q rounded up to 128, seqlen_k rounded
            up to 128), the probabilities with dropped entries negated; None without dropout.
    """
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` on Q, K, V stacked in one tensor (self-attention, same head count).

    Arguments:
        qkv: (batch, seqlen, 3, nheads, headdim)
        {common}
    Returns: out (batch, seqlen, nheads, headdim) [, softmax_lse, S_dmask] as :func:`flash_attn_func`.
    The gradient is one tensor shaped like qkv.
    """
    q, k, v = qkv.unbind(2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` with K and V stacked in one tensor.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim)
        kv: (batch, seqlen_k, 2, nheads_k, headdim), nheads % nheads_k == 0
        {common}
    Returns: out (batch, seqlen_q, nheads, headdim) [, softmax_lse, S_dmask] as :func:`flash_attn_func`.
    """
    k, v = kv.unbind(2)
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """Attention over sequences of different lengths packed along the first dimension.

    Arguments:
        q: (total_q, nheads, headdim), total_q = the sum of the query lengths
        k, v: (total_k, nheads_k, headdim), nheads % nheads_k == 0; with ``block_table``, the paged
            cache (num_blocks, page_block_size, nheads_k, headdim) (forward only)
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32, cumulative lengths starting at 0: sequence s
            owns rows cu_seqlens[s]:cu_seqlens[s + 1]
        max_seqlen_q, max_seqlen_k: int, the longest query / key sequence
        {common}
        block_table: (batch, max_num_blocks_per_seq) int32, optional paged KV cache.
    Returns:
        out: (total_q, nheads, headdim)
        softmax_lse [if return_attn_probs]: (nheads, total_q) fp32
        S_dmask [if return_attn_probs]: (batch, nheads, max_seqlen_q rounded up to 128,
            max_seqlen_k rounded up to 128); None without dropout.
    """
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                             deterministic, return_attn_probs, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on Q, K, V stacked in one tensor (self-attention).

    Arguments:
        qkv: (total, 3, nheads, headdim)
        cu_seqlens: (batch + 1,) int32; max_seqlen: int
        {common}
    Returns: out (total, nheads, headdim) [, softmax_lse, S_dmask] as :func:`flash_attn_varlen_func`.
    """
    q, k, v = qkv.unbind(1)
    return _varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                             return_attn_probs, None)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` with K and V stacked in one tensor.

    Arguments:
        q: (total_q, nheads, headdim)
        kv: (total_k, 2, nheads_k, headdim), nheads % nheads_k == 0
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32; max_seqlen_q, max_seqlen_k: int
        {common}
    Returns: out (total_q, nheads, headdim) [, softmax_lse, S_dmask] as :func:`flash_attn_varlen_func`.
    """
    k, v = kv.unbind(1)
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                             deterministic, return_attn_probs, None)


for _function in (flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func,
                  flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func,
                  flash_attn_varlen_kvpacked_func):
    _function.__doc__ = _function.__doc__.replace("        {common}\n", _COMMON_ARGS_DOC.lstrip("\n"))
del _function


# ---------------------------------------------------------------------------------------------
# torch.nn.functional.scaled_dot_product_attention


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same arguments, same result).

    Arguments:
        query: (batch, nheads, seqlen_q, headdim)
        key, value: (batch, nheads_k, seqlen_k, headdim); nheads_k != nheads needs enable_gqa=True
        attn_mask: must be None: FlashAttention takes no arbitrary mask (ValueError otherwise).
        dropout_p: float. Dropout on the attention probabilities (pass 0.0 in evaluation).
        is_causal: bool. SDPA's causal mask, aligned to the top-left corner: query i sees keys j <= i.
        scale: float. Default 1 / sqrt(headdim).
        enable_gqa: bool. Query head i reads key/value head i // (nheads // nheads_k).
    Returns:
        (batch, nheads, seqlen_q, headdim), a transposed view of a (batch, seqlen_q, nheads, headdim)
        tensor. The inputs are read through transposed views, not copied (is_causal with
        seqlen_q > seqlen_k runs two calls and concatenates them).
    """
    if attn_mask is not None:
        raise ValueError(
            "pyflash.scaled_dot_product_attention: attn_mask is not supported (FlashAttention takes no "
            "arbitrary mask); use is_causal=True, pyflash.flash_attn_func's window_size/alibi_slopes, "
            "or torch.nn.functional.scaled_dot_product_attention")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("pyflash.scaled_dot_product_attention: query, key and value must be 4-D "
                         f"(batch, nheads, seqlen, headdim), got {query.dim()}-D, {key.dim()}-D, "
                         f"{value.dim()}-D")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError("pyflash.scaled_dot_product_attention: key has "
                         f"{key.shape[1]} heads and query {query.shape[1]}: pass enable_gqa=True")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if is_causal:
        out = _top_left_causal(q, k, v, dropout_p, scale)
    else:
        out = _attention(q, k, v, dropout_p, scale, False, (-1, -1), 0.0, None, False, False)
    return out.transpose(1, 2)


def _top_left_causal(q, k, v, dropout_p, scale):
    """SDPA's causal mask (key j visible to query i iff j <= i) with flash_attn's bottom-right one.

    Bottom-right causal shows query i the keys j <= i + seqlen_k - seqlen_q; the corners coincide
    when seqlen_q == seqlen_k. With fewer queries than keys, keys past seqlen_q are visible to no
    query, so dropping them makes the matrix square. With more queries, the first seqlen_k queries
    form a square causal block and every later query sees all the keys.
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if seqlen_q <= seqlen_k:
        return _attention(q, k[:, :seqlen_q], v[:, :seqlen_q], dropout_p, scale, True, (-1, -1), 0.0,
                          None, False, False)
    square = _attention(q[:, :seqlen_k], k, v, dropout_p, scale, True, (-1, -1), 0.0, None, False,
                        False)
    below = _attention(q[:, seqlen_k:], k, v, dropout_p, scale, False, (-1, -1), 0.0, None, False,
                       False)
    return torch.cat([square, below], dim=1)
