"""The Triton forward kernel itself (kernels/forward.py), under TRITON_INTERPRET=1 on the CPU.

Every feature switch at small odd shapes, against the float64 naive oracle (tests/naive.py) with the
flash_attn error rule; outputs poisoned with NaN first; dropout masks compared bit for bit with
pyflash.philox through the sign pattern of return_softmax's probabilities. Each case runs over
pointer loads and (power-of-two head dims) over TMA descriptors, which the interpreter emulates, on
the three-loop kernel and (without dropout) the one-pass kernel.
"""
import math

import pytest
import torch

import naive
from pyflash import philox, reference
from pyflash.kernels import forward as kernel
from pyflash.params import AttentionParams, Seqlens

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _round128(x):
    return (x + 127) // 128 * 128


def _normalise(left, right, causal, seqlen_k):
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    return left, 0 if causal else right


def _params(head_dim, left, right, softcap, alibi, dropout_p, seed=0, offset=0):
    return AttentionParams(head_dim ** -0.5, left, right, softcap, alibi, dropout_p, seed, offset)


def _check(ours, ref64, lowp, name, dtype):
    naive.assert_rule(ours, ref64, lowp, name, naive.RULE_ATOL[dtype])


def _check_probs(probs, ref_probs, lowp_probs, keep, dtype):
    """|p| against the undropped probabilities; the sign against the Philox keep mask, bit for bit."""
    _check(probs.abs(), ref_probs, lowp_probs, "p", dtype)
    nonzero = (probs != 0) & (ref_probs > 0)
    assert nonzero.any()
    assert torch.equal((probs > 0)[nonzero], keep[nonzero])


# (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, causal, window, softcap, alibi, dropout)
# alibi: None, "h" (one slope per head, stride 0 along batch) or "bh".
DENSE = [
    (2, 128, 128, 2, 2, 64, "fp16", False, (-1, -1), 0.0, None, 0.0),
    (1, 17, 257, 4, 1, 40, "bf16", True, (-1, -1), 0.0, None, 0.0),  # MQA, causal with sk > sq
    (2, 257, 100, 2, 2, 32, "fp16", True, (-1, -1), 0.0, None, 0.0),  # rows with no visible key
    (1, 100, 128, 4, 2, 128, "bf16", False, (20, 5), 0.0, None, 0.0),  # GQA, sliding window
    (1, 128, 100, 2, 1, 96, "fp16", False, (30, -1), 0.0, "h", 0.0),  # left window only, padded block_d
    (1, 100, 17, 2, 2, 256, "bf16", False, (-1, 3), 0.0, None, 0.0),  # right window only
    (2, 17, 100, 2, 2, 64, "fp32", False, (-1, -1), 5.0, "bh", 0.0),  # softcap + alibi, exact fp32 dots
    (1, 1, 257, 2, 2, 8, "fp16", True, (-1, -1), 0.0, "h", 0.0),  # seqlen_q = 1, the smallest head dim
    (1, 100, 128, 2, 2, 200, "bf16", True, (40, -1), 2.0, "bh", 0.0),  # causal + left window + softcap + alibi
    (2, 100, 128, 2, 1, 64, "fp16", False, (-1, -1), 0.0, None, 0.17),  # dropout, MQA
    (1, 128, 100, 2, 1, 48, "bf16", True, (-1, -1), 3.0, "h", 0.3),  # dropout + every score feature
    (1, 257, 17, 2, 2, 16, "fp32", False, (7, 2), 0.0, None, 0.5),  # dropout + window, fp32
]


def _dense_case(case, seed=0):
    batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, causal, window, softcap, alibi, dropout_p = case
    dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, seqlen_k, heads_k, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_k, head_dim, generator=gen).to(dtype)
    slopes = None
    if alibi == "h":
        slopes = torch.rand(heads, generator=gen)
    elif alibi == "bh":
        slopes = torch.rand(batch, heads, generator=gen)
    return q, k, v, slopes, dtype


