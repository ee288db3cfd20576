"""Context parallelism: ring attention over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Import it explicitly (``import pyflash.distributed``); ``import pyflash`` does not load it.

Each rank of a process group holds a shard of every sequence: its queries, keys and values. The K/V
shards travel around the ring (rank r sends to r + 1 and receives from r - 1) with point-to-point ops
that are posted before the attention of the current block is computed, so the transfer of the next
block overlaps the compute of this one. Every block runs the ordinary kernels through ``pyflash.api``
and its partial output is folded into the running result through the logsumexp::

    lse = log(sum_i exp(lse_i)),    out = sum_i exp(lse_i - lse) * out_i

A row that sees no key of a block has ``lse_i = +inf`` there (pyflash's convention): weight 0.

The backward runs the kernels' backward on each block with the global ``out`` and ``lse``. With the
global lse the block's probabilities ``exp(s - lse)`` are the global ones and ``delta = rowsum(dO * O)``
is the global delta, so the block's dq/dk/dv are exactly its share of the gradient. dq accumulates
locally; each dK/dV accumulator travels with its K/V block and arrives home after a full turn.

Causal attention is balanced by the zigzag layout: the global sequence is cut into 2W equal chunks and
rank r holds chunks r and 2W-1-r, as the front and back halves of its shard (:func:`zigzag_split`).
Against the K/V shard of rank src:

- src == r: causal attention of the local shard on itself (the kernel's causal flag; chunk r sees
  chunk r causally, chunk 2W-1-r sees chunk r fully and itself causally);
- src < r:  every local query sees the front half of src's keys (chunk src), none of the back half;
- src > r:  only the back half of the queries (chunk 2W-1-r) sees src's keys, all of them.

Every step is thus half a shard-by-shard block of work on every rank.

Example, under ``torchrun --nproc-per-node W`` (``scripts/ring_attention_bench.py`` is a full one)::

    dist.init_process_group("nccl")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    q, k, v = (zigzag_split(t, world_size, rank) for t in (q_full, k_full, v_full))  # (b, s / W, h, d)
    out = ring_flash_attn_func(q, k, v, causal=True)                                  # (b, s / W, h, d)
    # gathered = [torch.empty_like(out) for _ in range(world_size)]; dist.all_gather(gathered, out)
    # zigzag_merge(gathered) is then the attention of the whole sequence.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from pyflash import api

__all__ = [
    "ring_flash_attn_func",
    "ring_flash_attn_varlen_func",
    "zigzag_split",
    "zigzag_merge",
    "zigzag_split_varlen",
    "zigzag_merge_varlen",
]

_KV_TAG, _DKV_TAG = 0, 1  # gloo matches messages by tag: keep the two streams apart
_FRONT, _BACK = 0, 1  # the halves of a zigzag shard


# ----------------------------------------------------------------------------------------------
# the zigzag layout
# ----------------------------------------------------------------------------------------------

def _chunk_size(length: int, world_size: int, what: str) -> int:
    if length % (2 * world_size):
        raise ValueError(f"{what} ({length}) must be divisible by 2 * world_size ({2 * world_size}) for the zigzag split")
    return length // (2 * world_size)


def zigzag_split(x: torch.Tensor, world_size: int, rank: int, dim: int = 1) -> torch.Tensor:
    """The shard of rank ``rank``: chunks ``rank`` and ``2 * world_size - 1 - rank`` of ``x`` cut into
    ``2 * world_size`` equal chunks along ``dim`` (the sequence dim: 1 for ``(b, s, h, d)``)."""
    chunk = _chunk_size(x.shape[dim], world_size, f"x.shape[{dim}]")
    front = x.narrow(dim, rank * chunk, chunk)
    back = x.narrow(dim, (2 * world_size - 1 - rank) * chunk, chunk)
    return torch.cat([front, back], dim)


def zigzag_merge(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_split`: the full tensor from the shards of ranks 0..W-1, in order."""
    halves = [shard.chunk(2, dim) for shard in shards]
    return torch.cat([front for front, _ in halves] + [back for _, back in reversed(halves)], dim)


def zigzag_split_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """The shard of rank ``rank`` of packed sequences ``x (total, ...)`` with global offsets ``cu_seqlens``:
    the zigzag shard of every sequence, packed in order. Every sequence length must be divisible by
    ``2 * world_size``; the shard's offsets are then ``cu_seqlens // world_size`` on every rank."""
    bounds = cu_seqlens.tolist()
    parts = [zigzag_split(x[start:end], world_size, rank, dim=0) for start, end in zip(bounds, bounds[1:])]
    return torch.cat(parts, 0) if parts else x[:0]


