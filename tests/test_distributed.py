"""Ring attention (pyflash.distributed) on CPU: gloo, 2 and 4 processes started here.

Each process builds the same global inputs, runs the single-process attention (pyflash.api on the
whole sequence) as the reference, runs the ring on its zigzag shard and compares its shard of the
output, lse and gradients. A failing process raises; torch.multiprocessing re-raises it here.

The processes are forked on Linux: a spawned one re-imports torch, which takes several seconds per
process on a cold disk, while a fork shares the parent's imports. The parent holds no process group
and no CUDA context, and the workers run single-threaded CPU ops only, so forking is safe here.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyflash import api
from pyflash.distributed import (ring_flash_attn_func, ring_flash_attn_varlen_func, zigzag_merge, zigzag_merge_varlen,
                                 zigzag_split, zigzag_split_varlen)
from pyflash.distributed import _merge

ATOL, RTOL = 1e-5, 1e-5  # fp32: the ring only reorders the sums

# (name, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal); seqlens are global
DENSE_CASES = [
    ("dense causal", 2, 64, 64, 4, 2, 16, True),
    ("dense", 1, 64, 64, 2, 2, 32, False),
    ("dense cross sq != sk", 2, 32, 96, 4, 1, 16, False),
    ("dense causal odd head dim", 1, 128, 128, 2, 1, 20, True),
]
# (name, global sequence lengths, heads, heads_k, head_dim, causal, padding rows after the local
# sequences); lengths divisible by 2 * 4
VARLEN_CASES = [
    ("varlen causal", [16, 40, 8], 4, 2, 16, True, 0),
    ("varlen", [24, 8, 32], 2, 1, 16, False, 0),
    ("varlen causal one sequence", [64], 2, 2, 32, True, 0),
    ("varlen padded", [16, 8], 2, 2, 16, False, 3),
]


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        raise AssertionError(f"{name}: max abs error {(got - want).abs().max().item():.3e}")


def _inputs(seed, q_shape, kv_shape):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(q_shape, generator=gen) for _ in range(2))
    k, v = (torch.randn(kv_shape, generator=gen) for _ in range(2))
    return q, k, v, dout


def _shard(t, world_size, rank, causal, dim):
    """Zigzag shards for causal; a plain contiguous split otherwise (any split works without causal)."""
    if causal:
        return zigzag_split(t, world_size, rank, dim)
    return t.chunk(world_size, dim)[rank]


def _check_dense(tag, group, world_size, rank, case):
    name, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal = case
    q, k, v, dout = _inputs(len(name), (batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_k, head_dim))
    out, _, _, _, lse, *_ = api.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
    dq, dk, dv, _ = api.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, None, causal, -1, -1, False, 0, 0)

    local = [_shard(t, world_size, rank, causal, 1).clone().requires_grad_() for t in (q, k, v)]
    ring_out, ring_lse, probs = ring_flash_attn_func(*local, group=group, causal=causal, return_attn_probs=True)
    ring_out.backward(_shard(dout, world_size, rank, causal, 1))
    assert probs is None
    where = f"{tag} {name} rank {rank}/{world_size}"
    _close(f"{where} out", ring_out, _shard(out, world_size, rank, causal, 1))
    _close(f"{where} lse", ring_lse, _shard(lse, world_size, rank, causal, 2))
    for grad_name, got, want in zip(("dq", "dk", "dv"), (t.grad for t in local), (dq, dk, dv)):
        _close(f"{where} {grad_name}", got, _shard(want, world_size, rank, causal, 1))


def _check_varlen(tag, group, world_size, rank, case):
    name, lengths, heads, heads_k, head_dim, causal, padding = case
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total, max_seqlen = sum(lengths), max(lengths)
    q, k, v, dout = _inputs(len(name), (total, heads, head_dim), (total, heads_k, head_dim))
    out, _, _, _, lse, *_ = api.mha_varlen_fwd(q, k, v, None, cu_seqlens, cu_seqlens, None, None, max_seqlen,
                                               max_seqlen, 0.0, None, False, causal, -1, -1, False, None)
    dq, dk, dv, _ = api.mha_varlen_bwd(dout, q, k, v, out, lse, None, None, None, cu_seqlens, cu_seqlens, None,
                                       max_seqlen, max_seqlen, 0.0, None, False, causal, -1, -1, False, 0, 0)

    def shard(t):
        return zigzag_split_varlen(t, cu_seqlens, world_size, rank)

    def padded(t):  # rows past the last local sequence belong to none: garbage in, zeros out
        return torch.cat([t, torch.full((padding,) + t.shape[1:], 7.0)])

    local = [padded(shard(t)).requires_grad_() for t in (q, k, v)]
    cu_local = cu_seqlens // world_size
    ring_out, ring_lse, _ = ring_flash_attn_varlen_func(*local, cu_local, cu_local, max_seqlen // world_size,
                                                        max_seqlen // world_size, group=group, causal=causal,
                                                        return_attn_probs=True)
    ring_out.backward(padded(shard(dout)))
    where = f"{tag} {name} rank {rank}/{world_size}"
    rows = total // world_size
    _close(f"{where} lse", ring_lse[:, :rows], shard(lse.t()).t())
    for result, got, want in zip(("out", "dq", "dk", "dv"), (ring_out,) + tuple(t.grad for t in local),
                                 (out, dq, dk, dv)):
        _close(f"{where} {result}", got[:rows], shard(want))
        _close(f"{where} {result} of padding rows", got[rows:], torch.zeros_like(got[rows:]))


def _worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for case in DENSE_CASES:
            _check_dense("world", None, world_size, rank, case)
        for case in VARLEN_CASES:
            _check_varlen("world", None, world_size, rank, case)
        # A ring over a subgroup (every rank creates every group, in the same order): ranks of the
        # group differ from global ranks, and a group of one is a plain local attention.
        strided = [dist.new_group(list(range(start, world_size, 2))) for start in range(2)]
        singles = [dist.new_group([r]) for r in range(world_size)]
        for tag, group in (("strided group", strided[rank % 2]), ("group of one", singles[rank])):
            size, group_rank = dist.get_world_size(group), dist.get_rank(group)
            _check_dense(tag, group, size, group_rank, DENSE_CASES[0])
            _check_varlen(tag, group, size, group_rank, VARLEN_CASES[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_matches_single_process(world_size, tmp_path):
    start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    mp.start_processes(_worker, args=(world_size, str(tmp_path / "rendezvous")), nprocs=world_size, join=True,
                       start_method=start_method)


# ----------------------------------------------------------------------------------------------
# single-process pieces
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_zigzag_round_trip(world_size):
    x = torch.arange(2 * 12 * 3, dtype=torch.float32).reshape(2, 12, 3)
    shards = [zigzag_split(x, world_size, r) for r in range(world_size)]
    chunk = 12 // (2 * world_size)
    assert torch.equal(shards[0][:, :chunk], x[:, :chunk])
    assert torch.equal(shards[0][:, chunk:], x[:, -chunk:])
    assert torch.equal(zigzag_merge(shards), x)

    cu_seqlens = torch.tensor([0, 6 * world_size, 6 * world_size, 8 * world_size], dtype=torch.int32)
    packed = torch.randn(int(cu_seqlens[-1]), 2, 4)
    local = [zigzag_split_varlen(packed, cu_seqlens, world_size, r) for r in range(world_size)]
    assert all(t.shape[0] == int(cu_seqlens[-1]) // world_size for t in local)
    assert torch.equal(zigzag_merge_varlen(local, cu_seqlens), packed)


def test_zigzag_split_rejects_indivisible_length():
    with pytest.raises(ValueError, match="divisible"):
        zigzag_split(torch.zeros(1, 10, 1, 8), 2, 0)


def test_merge_is_attention_over_the_union():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 12, generator=gen)
    values = torch.randn(12, 3, generator=gen)
    want = torch.softmax(scores, -1) @ values
    out = torch.zeros(5, 3)
    lse = torch.full((5,), -math.inf)
    for keys in (slice(0, 4), slice(4, 12)):
        block = scores[:, keys]
        out, lse = _merge(out, lse, torch.softmax(block, -1) @ values[keys], torch.logsumexp(block, -1))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_merge_gives_rows_that_see_no_key_weight_zero():
    out, lse = torch.zeros(2, 3), torch.full((2,), -math.inf)
    # Row 0 sees keys only in the second block; row 1 sees none anywhere (pyflash: lse +inf, out 0).
    out, lse = _merge(out, lse, torch.zeros(2, 3), torch.tensor([math.inf, math.inf]))
    out, lse = _merge(out, lse, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([0.5, math.inf]))
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    assert lse[0] == 0.5 and lse[1] == -math.inf


@pytest.mark.parametrize("kwargs, match", [
    ({"dropout_p": 0.1}, "dropout_p"),
    ({"window_size": (4, 0)}, "window_size"),
    ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
])
def test_unsupported_arguments_raise(kwargs, match):
    q = torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match=match):
        ring_flash_attn_func(q, q, q, **kwargs)
    with pytest.raises(ValueError, match=match):
        ring_flash_attn_varlen_func(q[0], q[0], q[0], None, None, 8, 8, **kwargs)


def test_needs_a_process_group():
    q = torch.zeros(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_flash_attn_func(q, q, q)