PATHS = ("loops", "one_pass", "tma", "tma_one_pass")


def _path_params(cases):
    """Each case on the three-loop kernel over pointer loads; without dropout also on the one-pass
    kernel that warp specialization takes (PYFLASH_FORWARD_ONE_PASS=1); with a power-of-two head dim
    also over TMA descriptors (the Hopper path; the interpreter emulates them)."""
    params = []
    for case in cases:
        varlen = isinstance(case[0], list)
        head_dim, dropout_p = case[5], case[-1]
        for path in PATHS:
            if ("one_pass" in path and dropout_p > 0) or (path.startswith("tma") and head_dim & (head_dim - 1)):
                continue
            case_id = "-".join(map(str, case[3:] if varlen else case)).replace(" ", "")
            params.append(pytest.param(case, path, id=f"{path}-{case_id}"))
    return params


@pytest.fixture
def path_env(monkeypatch, request):
    one_pass = "one_pass" in request.node.callspec.params["path"]
    monkeypatch.setenv("PYFLASH_FORWARD_ONE_PASS", "1" if one_pass else "0")


@pytest.mark.parametrize("case, path", _path_params(DENSE))
def test_dense(case, path, path_env):
    q, k, v, slopes, dtype = _dense_case(case)
    batch, seqlen_q, seqlen_k, heads, _, head_dim = case[:6]
    causal, (left, right), softcap, _, dropout_p = case[7:]
    left, right = _normalise(left, right, causal, seqlen_k)
    seed, offset = (2**40 + 12345, 4 * 17) if dropout_p > 0 else (0, 0)
    alibi_bh = slopes.expand(batch, heads) if slopes is not None and slopes.dim() == 1 else slopes
    params = _params(head_dim, left, right, softcap, alibi_bh, dropout_p, seed, offset)
    out = torch.full_like(q, math.nan)
    lse = torch.full((batch, heads, seqlen_q), math.nan)
    probs = None
    if dropout_p > 0:
        probs = torch.zeros(batch, heads, _round128(seqlen_q), _round128(seqlen_k), dtype=dtype)
    kernel.forward(q, k, v, out, lse, probs, params, Seqlens(batch, seqlen_q, seqlen_k),
                   use_tma=path.startswith("tma"))

    kwargs = dict(causal=causal, window_left=left, window_right=right, softcap=softcap, alibi_slopes=slopes,
                  p_dropout=dropout_p, seed_offset=(seed, offset), return_probs=True)
    ref_out, ref_lse, ref_probs = naive.attention(q, k, v, compute_dtype=torch.float64, **kwargs)
    low_out, low_lse, low_probs = naive.attention(q, k, v, **kwargs)
    _check(out, ref_out, low_out, "out", dtype)
    _check(lse, ref_lse, low_lse, "lse", dtype)
    if probs is not None:
        keep = torch.stack([naive.keep_mask(seed, offset, dropout_p, b, heads, seqlen_q, seqlen_k)
                            for b in range(batch)])
        assert not probs[:, :, seqlen_q:].any() and not probs[:, :, :, seqlen_k:].any()
        _check_probs(probs[:, :, :seqlen_q, :seqlen_k], ref_probs, low_probs, keep, dtype)


# Varlen: (cu_seqlens_q, cu_seqlens_k, seqused_k, heads, heads_k, head_dim, dtype, causal, window, softcap, alibi, dropout)
VARLEN = [
    ([0, 17, 17, 117, 245], [0, 30, 60, 160, 417], None, 2, 1, 64, "fp16", False, (-1, -1), 0.0, None, 0.0),
    ([0, 17, 17, 117, 245], [0, 30, 60, 160, 417], None, 4, 2, 32, "bf16", True, (-1, -1), 0.0, "bh", 0.0),
    ([0, 100, 101, 229], [0, 128, 129, 229], [100, 0, 57], 2, 2, 40, "fp16", False, (16, 0), 4.0, None, 0.0),
    ([0, 64, 192, 193], [0, 17, 274, 300], [17, 200, 20], 2, 1, 128, "fp32", True, (-1, -1), 0.0, "h", 0.2),
]


