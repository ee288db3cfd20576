"""Inference attention against a KV cache: ``flash_attn_with_kvcache`` (flash_attn 2.x semantics).

One call (1) applies rotary embedding to ``q`` and the new keys ``k``, (2) writes the new ``k``/``v``
into the cache in place at ``cache_seqlens``, (3) attends ``q`` to the cache.

Positions. A cache row (``cache_batch_idx[b]``, or through ``block_table[b]`` when paged) holds
tokens at memory positions ``0 .. capacity``; the sequence occupies ``[cache_leftpad[b],
cache_seqlens[b] + seqlen_new)``. Attention uses sequence-local key indices ``j = position -
cache_leftpad[b]``, so ``seqlen_k = cache_seqlens[b] + seqlen_new - cache_leftpad[b]`` and the usual
bottom-right-aligned causal/window/ALiBi rules of ``pyflash.masks`` apply per batch element.
Rotary angles are indexed by memory position: new key ``i`` at ``cache_seqlens[b] + i``; query ``i``
at ``cache_seqlens[b] + i`` under causal or local attention, else every query at ``cache_seqlens[b]``.

Attention runs in the split-KV decode kernel (``pyflash.kernels.decode``) on the Triton backend and
in ``attention_reference`` (blockwise PyTorch, any device) otherwise.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from pyflash import backend, masks

REFERENCE_BLOCK_N = 256


# ----------------------------------------------------------------------------------------------
# Rotary embedding
# ----------------------------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[1]`` features of ``x (b, s, h, d)`` by the angles at
    ``positions (b, s)``. Interleaved (GPT-J) pairs features (2i, 2i+1); otherwise (GPT-NeoX)
    feature i pairs with i + rotary_dim / 2. Math in fp32, result in x's dtype."""
    half = cos.shape[1]
    rotary_dim = 2 * half
    c = cos[positions].float().unsqueeze(2)  # (b, s, 1, half)
    s = sin[positions].float().unsqueeze(2)
    rot = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


# ----------------------------------------------------------------------------------------------
# Cache addressing
# ----------------------------------------------------------------------------------------------

def _slots(positions: torch.Tensor, batch_rows: torch.Tensor, block_table: Optional[torch.Tensor],
           page_size: int):
    """Indices ``(first, second)`` so that ``cache[first, second]`` is the token at memory
    ``positions (b, n)`` of each batch element: its cache row, or its page through block_table."""
    positions = positions.long()
    if block_table is None:
        return batch_rows[:, None].expand_as(positions), positions
    pages = torch.gather(block_table.long(), 1, positions // page_size)
    return pages, positions % page_size


def append_to_cache(k_cache, v_cache, k, v, cache_seqlens, batch_rows, block_table) -> None:
    """Write k/v ``(b, seqlen_new, hk, d)`` at positions ``cache_seqlens[b] + i`` in place."""
    positions = cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)
    first, second = _slots(positions, batch_rows, block_table, k_cache.shape[1])
    k_cache[first, second] = k
    v_cache[first, second] = v


