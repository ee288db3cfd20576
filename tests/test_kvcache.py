"""flash_attn_with_kvcache on CPU: the PyTorch reference path and the split-KV decode kernel (under
TRITON_INTERPRET=1), against a naive float64 attention written here from flash_attn's semantics.

The oracle rebuilds each sequence's cache in memory-position order (contiguous rows or pages
concatenated), writes the rotated new keys/values at ``cache_seqlens + i``, and attends with
materialised scores over positions ``[leftpad, cache_seqlens + seqlen_new)``.
"""
from __future__ import annotations

import math

import pytest
import torch

from pyflash.kernels import decode as decode_kernel
from pyflash.kvcache import flash_attn_with_kvcache

# triton: K/V blocks through TMA descriptors where the layout allows (power-of-two head dim; pages of
# whole blocks); triton_pointers: every block by pointer loads.
PATHS = ["reference", "triton", "triton_pointers"]


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------

def rotate(x, cos, sin, positions, interleaved):
    """Rotary as a complex product: feature pairs are complex numbers, turned by exp(i * angle)."""
    half = cos.shape[1]
    xd = x.double()
    head, tail = xd[..., :2 * half], xd[..., 2 * half:]
    if interleaved:
        z = torch.complex(head[..., 0::2], head[..., 1::2])
    else:
        z = torch.complex(head[..., :half], head[..., half:])
    z = z * torch.complex(cos[positions].double(), sin[positions].double()).unsqueeze(2)
    pairs = torch.stack((z.real, z.imag), dim=-1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((pairs, tail), dim=-1)


def logical_cache(cache, b, batch_idx, block_table):
    """(capacity, hk, d) memory of batch element b's sequence."""
    if block_table is None:
        return cache[batch_idx[b] if batch_idx is not None else b]
    return torch.cat([cache[p] for p in block_table[b].tolist()], dim=0)


def naive_attention(q, keys, values, scale, causal, window, softcap, slopes, compute_dtype):
    """q (sq, h, d), keys/values (sk, hk, d) -> out (sq, h, d), lse (h, sq); materialised scores."""
    seqlen_q, num_heads, _ = q.shape
    seqlen_k, num_heads_k, _ = keys.shape
    groups = num_heads // num_heads_k
    qc = q.to(compute_dtype).transpose(0, 1)
    kc = keys.to(compute_dtype).repeat_interleave(groups, dim=1).transpose(0, 1)
    vc = values.to(compute_dtype).repeat_interleave(groups, dim=1).transpose(0, 1)
    scores = (qc @ kc.transpose(1, 2)).float().double() * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    diag = i + seqlen_k - seqlen_q
    if slopes is not None:
        scores = scores - slopes.double()[:, None, None] * (diag - j).abs()
    left, right = window
    if causal:
        right = 0
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    scores = scores.masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = (probs.to(compute_dtype) @ vc).transpose(0, 1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)
    return out.double(), lse


def oracle(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, batch_idx, leftpad, block_table, scale,
           causal, window, softcap, interleaved, alibi, compute_dtype):
    """Expected (out, lse, per-sequence cache memory after the append)."""
    batch, seqlen_q, num_heads, _ = q.shape
    seqlen_new = k.shape[1] if k is not None else 0
    outs, lses, memories = [], [], []
    for b in range(batch):
        keys = logical_cache(k_cache, b, batch_idx, block_table).clone()
        values = logical_cache(v_cache, b, batch_idx, block_table).clone()
        start = cache_seqlens[b] if cache_seqlens is not None else keys.shape[0]
        qb = q[b]
        if k is not None:
            kb = k[b]
            if cos is not None:
                positions = torch.arange(start, start + seqlen_new)[None]
                kb = rotate(kb[None], cos, sin, positions, interleaved)[0].to(k.dtype)
                local = causal or window[0] >= 0 or window[1] >= 0
                q_positions = torch.arange(start, start + seqlen_q) if local else torch.full((seqlen_q,), start)
                qb = rotate(qb[None], cos, sin, q_positions[None], interleaved)[0].to(q.dtype)
            keys[start:start + seqlen_new] = kb
            values[start:start + seqlen_new] = v[b]
        memories.append((keys, values))
        lo = leftpad[b] if leftpad is not None else 0
        hi = start + seqlen_new
        slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
        out, lse = naive_attention(qb, keys[lo:hi], values[lo:hi], scale, causal, window, softcap, slopes,
                                   compute_dtype)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), memories


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def make_case(batch=2, seqlen_q=1, num_heads=4, num_heads_k=2, head_dim=32, capacity=100, seqlen_new=0,
              page_size=None, rotary_dim=0, batch_idx=False, leftpad=False, alibi=False, dtype=torch.bfloat16,
              seqlens=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    case = {"q": rand(batch, seqlen_q, num_heads, head_dim)}
    rows = 2 * batch + 1 if batch_idx else batch
    if page_size is None:
        case["k_cache"] = rand(rows, capacity, num_heads_k, head_dim)
        case["v_cache"] = rand(rows, capacity, num_heads_k, head_dim)
        case["block_table"] = None
    else:
        pages_per_seq = -(-capacity // page_size)
        num_pages = batch * pages_per_seq + 3
        case["k_cache"] = rand(num_pages, page_size, num_heads_k, head_dim)
        case["v_cache"] = rand(num_pages, page_size, num_heads_k, head_dim)
        perm = torch.randperm(num_pages, generator=gen)[:batch * pages_per_seq]
        case["block_table"] = perm.view(batch, pages_per_seq).to(torch.int32)
        capacity = pages_per_seq * page_size
    if seqlen_new:
        case["k"] = rand(batch, seqlen_new, num_heads_k, head_dim)
        case["v"] = rand(batch, seqlen_new, num_heads_k, head_dim)
    if seqlens is None:
        seqlens = torch.randint(0, capacity - seqlen_new + 1, (batch,), generator=gen).tolist()
    case["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32)
    if batch_idx:
        case["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:batch].to(torch.int32)
    if leftpad:
        case["cache_leftpad"] = torch.tensor([torch.randint(0, s + 1, (1,), generator=gen).item() for s in seqlens],
                                             dtype=torch.int32)
    if rotary_dim:
        angle = torch.rand(capacity, rotary_dim // 2, generator=gen) * 2 * math.pi
        case["rotary_cos"] = torch.cos(angle).to(dtype)
        case["rotary_sin"] = torch.sin(angle).to(dtype)
    if alibi:
        case["alibi_slopes"] = torch.rand(batch, num_heads, generator=gen) * 0.3
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in case.items()}


def run_and_check(monkeypatch, path, case, causal=False, window=(-1, -1), softcap=0.0, interleaved=True,
                  num_splits=0, scale=None, atol=None):
    monkeypatch.setenv("PYFLASH_BACKEND", "reference" if path == "reference" else "triton")
    monkeypatch.setattr(decode_kernel, "USE_TMA", path == "triton")
    q = case["q"]
    head_dim = q.shape[-1]
    scale_value = scale if scale is not None else head_dim ** -0.5
    original = {name: case[name].clone() for name in ("k_cache", "v_cache")}
    args = dict(k=case.get("k"), v=case.get("v"), rotary_cos=case.get("rotary_cos"),
                rotary_sin=case.get("rotary_sin"), cache_seqlens=case.get("cache_seqlens"),
                cache_batch_idx=case.get("cache_batch_idx"), cache_leftpad=case.get("cache_leftpad"),
                block_table=case.get("block_table"), alibi_slopes=case.get("alibi_slopes"))
    out, lse = flash_attn_with_kvcache(q, case["k_cache"], case["v_cache"], softmax_scale=scale, causal=causal,
                                       window_size=window, softcap=softcap, rotary_interleaved=interleaved,
                                       num_splits=num_splits, return_softmax_lse=True, **args)
    seqlens = case["cache_seqlens"].tolist() if case.get("cache_seqlens") is not None else None
    leftpad = case["cache_leftpad"].tolist() if case.get("cache_leftpad") is not None else None
    batch_idx = case["cache_batch_idx"].tolist() if case.get("cache_batch_idx") is not None else None
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    common = (cpu(q), cpu(original["k_cache"]), cpu(original["v_cache"]), cpu(args["k"]), cpu(args["v"]),
              cpu(args["rotary_cos"]), cpu(args["rotary_sin"]), seqlens, batch_idx, leftpad,
              cpu(case.get("block_table")), scale_value, causal, window, softcap, interleaved,
              cpu(args["alibi_slopes"]))
    out, lse = out.cpu(), lse.cpu()
    ref_out, ref_lse, memories = oracle(*common, torch.float64)
    low_out, _, _ = oracle(*common, q.dtype)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    if atol is None:
        atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[q.dtype]
    err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    low_err = (low_out - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * low_err + atol, (err, low_err)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-3, rtol=1e-4)
    # The cache after the call: new keys (rotated) and values in place, everything else untouched.
    for b, (keys, values) in enumerate(memories):
        got_k = logical_cache(case["k_cache"], b, batch_idx, case.get("block_table")).cpu()
        got_v = logical_cache(case["v_cache"], b, batch_idx, case.get("block_table")).cpu()
        torch.testing.assert_close(got_k.double(), keys.double(), atol=1e-2 if q.dtype != torch.float32 else 1e-5,
                                   rtol=1e-2, equal_nan=True)
        assert torch.equal(got_v.isnan(), values.isnan()) and torch.equal(got_v.nan_to_num(), values.nan_to_num())
    return out, lse


# ----------------------------------------------------------------------------------------------
# Tests: every argument, both paths
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_splits, seqlen_q", [(5, 1), (9, 1), (3, 23)])
def test_merge_in_chunks(monkeypatch, num_splits, seqlen_q):
    """The merge loads the parts MERGE_CHUNK at a time: several chunks, the last one partial, and a
    sequence whose keys fill only some parts (the rest merge with weight 0); a tile of 3 rows (merged as
    4 of the tile's 16) and, 23 queries x 3 heads, two 64-row tiles (the second partly empty)."""
    monkeypatch.setattr(decode_kernel, "MERGE_CHUNK", 2)
    case = make_case(batch=2, seqlen_q=seqlen_q, capacity=257, seqlens=[257, 40], num_heads=6, num_heads_k=2)
    run_and_check(monkeypatch, "triton", case, num_splits=num_splits)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_plain(monkeypatch, path, dtype):
    run_and_check(monkeypatch, path, make_case(batch=3, dtype=dtype, capacity=257, seqlens=[257, 1, 100]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_splits", [1, 3, 0, 200])
def test_num_splits(monkeypatch, path, num_splits):
    case = make_case(batch=2, capacity=257, seqlens=[257, 17], num_heads=6, num_heads_k=2)
    run_and_check(monkeypatch, path, case, num_splits=num_splits)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("interleaved", [True, False])
def test_append_with_rotary(monkeypatch, path, interleaved):
    case = make_case(batch=2, seqlen_q=1, seqlen_new=1, rotary_dim=16, capacity=100, seqlens=[99, 40])
    run_and_check(monkeypatch, path, case, interleaved=interleaved)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_append_several_rotary_positions(monkeypatch, path, causal):
    # seqlen_q > 1: q's rotary positions are cache_seqlens + i only under causal/local attention.
    case = make_case(batch=2, seqlen_q=3, seqlen_new=3, rotary_dim=32, head_dim=40, capacity=64, seqlens=[10, 61])
    run_and_check(monkeypatch, path, case, causal=causal, interleaved=False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("page_size", [16, 48])
def test_paged_append_crosses_pages(monkeypatch, path, page_size):
    # Appends of 5 tokens starting just before a page end, at a page start, and mid-page.
    seqlens = [page_size - 2, page_size, 2 * page_size + 7]
    case = make_case(batch=3, seqlen_q=5, seqlen_new=5, page_size=page_size, capacity=3 * page_size,
                     seqlens=seqlens, rotary_dim=16, num_heads=4, num_heads_k=1)
    run_and_check(monkeypatch, path, case, causal=True)


@pytest.mark.parametrize("path", PATHS)
def test_paged_long_seqlen_new(monkeypatch, path):
    # seqlen_new longer than a page: one append fills several pages.
    case = make_case(batch=2, seqlen_q=2, seqlen_new=37, page_size=16, capacity=96, seqlens=[3, 50])
    run_and_check(monkeypatch, path, case, num_splits=2)


def poison_unused_slots(case, seqlen_new=0):
    """NaN in every cache slot no sequence uses (past each sequence's end, unused pages): never read
    for a result, yet TMA reads whole blocks past a sequence's end."""
    used_k = torch.zeros(case["k_cache"].shape[:2], dtype=torch.bool)
    table = case.get("block_table")
    rows = case.get("cache_batch_idx")
    for b, seqlen in enumerate(case["cache_seqlens"].tolist()):
        for pos in range(seqlen + seqlen_new):
            if table is None:
                used_k[rows[b] if rows is not None else b, pos] = True
            else:
                used_k[table[b, pos // case["k_cache"].shape[1]], pos % case["k_cache"].shape[1]] = True
    for name in ("k_cache", "v_cache"):
        case[name] = case[name].masked_fill(~used_k[:, :, None, None], math.nan)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("page_size", [None, 64], ids=["contiguous", "paged64"])
@pytest.mark.parametrize("window", [(-1, -1), (40, 0)], ids=["full", "window"])
def test_nan_in_unused_slots(monkeypatch, path, page_size, window):
    """Pages of whole blocks (64 = 2 interpreter blocks) take the TMA path; the window's first key is
    not block-aligned there."""
    case = make_case(batch=3, seqlen_q=2, seqlen_new=1, page_size=page_size, capacity=192, seqlens=[150, 5, 63],
                     num_heads=4, num_heads_k=2)
    poison_unused_slots(case, seqlen_new=1)
    run_and_check(monkeypatch, path, case, window=window, num_splits=3)


@pytest.mark.parametrize("path", PATHS)
def test_batch_idx_and_leftpad(monkeypatch, path):
    case = make_case(batch=3, seqlen_q=2, seqlen_new=2, batch_idx=True, leftpad=True, rotary_dim=16,
                     capacity=100, seqlens=[50, 98, 7])
    run_and_check(monkeypatch, path, case, window=(20, 3))


@pytest.mark.parametrize("path", PATHS)
def test_leftpad_paged(monkeypatch, path):
    case = make_case(batch=2, seqlen_q=1, page_size=32, leftpad=True, capacity=96, seqlens=[90, 40])
    run_and_check(monkeypatch, path, case, causal=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [(8, 0), (30, -1), (-1, 2), (0, 0)])
def test_window(monkeypatch, path, window):
    case = make_case(batch=2, seqlen_q=4, capacity=100, seqlens=[100, 9], num_heads=2, num_heads_k=2)
    run_and_check(monkeypatch, path, case, window=window, num_splits=3)


@pytest.mark.parametrize("path", PATHS)
def test_softcap_alibi_gqa_odd_head_dim(monkeypatch, path):
    case = make_case(batch=2, seqlen_q=3, num_heads=6, num_heads_k=2, head_dim=40, alibi=True, capacity=128,
                     seqlens=[128, 70])
    run_and_check(monkeypatch, path, case, causal=True, softcap=5.0, scale=0.3)


@pytest.mark.parametrize("path", PATHS)
def test_alibi_one_dim_slopes(monkeypatch, path):
    case = make_case(batch=2, num_heads=4, num_heads_k=4, capacity=64, seqlens=[64, 30])
    case["alibi_slopes"] = torch.rand(4) * 0.5
    run_and_check(monkeypatch, path, case)


@pytest.mark.parametrize("path", PATHS)
def test_many_query_rows(monkeypatch, path):
    # groups * seqlen_q = 8 * 9 rows: more than one row block of the decode kernel.
    case = make_case(batch=1, seqlen_q=9, num_heads=8, num_heads_k=1, head_dim=16, capacity=80, seqlens=[80])
    run_and_check(monkeypatch, path, case, causal=True)


@pytest.mark.parametrize("path", PATHS)
def test_empty_rows(monkeypatch, path):
    # A sequence with an empty cache sees nothing: out 0, lse +inf, never NaN.
    case = make_case(batch=2, capacity=40, seqlens=[0, 40])
    out, lse = run_and_check(monkeypatch, path, case)
    assert (out[0] == 0).all() and torch.isinf(lse[0]).all()


@pytest.mark.parametrize("path", PATHS)
def test_int_and_default_cache_seqlens(monkeypatch, path):
    monkeypatch.setenv("PYFLASH_BACKEND", "reference" if path == "reference" else "triton")
    monkeypatch.setattr(decode_kernel, "USE_TMA", path == "triton")
    case = make_case(batch=2, capacity=33, seqlens=[33, 33])
    expected = flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], cache_seqlens=case["cache_seqlens"])
    for seqlens in (33, None):
        out = flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], cache_seqlens=seqlens)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    case = make_case(batch=2, seqlen_new=1, capacity=33, seqlens=[20, 20])
    out = flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], case["k"], case["v"], cache_seqlens=5)
    assert out.shape == case["q"].shape


def test_paths_agree_and_returns_out_alone(monkeypatch):
    case = make_case(batch=2, seqlen_q=2, num_heads=4, num_heads_k=2, capacity=70, seqlens=[70, 33])
    results = []
    for path in PATHS:
        monkeypatch.setenv("PYFLASH_BACKEND", "reference" if path == "reference" else "triton")
        monkeypatch.setattr(decode_kernel, "USE_TMA", path == "triton")
        out = flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], cache_seqlens=case["cache_seqlens"])
        assert isinstance(out, torch.Tensor)
        results.append(out.float())
    for result in results[1:]:
        torch.testing.assert_close(results[0], result, atol=2e-2, rtol=0)


def test_merge_chunk():
    from pyflash.kernels.decode import MERGE_CHUNK, merge_chunk

    assert merge_chunk(num_splits=1, merge_m=4, block_d=128) == 1  # no merge
    assert merge_chunk(num_splits=3, merge_m=4, block_d=128) == 4  # a power of two covering the splits
    assert merge_chunk(num_splits=64, merge_m=4, block_d=128) == MERGE_CHUNK
    assert merge_chunk(num_splits=16, merge_m=16, block_d=128) == 4  # 16 x 128 fp32 outputs: 16 registers a part
    assert merge_chunk(num_splits=16, merge_m=64, block_d=256) == 1


def test_pick_num_splits():
    from pyflash.kernels.decode import MAX_SPLITS, pick_num_splits

    assert pick_num_splits(programs=8, max_seqlen_k=8192, block_n=64, multiprocessors=132) == 16
    assert pick_num_splits(programs=512, max_seqlen_k=8192, block_n=64, multiprocessors=132) == 1
    assert pick_num_splits(programs=8, max_seqlen_k=100, block_n=64, multiprocessors=132) == 1
    assert pick_num_splits(programs=1, max_seqlen_k=1 << 20, block_n=64, multiprocessors=1000) == MAX_SPLITS


@pytest.mark.parametrize("bad, match", [
    (dict(cache_seqlens=torch.tensor([1, 2], dtype=torch.int64)), "cache_seqlens"),
    (dict(cache_batch_idx=torch.tensor([0], dtype=torch.int32)), "cache_batch_idx"),
    (dict(k="only"), "k and v"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), "block_table"),
    (dict(num_splits=-1), "num_splits"),
])
def test_validation(bad, match):
    case = make_case(batch=2, capacity=32, seqlens=[3, 4])
    args = dict(cache_seqlens=case["cache_seqlens"])
    if bad.get("k") == "only":
        bad = dict(k=torch.zeros(2, 1, 2, 32, dtype=torch.bfloat16))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"], **args)