@pytest.mark.parametrize("case, path", _path_params(VARLEN))
def test_varlen(case, path, path_env):
    cu_q, cu_k, used, heads, heads_k, head_dim, dtype, causal, (left, right), softcap, alibi, dropout_p = case
    dtype = DTYPES[dtype]
    batch = len(cu_q) - 1
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    left, right = _normalise(left, right, causal, max_k)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(cu_q[-1], heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(cu_k[-1], heads_k, head_dim, generator=gen).to(dtype)
    v = torch.randn(cu_k[-1], heads_k, head_dim, generator=gen).to(dtype)
    slopes = {None: None, "h": torch.rand(heads, generator=gen), "bh": torch.rand(batch, heads, generator=gen)}[alibi]
    alibi_bh = slopes.expand(batch, heads) if alibi == "h" else slopes
    seed, offset = (7, 12) if dropout_p > 0 else (0, 0)
    cu_q_t, cu_k_t = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    used_t = torch.tensor(used, dtype=torch.int32) if used is not None else None
    k_in, v_in = k, v
    if used is not None:  # keys past seqused_k may hold anything: NaN there must not leak
        k_in, v_in = k.clone(), v.clone()
        for start, end, n_used in zip(cu_k, cu_k[1:], used):
            k_in[start + n_used:end] = math.nan
            v_in[start + n_used:end] = math.nan
    out = torch.full_like(q, math.nan)
    lse = torch.full((heads, cu_q[-1]), math.nan)
    probs = torch.zeros(batch, heads, _round128(max_q), _round128(max_k), dtype=dtype) if dropout_p > 0 else None
    params = _params(head_dim, left, right, softcap, alibi_bh, dropout_p, seed, offset)
    kernel.forward(q, k_in, v_in, out, lse, probs, params, Seqlens(batch, max_q, max_k, cu_q_t, cu_k_t, used_t),
                   use_tma=path.startswith("tma"))

    kwargs = dict(seqused_k=used_t, causal=causal, window_left=left, window_right=right, softcap=softcap,
                  alibi_slopes=slopes, p_dropout=dropout_p, seed_offset=(seed, offset))
    ref_out, ref_lse = naive.attention_varlen(q, k, v, cu_q_t, cu_k_t, max_k, compute_dtype=torch.float64, **kwargs)
    low_out, low_lse = naive.attention_varlen(q, k, v, cu_q_t, cu_k_t, max_k, **kwargs)
    _check(out, ref_out, low_out, "out", dtype)
    _check(lse, ref_lse, low_lse, "lse", dtype)
    if probs is not None:
        for s in range(batch):
            seqlen_q, seqlen_k = cu_q[s + 1] - cu_q[s], used[s] if used else cu_k[s + 1] - cu_k[s]
            rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s] + seqlen_k)
            one = dict(softmax_scale=head_dim ** -0.5, causal=causal, window_left=left, window_right=right,
                       softcap=softcap, alibi_slopes=naive._slopes_row(slopes, s, heads), return_probs=True)
            ref_probs = naive.attention_one(q[rows], k[keys], v[keys], compute_dtype=torch.float64, **one)[2]
            low_probs = naive.attention_one(q[rows], k[keys], v[keys], **one)[2]
            keep = naive.keep_mask(seed, offset, dropout_p, s, heads, seqlen_q, seqlen_k)
            assert not probs[s, :, seqlen_q:].any() and not probs[s, :, :, seqlen_k:].any()
            if seqlen_q and seqlen_k:
                _check_probs(probs[s, :, :seqlen_q, :seqlen_k], ref_probs, low_probs, keep, dtype)