def gather_paged_varlen(k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                        cu_seqlens_k: torch.Tensor):
    """Packed ``(total_k, hk, d)`` K/V of a paged cache for ``mha_varlen_fwd(..., block_table=)``.

    Sequence ``b`` has ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` keys; its key ``j`` lives in page
    ``block_table[b, j // page_size]`` at row ``j % page_size`` of ``k_pages (num_blocks,
    page_size, hk, d)``. Validates the paged arguments (names them in its errors).
    """
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"block_table must be a 2-D int32 tensor (batch_size, max_num_blocks_per_seq), got "
                        f"{getattr(block_table, 'dtype', type(block_table))} {tuple(getattr(block_table, 'shape', ()))}")
    for name, t in (("k", k_pages), ("v", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be (num_blocks, page_block_size, num_heads_k, head_dim) with block_table, "
                             f"got {tuple(getattr(t, 'shape', ()))}")
        if t.device != block_table.device:
            raise ValueError(f"{name} and block_table must be on one device, got {t.device} and {block_table.device}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"v must have k's shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    page_size = k_pages.shape[1]
    if page_size % 16 != 0:
        raise ValueError(f"page_block_size (k.shape[1]) must be a multiple of 16, got {page_size}")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() != block_table.shape[0] + 1:
        raise ValueError(f"cu_seqlens_k must be ({block_table.shape[0] + 1},) (batch_size + 1) with block_table")
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    capacity = block_table.shape[1] * page_size
    if lengths.numel() and int(lengths.max()) > capacity:
        raise ValueError(f"a sequence of cu_seqlens_k is longer than block_table holds ({capacity} keys)")
    total_k = int(cu_seqlens_k[-1])
    tokens = torch.arange(total_k, device=k_pages.device)
    seq = torch.searchsorted(cu_seqlens_k[1:].long(), tokens, right=True)
    j = tokens - cu_seqlens_k.long()[seq]
    pages = block_table.long()[seq, j // page_size]
    return k_pages[pages, j % page_size], v_pages[pages, j % page_size]


# ----------------------------------------------------------------------------------------------
# The PyTorch reference path
# ----------------------------------------------------------------------------------------------

def attention_reference(q, k_cache, v_cache, seqlens_k, leftpad, batch_rows, block_table, softmax_scale,
                        window_left, window_right, softcap, alibi_slopes, out, softmax_lse,
                        block_n: int = REFERENCE_BLOCK_N) -> None:
    """Blockwise online-softmax attention of ``q (b, sq, h, d)`` to the cached keys, fp32 math.

    ``seqlens_k (b,)`` is the end of each sequence in memory positions, ``leftpad (b,)`` its start;
    keys are gathered one block of ``block_n`` positions at a time (through ``block_table`` if paged).
    Writes ``out (b, sq, h, d)`` and ``softmax_lse (b, h, sq)``.
    """
    batch, seqlen_q, num_heads, head_dim = q.shape
    num_heads_k = k_cache.shape[2]
    groups = num_heads // num_heads_k
    seqlen_k = (seqlens_k - leftpad).long()  # keys of each sequence, (b,)
    # Scores are (b, hk, groups, sq, n); per-batch quantities broadcast as (b, 1, 1, 1, 1).
    seqlen_k_b = seqlen_k.view(batch, 1, 1, 1, 1)
    rows = torch.arange(seqlen_q, device=q.device).view(1, 1, 1, seqlen_q, 1)
    qf = q.float().view(batch, seqlen_q, num_heads_k, groups, head_dim).permute(0, 2, 3, 1, 4)
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().expand(batch, num_heads).reshape(batch, num_heads_k, groups, 1, 1)
    row_max = torch.full((batch, num_heads_k, groups, seqlen_q, 1), -math.inf, device=q.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(batch, num_heads_k, groups, seqlen_q, head_dim, device=q.device)
    max_seqlen_k = int(seqlen_k.max()) if batch > 0 else 0
    for start in range(0, max_seqlen_k, block_n):
        cols = torch.arange(start, min(start + block_n, max_seqlen_k), device=q.device)
        positions = (leftpad.long()[:, None] + cols).clamp(max=_capacity(k_cache, block_table) - 1)
        first, second = _slots(positions, batch_rows, block_table, k_cache.shape[1])
        k_blk = k_cache[first, second].float().permute(0, 2, 1, 3).unsqueeze(2)  # (b, hk, 1, n, d)
        v_blk = v_cache[first, second].float().permute(0, 2, 1, 3).unsqueeze(2)
        cols5 = cols.view(1, 1, 1, 1, -1)
        # Slots past a shorter sequence's end may hold anything (NaN): p = 0 does not cancel NaN in P V.
        v_blk = v_blk.masked_fill((cols5 >= seqlen_k_b).transpose(-1, -2), 0.0)
        scores = masks.apply_softcap(torch.matmul(qf, k_blk.transpose(-1, -2)) * softmax_scale, softcap)
        if slopes is not None:
            scores = scores + masks.alibi_bias(slopes, rows, cols5, seqlen_q, seqlen_k_b)
        visible = masks.visible(rows, cols5, seqlen_q, seqlen_k_b, window_left, window_right)
        scores = scores.masked_fill(~visible, -math.inf)
        new_max = torch.maximum(row_max, scores.amax(-1, keepdim=True))
        safe_max = new_max.masked_fill(new_max == -math.inf, 0.0)  # rows with nothing visible yet
        p = torch.exp(scores - safe_max)
        correction = torch.exp(row_max - safe_max)
        row_sum = row_sum * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + torch.matmul(p, v_blk)
        row_max = new_max
    empty = row_sum == 0
    result = (acc / row_sum.masked_fill(empty, 1.0)).masked_fill(empty, 0.0)
    lse = (row_max + torch.log(row_sum)).masked_fill(empty, math.inf)
    out.copy_(result.permute(0, 3, 1, 2, 4).reshape(batch, seqlen_q, num_heads, head_dim))
    softmax_lse.copy_(lse.reshape(batch, num_heads, seqlen_q))


def _capacity(k_cache: torch.Tensor, block_table: Optional[torch.Tensor]) -> int:
    """Tokens one sequence can hold: the cache's seqlen, or pages per sequence * page size."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def _check_index(name: str, t: Optional[torch.Tensor], batch: int, device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {getattr(t, 'dtype', type(t))}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (batch_size), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
              cache_leftpad, block_table, alibi_slopes, num_splits):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    batch, _, num_heads, head_dim = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_heads_k = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q's {head_dim}")
    if head_dim > 256:
        raise ValueError(f"head dim must be at most 256, got {head_dim}")
    if num_heads_k == 0 or num_heads % num_heads_k != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_heads_k ({num_heads_k})")
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be an int32 tensor, got {getattr(block_table, 'dtype', type(block_table))}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape ({batch}, max_num_blocks_per_seq), got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table must be on {q.device}, got {block_table.device}")
        if k_cache.shape[1] % 16 != 0:
            raise ValueError(f"paged cache: page size (k_cache.shape[1]) must be a multiple of 16, got {k_cache.shape[1]}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with a paged cache (block_table)")
    elif k_cache.shape[0] < batch and cache_batch_idx is None:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows, fewer than batch size {batch}")
    if isinstance(cache_seqlens, torch.Tensor):
        _check_index("cache_seqlens", cache_seqlens, batch, q.device)
    elif cache_seqlens is not None and not isinstance(cache_seqlens, int):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens)}")
    _check_index("cache_batch_idx", cache_batch_idx, batch, q.device)
    _check_index("cache_leftpad", cache_leftpad, batch, q.device)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("cache_seqlens must be given with new k/v (where to append them)")
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != batch or t.shape[2:] != (num_heads_k, head_dim):
                raise ValueError(f"{name} must have shape ({batch}, seqlen_new, {num_heads_k}, {head_dim}), got {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have the same seqlen_new, got {k.shape[1]} and {v.shape[1]}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k/v to append")
        if rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos/rotary_sin must both be (seqlen_ro, rotary_dim / 2), got "
                             f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > head_dim:
            raise ValueError(f"rotary_dim (2 * rotary_cos.shape[1] = {2 * rotary_cos.shape[1]}) must be <= head dim {head_dim}")
        if rotary_cos.shape[0] < _capacity(k_cache, block_table):
            raise ValueError(f"rotary_cos/rotary_sin must cover the cache's {_capacity(k_cache, block_table)} "
                             f"positions, got {rotary_cos.shape[0]}")
        if rotary_cos.device != q.device or rotary_sin.device != q.device:
            raise ValueError(f"rotary_cos/rotary_sin must be on {q.device}")
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.shape not in ((num_heads,), (batch, num_heads)):
            raise ValueError(f"alibi_slopes must be float32 ({num_heads},) or ({batch}, {num_heads}), got "
                             f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be on {q.device}, got {alibi_slopes.device}")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention of ``q`` to a KV cache, appending new keys/values to the cache in place first.

    Arguments:
        q: (batch_size, seqlen_q, num_heads, head_dim).
        k_cache, v_cache: (batch_size_cache, seqlen_cache, num_heads_k, head_dim), or with
            ``block_table`` a paged cache (num_blocks, page_block_size, num_heads_k, head_dim);
            page_block_size a multiple of 16.
        k, v: optional (batch_size, seqlen_new, num_heads_k, head_dim): written into the cache at
            positions ``cache_seqlens[b] + i`` (in place; k after rotary) and attended to.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), seqlen_ro >= the cache
            capacity: rotary embedding on the first rotary_dim features of q and the new k. The new
            k is rotated at positions ``cache_seqlens + i``; q at ``cache_seqlens + i`` when causal
            or local, else all of q at ``cache_seqlens``. Requires k/v.
        cache_seqlens: int or (batch_size,) int32: tokens already in each cache row (memory
            positions, including leftpad); None means the full capacity.
        cache_batch_idx: optional (batch_size,) int32: the cache row of each batch element
            (default 0..batch_size-1). Not with block_table.
        cache_leftpad: optional (batch_size,) int32: the memory position where each sequence starts.
        block_table: optional (batch_size, max_num_blocks_per_seq) int32: the pages of each sequence.
        softmax_scale: default 1 / sqrt(head_dim).
        causal: bottom-right-aligned causal mask. window_size: (left, right), -1 = unbounded.
        softcap: > 0 applies ``softcap * tanh(s / softcap)`` to the scores.
        rotary_interleaved: True rotates pairs (2i, 2i+1) (GPT-J); False pairs i with i + rotary_dim/2
            (GPT-NeoX).
        alibi_slopes: optional float32 (num_heads,) or (batch_size, num_heads): bias
            ``-slope * |i + seqlen_k - seqlen_q - j|``.
        num_splits: how many parts the key range is split into (0: chosen from the SM count).
            Results do not depend on it beyond rounding.
        return_softmax_lse: also return the logsumexp (batch_size, num_heads, seqlen_q), float32
            (+inf for a row that sees no key).
    Returns:
        out (batch_size, seqlen_q, num_heads, head_dim) in q's dtype, and softmax_lse if asked.
    """
    _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
              cache_leftpad, block_table, alibi_slopes, num_splits)
    batch, seqlen_q, num_heads, head_dim = q.shape
    device = q.device
    capacity = _capacity(k_cache, block_table)
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    window_left, window_right = int(window_size[0]), int(window_size[1])
    if causal:
        window_right = 0
    # As flash_attn: a window reaching past the cache is unbounded.
    window_left = -1 if window_left >= capacity else window_left
    window_right = -1 if window_right >= capacity else window_right
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=device)
    elif isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    # Absent batch_idx / leftpad stay None for the decode kernel: no helper kernels per decoding step.
    batch_rows = cache_batch_idx  # int32; the kernel widens it itself
    leftpad = cache_leftpad

    def all_rows():
        return batch_rows.long() if batch_rows is not None else torch.arange(batch, device=device)

    def all_leftpad():
        return leftpad if leftpad is not None else torch.zeros(batch, dtype=torch.int32, device=device)

    seqlens_k = cache_seqlens
    if k is not None:
        if rotary_cos is not None:
            new_positions = cache_seqlens.long()[:, None] + torch.arange(max(k.shape[1], seqlen_q), device=device)
            # Queries past the last appended key may run off the table: they keep its last angle
            # (flash_attn reads past the end there) rather than index out of bounds on the device.
            new_positions = new_positions.clamp(max=rotary_cos.shape[0] - 1)
            k = apply_rotary(k, rotary_cos, rotary_sin, new_positions[:, :k.shape[1]], rotary_interleaved)
            local = window_left >= 0 or window_right >= 0
            q_positions = new_positions[:, :seqlen_q] if local else new_positions[:, :1].expand(batch, seqlen_q)
            q = apply_rotary(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
        append_to_cache(k_cache, v_cache, k, v, cache_seqlens, all_rows(), block_table)
        seqlens_k = cache_seqlens + k.shape[1]

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    softmax_lse = torch.empty(batch, num_heads, seqlen_q, dtype=torch.float32, device=device)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.expand(batch, num_heads)
    if batch > 0 and seqlen_q > 0:
        if backend.name_for(device) == "triton":
            from pyflash.kernels import decode

            decode.decode(q, k_cache, v_cache, seqlens_k, leftpad, batch_rows, block_table, softmax_scale,
                          window_left, window_right, softcap, alibi_slopes, num_splits, out, softmax_lse)
        else:
            attention_reference(q, k_cache, v_cache, seqlens_k, all_leftpad(), all_rows(), block_table,
                                softmax_scale, window_left, window_right, softcap, alibi_slopes, out,
                                softmax_lse)
    return (out, softmax_lse) if return_softmax_lse else out