def zigzag_merge_varlen(shards: Sequence[torch.Tensor], cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`zigzag_split_varlen`; ``cu_seqlens`` are the global offsets."""
    world_size = len(shards)
    bounds = [c // world_size for c in cu_seqlens.tolist()]
    parts = [zigzag_merge([shard[start:end] for shard in shards], dim=0) for start, end in zip(bounds, bounds[1:])]
    return torch.cat(parts, 0) if parts else shards[0][:0]


# ----------------------------------------------------------------------------------------------
# the ring
# ----------------------------------------------------------------------------------------------

class _Ring:
    """This rank's place in the group: it sends to the next rank and receives from the previous one."""

    def __init__(self, group: Optional[dist.ProcessGroup]):
        if not dist.is_initialized():
            raise RuntimeError("ring attention needs torch.distributed.init_process_group() first")
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        self.world_size = dist.get_world_size(group)
        self.next = self._global_rank((self.rank + 1) % self.world_size)
        self.prev = self._global_rank((self.rank - 1) % self.world_size)

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def shift(self, tensors: Sequence[torch.Tensor], tag: int) -> Tuple[List[torch.Tensor], list]:
        """Posts the sends of ``tensors`` to the next rank and the receives of the previous rank's into
        new buffers; returns the buffers (valid after :func:`_wait`) and the pending requests."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in received]
        return received, dist.batch_isend_irecv(ops)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _block(rank: int, src: int, causal: bool):
    """(query half, key half, causal flag) of this rank's queries against rank src's keys; None: all rows."""
    if not causal:
        return None, None, False
    if src == rank:
        return None, None, True
    if src < rank:
        return None, _FRONT, False
    return _BACK, None, False


class _Rows:
    """Token rows along ``dim``: a slice when they form one run, an index tensor otherwise."""

    def __init__(self, dim: int, rows):
        self.dim = dim
        self.rows = rows

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        return x[(slice(None),) * self.dim + (self.rows,)]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rows, slice):
            return self._view(x)
        return x.index_select(self.dim, self.rows)

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if isinstance(self.rows, slice):
            self._view(dst).copy_(src)
        else:
            dst.index_copy_(self.dim, self.rows, src.to(dst.dtype))

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if isinstance(self.rows, slice):
            self._view(dst).add_(src)
        else:
            dst.index_add_(self.dim, self.rows, src.to(dst.dtype))


class _Layout:
    """Where a block's rows are: ``all`` (every row) and, for causal, ``halves_q``/``halves_k``."""

    def q_rows(self, half) -> _Rows:
        return self.all if half is None else self.halves_q[half]

    def k_rows(self, half) -> _Rows:
        return self.all if half is None else self.halves_k[half]


class _Dense(_Layout):
    """q (b, sq, h, d), k/v (b, sk, hk, d); the zigzag halves are the halves of dim 1."""

    def __init__(self, seqlen_q: int, seqlen_k: int):
        self.all = _Rows(1, slice(None))
        self.halves_q = (_Rows(1, slice(0, seqlen_q // 2)), _Rows(1, slice(seqlen_q // 2, seqlen_q)))
        self.halves_k = (_Rows(1, slice(0, seqlen_k // 2)), _Rows(1, slice(seqlen_k // 2, seqlen_k)))

    def forward(self, q, k, v, q_half, k_half, causal, softmax_scale):
        result = api.mha_fwd(q, k, v, None, None, 0.0, softmax_scale, causal, -1, -1, False, None)
        return result[0], result[4]

    def backward(self, dout, q, k, v, out, lse, q_half, k_half, causal, softmax_scale, deterministic):
        dq, dk, dv, _ = api.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, softmax_scale, causal,
                                    -1, -1, deterministic, 0, 0)
        return dq, dk, dv


class _Varlen(_Layout):
    """q (total_q, h, d), k/v (total_k, hk, d) with local offsets; the zigzag halves are the halves of
    every sequence (gathered by index when there are several sequences)."""

    def __init__(self, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q: int, causal: bool):
        self.all = _Rows(0, slice(None))
        self.seqlens = {None: (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))}
        bounds = cu_seqlens_q.tolist()
        # Rows past the last sequence belong to no sequence: have the kernels zero them.
        self.zero_tensors = bounds[-1] < total_q
        if not causal:
            return
        if not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise ValueError("causal ring attention needs cu_seqlens_q == cu_seqlens_k (self-attention of zigzag shards)")
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        if any(n % 2 for n in lengths):
            raise ValueError(f"causal ring attention needs every local sequence length even (two zigzag chunks), got {lengths}")
        halves = []
        for half in (_FRONT, _BACK):
            runs = [(start + half * n // 2, start + (half + 1) * n // 2) for start, n in zip(bounds, lengths)]
            if len(runs) == 1:
                halves.append(_Rows(0, slice(*runs[0])))
            else:
                index = torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in runs])
                halves.append(_Rows(0, index.to(cu_seqlens_q.device)))
        self.halves_q = self.halves_k = tuple(halves)
        cu_half = torch.div(cu_seqlens_q, 2, rounding_mode="floor")
        max_half = int(max_seqlen_q) // 2
        self.seqlens[_FRONT] = self.seqlens[_BACK] = (cu_half, cu_half, max_half, max_half)

    def _offsets(self, q_half, k_half):
        cu_q, _, max_q, _ = self.seqlens[q_half]
        _, cu_k, _, max_k = self.seqlens[k_half]
        return cu_q, cu_k, max_q, max_k

    def forward(self, q, k, v, q_half, k_half, causal, softmax_scale):
        cu_q, cu_k, max_q, max_k = self._offsets(q_half, k_half)
        zero = self.zero_tensors and q_half is None
        result = api.mha_varlen_fwd(q, k, v, None, cu_q, cu_k, None, None, max_q, max_k, 0.0, softmax_scale, zero,
                                    causal, -1, -1, False, None)
        return result[0], result[4]

    def backward(self, dout, q, k, v, out, lse, q_half, k_half, causal, softmax_scale, deterministic):
        cu_q, cu_k, max_q, max_k = self._offsets(q_half, k_half)
        dq, dk, dv, _ = api.mha_varlen_bwd(dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, None, max_q, max_k,
                                           0.0, softmax_scale, False, causal, -1, -1, deterministic, 0, 0)
        return dq, dk, dv


def _merge(out, lse, block_out, block_lse):
    """Folds a block's partial result into the running one. ``lse`` (token-major, ``out.shape[:-1]``) is
    -inf where nothing was seen yet; a block's +inf (row saw no key there) counts as -inf: weight 0."""
    block_lse = block_lse.masked_fill(block_lse == math.inf, -math.inf)
    merged_lse = torch.logaddexp(lse, block_lse)
    base = merged_lse.masked_fill(merged_lse == -math.inf, 0.0)  # rows that saw nothing: both weights 0
    merged_out = torch.exp(lse - base).unsqueeze(-1) * out + torch.exp(block_lse - base).unsqueeze(-1) * block_out.float()
    return merged_out, merged_lse


def _ring_forward(ring: _Ring, layout, q, k, v, softmax_scale: float, causal: bool):
    """Returns out (fp32, q's shape) and lse in the api layout ((b, h, s) dense, (h, total) varlen)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)  # token-major
    kv = (k, v)
    for step in range(ring.world_size):
        pending = None
        if step + 1 < ring.world_size:
            next_kv, pending = ring.shift(kv, _KV_TAG)
        q_half, k_half, block_causal = _block(ring.rank, (ring.rank - step) % ring.world_size, causal)
        q_rows, k_rows = layout.q_rows(q_half), layout.k_rows(k_half)
        block_out, block_lse = layout.forward(q_rows.take(q), k_rows.take(kv[0]), k_rows.take(kv[1]), q_half, k_half,
                                              block_causal, softmax_scale)
        merged_out, merged_lse = _merge(q_rows.take(out), q_rows.take(lse), block_out, block_lse.transpose(-2, -1))
        q_rows.put(out, merged_out)
        q_rows.put(lse, merged_lse)
        if pending is not None:
            _wait(pending)
            kv = next_kv
    lse = lse.masked_fill(lse == -math.inf, math.inf)  # rows that saw no key anywhere
    return out, lse.transpose(-2, -1).contiguous()


def _ring_backward(ring: _Ring, layout, dout, q, k, v, out, lse, softmax_scale: float, causal: bool,
                   deterministic: bool):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse_tokens = lse.transpose(-2, -1)
    kv, dkv, pending_dkv = (k, v), None, None
    for step in range(ring.world_size):
        pending_kv = None
        if step + 1 < ring.world_size:
            next_kv, pending_kv = ring.shift(kv, _KV_TAG)
        q_half, k_half, block_causal = _block(ring.rank, (ring.rank - step) % ring.world_size, causal)
        q_rows, k_rows = layout.q_rows(q_half), layout.k_rows(k_half)
        block_lse = q_rows.take(lse_tokens).transpose(-2, -1).contiguous()
        block_dq, block_dk, block_dv = layout.backward(
            q_rows.take(dout), q_rows.take(q), k_rows.take(kv[0]), k_rows.take(kv[1]), q_rows.take(out), block_lse,
            q_half, k_half, block_causal, softmax_scale, deterministic)
        q_rows.add(dq, block_dq)
        if pending_dkv is None:  # step 0: this rank's own block starts its accumulator
            dkv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                   torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        else:
            _wait(pending_dkv)
            dkv = received_dkv
        k_rows.add(dkv[0], block_dk)
        k_rows.add(dkv[1], block_dv)
        if ring.world_size > 1:  # after the last step this sends each accumulator home
            received_dkv, pending_dkv = ring.shift(dkv, _DKV_TAG)
        if pending_kv is not None:
            _wait(pending_kv)
            kv = next_kv
    if pending_dkv is not None:
        _wait(pending_dkv)
        dkv = received_dkv
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingFlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, ring, softmax_scale, causal, deterministic):
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse = _ring_forward(ring, layout, q, k, v, softmax_scale, causal)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.ring, ctx.softmax_scale, ctx.causal, ctx.deterministic = \
            layout, ring, softmax_scale, causal, deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.ring, ctx.layout, dout.contiguous(), q, k, v, out, lse, ctx.softmax_scale,
                                    ctx.causal, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None


def _check_supported(dropout_p, window_size, alibi_slopes) -> None:
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0 for ring attention (dropout is not supported yet), got {dropout_p}")
    if tuple(window_size) != (-1, -1):
        raise ValueError(f"window_size must be (-1, -1) for ring attention (no sliding window yet), got {window_size}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None for ring attention (ALiBi is not supported yet)")


def _check_qkv(q, k, v, ndim: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim:
            raise ValueError(f"{name} must be a {ndim}-d torch.Tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def ring_flash_attn_func(q, k, v, group=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                         alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over a sequence sharded across the ranks of ``group``, differentiable.

    Arguments:
        q: (b, s_local, h, d), this rank's queries.
        k, v: (b, s_local_k, hk, d), this rank's keys and values (h % hk == 0), same shape on every rank.
        group: the process group of the ring (None: the default group).
        dropout_p: must be 0.0 (dropout is not supported yet).
        softmax_scale: scale of q.k^T; default 1 / sqrt(d).
        causal: causal attention over the global sequence. The shards must then be zigzag shards
            (:func:`zigzag_split` of the global (b, s, ...) tensors, s = W * s_local) and s_local_k == s_local;
            without ``causal`` any split works as long as every rank holds the same number of tokens.
        window_size: must be (-1, -1).
        alibi_slopes: must be None.
        deterministic: passed to the backward kernels; the ring's accumulation order is fixed.
        return_attn_probs: also return the logsumexp (and None for the probabilities).
    Returns:
        out (b, s_local, h, d); with return_attn_probs ``(out, softmax_lse (b, h, s_local) fp32, None)``,
        the lse being over the keys of all ranks (+inf for a row that sees none).
    """
    _check_supported(dropout_p, window_size, alibi_slopes)
    _check_qkv(q, k, v, 4)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if causal and (seqlen_q != seqlen_k or seqlen_q % 2):
        raise ValueError(f"causal ring attention needs zigzag shards: s_local of q ({seqlen_q}) equal to that of k "
                         f"({seqlen_k}) and even")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out, lse = _RingFlashAttn.apply(q, k, v, _Dense(seqlen_q, seqlen_k), _Ring(group), scale, causal, deterministic)
    return (out, lse, None) if return_attn_probs else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, group=None,
                                dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over packed variable-length sequences, each sharded across the ranks of ``group``.

    Convention: every rank holds its shard of every sequence, packed in the same order.
    ``cu_seqlens_q``/``cu_seqlens_k`` (b + 1,) int32 are the offsets of the *local* shards and
    ``max_seqlen_q``/``max_seqlen_k`` the longest local shard; both are the same on every rank.
    With ``causal`` the shards must be zigzag shards (:func:`zigzag_split_varlen` of the global packed
    tensors; every global length divisible by 2W; then the local offsets are ``cu_seqlens_global // W``)
    and cu_seqlens_q == cu_seqlens_k.

    Arguments:
        q: (total_q_local, h, d); k, v: (total_k_local, hk, d).
        The other arguments are those of :func:`ring_flash_attn_func`.
    Returns:
        out (total_q_local, h, d); with return_attn_probs ``(out, softmax_lse (h, total_q_local) fp32, None)``.
    """
    _check_supported(dropout_p, window_size, alibi_slopes)
    _check_qkv(q, k, v, 3)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    layout = _Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], causal)
    out, lse = _RingFlashAttn.apply(q, k, v, layout, _Ring(group), scale, causal, deterministic)
    return (out, lse, None) if return_attn_probs else out