def test_matches_reference_backend():
    """The kernel and the reference backend on one varlen input with every feature: both within the
    rule of the float64 oracle, and the same dropout mask (the sign of p) bit for bit."""
    cu_q, cu_k, heads, head_dim = [0, 50, 50, 157], [0, 70, 99, 228], 4, 32
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(157, heads, head_dim, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(228, 2, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    slopes = torch.rand(3, heads, generator=gen)
    cu_q_t, cu_k_t = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    seqlens = Seqlens(3, 107, 129, cu_q_t, cu_k_t)
    params = _params(head_dim, 40, 0, 6.0, slopes, 0.25, 2**33 + 5, 40)
    results = []
    for backend in (kernel, reference):
        out, lse = torch.full_like(q, math.nan), torch.full((heads, 157), math.nan)
        probs = torch.zeros(3, heads, 128, 256, dtype=torch.bfloat16)
        backend.forward(q, k, v, out, lse, probs, params, seqlens)
        results.append((out, lse, probs))
    kwargs = dict(causal=True, window_left=40, window_right=0, softcap=6.0, alibi_slopes=slopes, p_dropout=0.25,
                  seed_offset=(2**33 + 5, 40))
    ref_out, ref_lse = naive.attention_varlen(q, k, v, cu_q_t, cu_k_t, 129, compute_dtype=torch.float64, **kwargs)
    low_out, low_lse = naive.attention_varlen(q, k, v, cu_q_t, cu_k_t, 129, **kwargs)
    for out, lse, _ in results:
        _check(out, ref_out, low_out, "out", torch.bfloat16)
        _check(lse, ref_lse, low_lse, "lse", torch.bfloat16)
    ours_p, theirs_p = (r[2] for r in results)
    # Zeros may differ where a probability underflows bf16; the signs of the rest must not.
    both = (ours_p != 0) & (theirs_p != 0)
    assert both.sum() >= 0.99 * (theirs_p != 0).sum()
    assert torch.equal(ours_p[both] > 0, theirs_p[both] > 0)


def test_dropout_mask_is_pyflash_philox():
    """The kernel's mask is pyflash.philox's layout (counter (j // 8, i, bh, offset), 16 bits of word
    (j % 8) // 2), 64-bit seed."""
    batch, seqlen_q, seqlen_k, heads = 2, 33, 70, 3
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(batch, n, heads, 16, generator=gen) for n in (seqlen_q, seqlen_k, seqlen_k))
    seed, offset, dropout_p = 2**63 - 25, 2**31 - 9, 0.4
    probs = torch.zeros(batch, heads, 128, 128)
    params = _params(16, -1, -1, 0.0, None, dropout_p, seed, offset)
    kernel.forward(q, k, v, torch.empty_like(q), torch.empty(batch, heads, seqlen_q), probs, params,
                   Seqlens(batch, seqlen_q, seqlen_k))
    bh = torch.arange(batch * heads).view(batch, heads, 1, 1)
    i = torch.arange(seqlen_q).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k).view(1, 1, 1, -1)
    keep = philox.dropout_keep(seed, offset, dropout_p, bh, i, j)
    assert torch.equal(probs[:, :, :seqlen_q, :seqlen_k] > 0, keep)


@pytest.mark.parametrize("config", [(16, 64, 4, 1), (32, 16, 4, 1)])
def test_block_shapes(config):
    """Key-range bookkeeping with block_m < block_n and block_m > block_n, windows on both sides."""
    case = (1, 100, 129, 2, 2, 32, "fp16", True, (37, -1), 0.0, None, 0.0)
    q, k, v, _, dtype = _dense_case(case, seed=3)
    for left, right in ((37, 0), (5, 9), (-1, 20), (60, -1)):
        out = torch.full_like(q, math.nan)
        lse = torch.full((1, 2, 100), math.nan)
        kernel.forward(q, k, v, out, lse, None, _params(32, left, right, 0.0, None, 0.0), Seqlens(1, 100, 129),
                       config=config)
        kwargs = dict(window_left=left, window_right=right)
        ref_out, ref_lse = naive.attention(q, k, v, compute_dtype=torch.float64, **kwargs)
        low_out, low_lse = naive.attention(q, k, v, **kwargs)
        _check(out, ref_out, low_out, f"out {left, right}", dtype)
        _check(lse, ref_lse, low_lse, f"lse {left, right}", dtype)