def test_validation_messages():
    case = make_case(batch=2, capacity=32, seqlens=[3, 4])
    q, kc, vc = case["q"], case["k_cache"], case["v_cache"]
    with pytest.raises(TypeError, match="k_cache"):
        flash_attn_with_kvcache(q, kc.float(), vc)
    with pytest.raises(ValueError, match="num_heads"):
        flash_attn_with_kvcache(q[:, :, :3], kc, vc)
    with pytest.raises(ValueError, match="page size"):
        flash_attn_with_kvcache(q, kc[:, :24], vc[:, :24], block_table=torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens must be given"):
        k = torch.zeros(2, 1, 2, 32, dtype=q.dtype)
        flash_attn_with_kvcache(q, kc, vc, k, k)
    with pytest.raises(ValueError, match="rotary"):
        cos = torch.zeros(32, 8, dtype=q.dtype)
        flash_attn_with_kvcache(q, kc, vc, rotary_cos=cos, rotary_sin=cos, cache_seqlens=3)


def test_mha_varlen_fwd_block_table(monkeypatch):
    """mha_varlen_fwd(..., block_table=) over a paged K/V equals the packed varlen call."""
    from pyflash.api import mha_varlen_fwd

    monkeypatch.setenv("PYFLASH_BACKEND", "reference")
    gen = torch.Generator().manual_seed(3)
    page_size, lengths_q, lengths_k = 16, [3, 1, 5], [37, 0, 70]
    k_pages = torch.randn(16, page_size, 2, 32, generator=gen, dtype=torch.float32)
    v_pages = torch.randn(16, page_size, 2, 32, generator=gen, dtype=torch.float32)
    block_table = torch.randperm(16, generator=gen)[:15].view(3, 5).to(torch.int32)
    k_packed = torch.cat([logical_cache(k_pages, b, None, block_table)[:n] for b, n in enumerate(lengths_k)])
    v_packed = torch.cat([logical_cache(v_pages, b, None, block_table)[:n] for b, n in enumerate(lengths_k)])
    q = torch.randn(sum(lengths_q), 4, 32, generator=gen)
    cu_q = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 37, 37, 107], dtype=torch.int32)
    common = (cu_q, cu_k, None, None, 5, 70, 0.0, None, False, True, -1, -1, False, None)
    paged = mha_varlen_fwd(q, k_pages, v_pages, None, *common, block_table=block_table)
    packed = mha_varlen_fwd(q, k_packed, v_packed, None, *common)
    torch.testing.assert_close(paged[0], packed[0], atol=0, rtol=0)
    torch.testing.assert_close(paged[4], packed[4], atol=0, rtol=0)
    assert paged[2] is k_pages and paged[3] is v_pages
    with pytest.raises(ValueError, match="page_block_size"):
        mha_varlen_fwd(q, k_pages[:, :8], v_pages[:, :8], None, *common, block_table=block_table)
    with pytest.raises(TypeError, match="block_table"):
        mha_varlen_fwd(q, k_pages, v_pages, None, *common, block_table=block_table.long())


def test_decode_falls_back_to_smaller_tiles(monkeypatch, small_shared_memory):
    """Where the decode tiles do not fit (Triton raises OutOfResources: d=128 needs 139 KB, an sm_86
    part has 99 KB), smaller key blocks run; the splits still cover every key."""
    from pyflash.kernels import decode

    limited = small_shared_memory(decode, "_decode_kernel", 16 * 16)
    case = make_case(batch=2, capacity=257, seqlens=[257, 17], num_heads=6, num_heads_k=2)
    run_and_check(monkeypatch, "triton", case, num_splits=3)
    # The interpreter's block_n 32 over 3 stages does not fit; block_n 16 at one stage does.
    assert limited.launched == [dict(BLOCK_M=16, BLOCK_N=16, num_stages=1)]