def test_strided_inputs():
    """q/k/v as views of one packed (b, s, 3, h, d) tensor, out a view too: strides are honoured."""
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 100, 3, 2, 32, generator=gen).to(torch.float16)
    q, k, v = qkv.unbind(2)
    out_storage = torch.full((2, 100, 2, 48), math.nan, dtype=torch.float16)
    out = out_storage[..., :32]
    lse = torch.full((2, 2, 100), math.nan)
    kernel.forward(q, k, v, out, lse, None, _params(32, -1, 0, 0.0, None, 0.0), Seqlens(2, 100, 100))
    ref_out, ref_lse = naive.attention(q, k, v, causal=True, compute_dtype=torch.float64)
    low_out, low_lse = naive.attention(q, k, v, causal=True)
    _check(out, ref_out, low_out, "out", torch.float16)
    _check(lse, ref_lse, low_lse, "lse", torch.float16)
    assert out_storage[..., 32:].isnan().all()


def test_through_api(monkeypatch):
    """mha_fwd with PYFLASH_BACKEND=triton runs this kernel (head dim 20 padded to 24 by the API)."""
    from pyflash import api

    monkeypatch.setenv("PYFLASH_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 2, 20, generator=gen).to(torch.bfloat16) for n in (57, 100, 100))
    out, *_, lse, _, _, _ = api.mha_fwd(q, k, v, None, None, 0.0, None, True, -1, -1, False, None)
    ref_out, ref_lse = naive.attention(q, k, v, causal=True, compute_dtype=torch.float64)
    low_out, low_lse = naive.attention(q, k, v, causal=True)
    _check(out, ref_out, low_out, "out", torch.bfloat16)
    _check(lse, ref_lse, low_lse, "lse", torch.bfloat16)


def test_config_table_covers_every_key():
    for major in (0, 8, 9):
        for nbytes in (2, 4):
            for block_d in (16, 32, 64, 128, 256):
                for causal in (False, True):
                    block_m, block_n, num_warps, num_stages, *ws = kernel.FORWARD[(major, nbytes, block_d, causal)]
                    assert ws in ([], [True], [False])
                    assert block_m >= 16 and block_n >= 16 and num_warps in (1, 2, 4, 8) and num_stages >= 1


def test_falls_back_to_smaller_tiles(small_shared_memory):
    """Where the table's tiles do not fit (Triton raises OutOfResources), smaller ones run: over TMA
    descriptors rebuilt for the new block shapes, with the grid recomputed."""
    limited = small_shared_memory(kernel, "_forward_kernel", 32 * 32)
    case = (2, 100, 129, 2, 1, 64, "bf16", True, (-1, -1), 0.0, None, 0.0)
    q, k, v, _, dtype = _dense_case(case, seed=6)
    out = torch.full_like(q, math.nan)
    lse = torch.full((2, 2, 100), math.nan)
    kernel.forward(q, k, v, out, lse, None, _params(64, -1, 0, 0.0, None, 0.0), Seqlens(2, 100, 129), use_tma=True)
    assert limited.launched == [dict(BLOCK_M=32, BLOCK_N=32, num_stages=1)]  # the interpreter's (64, 32) did not fit
    ref_out, ref_lse = naive.attention(q, k, v, causal=True, compute_dtype=torch.float64)
    low_out, low_lse = naive.attention(q, k, v, causal=True)
    _check(out, ref_out, low_out, "out", dtype)
    _check(lse, ref_lse, low_lse, "lse", dtype)
