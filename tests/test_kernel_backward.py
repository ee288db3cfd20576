"""The Triton backward (kernels/backward.py) under TRITON_INTERPRET=1 against float64 autograd through
the naive oracle (tests/naive.py), every feature at small odd shapes.

Error rule (DEVELOPERS.md): |ours - ref64| <= 2 * |naive in the input dtype - ref64| + atol.
out and lse handed to the kernel come from the float64 oracle (out rounded to the input dtype).
"""
import contextlib
import math
from unittest import mock

import pytest
import torch

import naive
from pyflash.kernels import backward as backward_module
from pyflash.kernels.backward import backward
from pyflash.params import AttentionParams, Seqlens

SEED, OFFSET = 0x0123_4567_89AB_CDEF, 12345
# The interpreter turns program ids into 1-element arrays that range() converts: numpy complains.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _grads(q, k, v, dout, compute_dtype, varlen=None, **kwargs):
    """out, lse and (dq, dk, dv) of the oracle in compute_dtype."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    if varlen is None:
        out, lse = naive.attention(*leaves, compute_dtype=compute_dtype, **kwargs)
    else:
        out, lse = naive.attention_varlen(*leaves, *varlen, compute_dtype=compute_dtype, **kwargs)
    return out.detach(), lse.detach(), torch.autograd.grad(out, leaves, dout.to(compute_dtype))


def _check(ours, ref, lowp, name, atol=1e-5):
    assert not ours.isnan().any(), f"{name}: NaN (an element left unwritten?)"
    err = (ours.double() - ref).abs().max().item() if ours.numel() else 0.0
    bound = 2 * (lowp.double() - ref).abs().max().item() + atol if ours.numel() else 0.0
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _run(dout, q, k, v, out, lse, params, seqlens, deterministic=True, config=None, grads=None, use_tma=False,
         fuse_delta=None):
    """The kernels with NaN-poisoned outputs (or the given, possibly strided, ones)."""
    dq, dk, dv = grads or (torch.full_like(t, math.nan) for t in (q, k, v))
    softmax_d = torch.full_like(lse, math.nan)
    backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, deterministic, config=config,
             use_tma=use_tma, fuse_delta=fuse_delta)
    return dq, dk, dv, softmax_d


def check_dense(batch=2, seqlen_q=17, seqlen_k=100, num_heads=2, num_heads_k=1, head_dim=32,
                dtype=torch.float32, window_left=-1, window_right=-1, softcap=0.0, alibi=False, dropout_p=0.0,
                deterministic=True, config=None, grads=None, use_tma=False, fuse_delta=None):
    torch.manual_seed(seqlen_q * 1000 + seqlen_k)
    q = torch.randn(batch, seqlen_q, num_heads, head_dim, dtype=dtype)
    k, v = (torch.randn(batch, seqlen_k, num_heads_k, head_dim, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    slopes = torch.rand(batch, num_heads) * 0.5 if alibi else None
    scale = 0.7 * head_dim ** -0.5
    oracle = dict(softmax_scale=scale, window_left=window_left, window_right=window_right, softcap=softcap,
                  alibi_slopes=slopes, p_dropout=dropout_p, seed_offset=(SEED, OFFSET))
    out, lse, ref = _grads(q, k, v, dout, torch.float64, **oracle)
    _, _, lowp = _grads(q, k, v, dout, dtype, **oracle)
    params = AttentionParams(scale, window_left, window_right, softcap, slopes, dropout_p, SEED, OFFSET)
    dq, dk, dv, softmax_d = _run(dout, q, k, v, out.to(dtype), lse.float(), params,
                                 Seqlens(batch, seqlen_q, seqlen_k), deterministic, config, grads, use_tma,
                                 fuse_delta)
    for name, ours, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, lowp):
        _check(ours, r, lp, name)
    delta = (dout.double() * out.to(dtype).double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(softmax_d.double(), delta, rtol=1e-5, atol=1e-5)
    return dq, dk, dv, softmax_d


# (name, kwargs of check_dense): every feature, small odd shapes.
DENSE_CASES = [
    ("plain_mha_d64", dict(seqlen_q=100, seqlen_k=128, num_heads=2, num_heads_k=2, head_dim=64)),
    ("gqa_padded_d40", dict(seqlen_q=17, seqlen_k=100, num_heads=4, num_heads_k=1, head_dim=40)),
    ("seqlen_q_1", dict(batch=3, seqlen_q=1, seqlen_k=100, head_dim=16)),
    ("seqlen_k_1", dict(seqlen_q=17, seqlen_k=1, head_dim=16)),
    ("causal_rows_without_keys", dict(seqlen_q=100, seqlen_k=17, window_right=0)),
    ("causal_long_keys", dict(seqlen_q=17, seqlen_k=100, window_right=0, head_dim=64)),
    ("causal_square", dict(batch=1, seqlen_q=128, seqlen_k=128, window_right=0)),
    ("window_both", dict(seqlen_q=100, seqlen_k=128, window_left=9, window_right=4)),
    ("window_left_only", dict(seqlen_q=100, seqlen_k=100, window_left=20)),
    ("window_empty_rows", dict(seqlen_q=100, seqlen_k=17, window_left=3, window_right=2)),
    ("softcap", dict(seqlen_q=100, seqlen_k=17, softcap=2.5)),
    ("alibi_causal", dict(seqlen_q=17, seqlen_k=100, alibi=True, window_right=0)),
    ("dropout_gqa", dict(seqlen_q=100, seqlen_k=17, num_heads=4, num_heads_k=2, dropout_p=0.3)),
    ("everything", dict(seqlen_q=17, seqlen_k=100, num_heads=4, num_heads_k=2, window_left=30,
                        window_right=0, softcap=3.0, alibi=True, dropout_p=0.2, dtype=torch.bfloat16)),
    ("bf16", dict(seqlen_q=100, seqlen_k=17, dtype=torch.bfloat16, head_dim=64)),
    ("fp16_causal", dict(seqlen_q=17, seqlen_k=17, dtype=torch.float16, window_right=0)),
    ("d256", dict(batch=1, seqlen_q=17, seqlen_k=33, head_dim=256, dtype=torch.bfloat16)),
    ("atomic_dq_dropout", dict(seqlen_q=100, seqlen_k=17, num_heads=4, num_heads_k=2, dropout_p=0.25,
                               window_right=0, deterministic=False,
                               config=((16, 32, 4, 1), (32, 16, 4, 1), True))),
    ("atomic_dq_softcap_alibi_d64", dict(batch=3, seqlen_q=57, seqlen_k=100, num_heads=4, num_heads_k=1,
                                         head_dim=64, softcap=3.0, alibi=True, deterministic=False,
                                         config=((16, 32, 4, 1), (32, 16, 4, 1), True))),
    ("blocks_m_gt_n", dict(seqlen_q=100, seqlen_k=128, window_left=40, window_right=7,
                           config=((32, 16, 4, 1), (16, 32, 4, 1), False))),
]


def _dense_params():
    """Every case over pointer loads; with a power-of-two head dim also over TMA descriptors (Q, dO
    in the dK/dV loops, K, V in the dQ loops: the Hopper path, which the interpreter emulates)."""
    params = []
    for name, kwargs in DENSE_CASES:
        params.append(pytest.param(kwargs, False, id=f"pointers-{name}"))
        head_dim = kwargs.get("head_dim", 32)
        if head_dim & (head_dim - 1) == 0:
            params.append(pytest.param(kwargs, True, id=f"tma-{name}"))
    return params


@pytest.mark.parametrize("kwargs, use_tma", _dense_params())
def test_dense(kwargs, use_tma):
    check_dense(**kwargs, use_tma=use_tma)


@contextlib.contextmanager
def _launched_kernels():
    """The names of the kernels backward() launches inside the block, in order."""
    kernels = []
    real_launch_into = backward_module.launch_into

    def spy(launches, fn, *args):
        kernels.append(fn.__name__)
        return real_launch_into(launches, fn, *args)

    with mock.patch.object(backward_module, "launch_into", spy):
        yield kernels


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_dropout_calls_take_the_dropout_row(monkeypatch, dropout_p):
    """configs.BACKWARD_DROPOUT's row (here a distinct one for the interpreter's key) runs calls with dropout,
    correctly; calls without take configs.BACKWARD's."""
    from pyflash.kernels import configs

    key = (0, 4, 32, True)
    row = ((32, 16, 4, 1), (16, 32, 4, 1), False)
    assert configs.BACKWARD[key] != row
    monkeypatch.setitem(configs.BACKWARD_DROPOUT, key, row)
    launched = []
    real_launch_into = backward_module.launch_into

    def spy(launches, fn, grid, args, kwargs, sources):
        launched.append((fn.__name__, kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N")))
        return real_launch_into(launches, fn, grid, args, kwargs, sources)

    with mock.patch.object(backward_module, "launch_into", spy):
        check_dense(seqlen_q=40, seqlen_k=33, num_heads=2, num_heads_k=1, window_right=0, dropout_p=dropout_p)
    expected = row if dropout_p else configs.BACKWARD[key]
    assert ("_dkdv_kernel", *expected[0][:2]) in launched, launched
    assert ("_dq_kernel", *expected[1][:2]) in launched, launched


@pytest.mark.parametrize("name", ["gqa_padded_d40", "causal_rows_without_keys", "window_empty_rows", "everything"])
@pytest.mark.parametrize("fuse_delta", [False, True], ids=["delta_kernel", "fused"])
def test_delta_from_its_own_kernel_or_the_dq_kernel(name, fuse_delta):
    """softmax_d (delta) from _delta_kernel before the dK/dV kernel, or from the dQ kernel launched first: both
    within the error rule, in that launch order."""
    with _launched_kernels() as kernels:
        check_dense(**dict(DENSE_CASES)[name], fuse_delta=fuse_delta)
    assert kernels == (["_dq_kernel", "_dkdv_kernel"] if fuse_delta else ["_delta_kernel", "_dkdv_kernel", "_dq_kernel"])


def test_atomic_dq_keeps_the_delta_kernel():
    """With dQ added by the dK/dV kernel's atomics there is no dQ kernel to compute delta."""
    with _launched_kernels() as kernels:
        check_dense(seqlen_q=33, seqlen_k=17, deterministic=False, config=((16, 32, 4, 1), (32, 16, 4, 1), True))
    assert kernels == ["_delta_kernel", "_dkdv_kernel", "_dq_from_accumulator_kernel"]


@pytest.mark.parametrize("separate_delta", [False, True])
def test_fresh_buffers_are_written_before_they_are_read(monkeypatch, separate_delta):
    """The buffers backward() allocates (atomic dQ's fp32 accumulator, which the delta kernel zeroes; delta when
    softmax_d's strides differ from softmax_lse's) start as NaN here: the gradients still meet the rule."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t
        return allocate_nan

    monkeypatch.setattr(torch, "empty", poisoned(real_empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(real_empty_like))
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim = 2, 33, 17, 4, 2, 32
    torch.manual_seed(3)
    q = torch.randn(batch, seqlen_q, num_heads, head_dim)
    k, v = (torch.randn(batch, seqlen_k, num_heads_k, head_dim) for _ in range(2))
    dout = torch.randn_like(q)
    scale = head_dim ** -0.5
    out, lse, ref = _grads(q, k, v, dout, torch.float64, softmax_scale=scale, window_right=0)
    params, seqlens = AttentionParams(scale, -1, 0), Seqlens(batch, seqlen_q, seqlen_k)
    dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
    softmax_d = torch.full((batch, num_heads, seqlen_q + 3), math.nan)[..., :seqlen_q] if separate_delta else \
        torch.full_like(lse.float(), math.nan)
    backward(dout, q, k, v, out.float(), lse.float(), dq, dk, dv, softmax_d, params, seqlens, False,
             config=((16, 32, 4, 1), (32, 16, 4, 1), True))
    for name, ours, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        _check(ours, r, r, name, atol=1e-4)
    delta = (dout.double() * out.float().double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(softmax_d.double(), delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_right", [-1, 0])
def test_dq_only(window_right):
    """dq_only: the same dq and softmax_d as the whole backward (the same dQ kernel), and dk, dv left
    as they were (NaN here)."""
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim = 2, 100, 33, 4, 2, 64
    torch.manual_seed(7)
    q = torch.randn(batch, seqlen_q, num_heads, head_dim, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen_k, num_heads_k, head_dim, dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    scale = head_dim ** -0.5
    out, lse, _ = _grads(q, k, v, dout, torch.float64, softmax_scale=scale, window_right=window_right)
    out, lse = out.to(q.dtype), lse.float()
    params, seqlens = AttentionParams(scale, -1, window_right), Seqlens(batch, seqlen_q, seqlen_k)
    whole = _run(dout, q, k, v, out, lse, params, seqlens)
    dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
    softmax_d = torch.full_like(lse, math.nan)
    backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, True, dq_only=True)
    assert torch.equal(dq, whole[0]) and torch.equal(softmax_d, whole[3])
    assert dk.isnan().all() and dv.isnan().all()
    # delta_ready: softmax_d is taken as given (here zeros, not rowsum(dO * O)): dq follows it, and it
    # stays as it was.
    softmax_d = torch.zeros_like(lse)
    backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, True, dq_only=True, delta_ready=True)
    assert torch.equal(softmax_d, torch.zeros_like(lse))
    assert torch.isfinite(dq).all() and not torch.allclose(dq.float(), whole[0].float(), atol=1e-2)
    softmax_d = whole[3].clone()
    backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, True, dq_only=True, delta_ready=True)
    assert torch.equal(dq, whole[0])


def test_strided_outputs():
    """dq_/dk_/dv_ given as views with their own strides are written in place."""
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim = 2, 17, 100, 2, 1, 32
    dq = torch.full((batch, seqlen_q, num_heads + 1, head_dim), math.nan)[:, :, 1:]
    dk = torch.full((batch, num_heads_k, seqlen_k, head_dim), math.nan).transpose(1, 2)
    dv = torch.full((batch, seqlen_k, num_heads_k, 2 * head_dim), math.nan)[..., :head_dim]
    got = check_dense(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, window_right=0,
                      grads=(dq, dk, dv))
    assert got[0] is dq and got[1] is dk and got[2] is dv


def test_no_keys():
    """seqlen_k = 0: dq = 0, delta still written."""
    q = torch.randn(2, 17, 2, 16)
    k = v = torch.randn(2, 0, 1, 16)
    out = torch.zeros_like(q)
    lse = torch.full((2, 2, 17), math.inf)
    dq, dk, dv, softmax_d = _run(torch.randn_like(q), q, k, v, out, lse, AttentionParams(0.25, -1, -1),
                                 Seqlens(2, 17, 0))
    assert (dq == 0).all() and (softmax_d == 0).all() and dk.numel() == 0


@pytest.mark.parametrize("features", [
    dict(),
    dict(seqused=True, window_left=5, window_right=0, dropout_p=0.2, alibi=True, softcap=2.0),
], ids=["plain", "seqused_window_dropout_alibi_softcap"])
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("atomic", [False, True], ids=["dq_kernel", "atomic_dq"])
def test_varlen(features, use_tma, atomic):
    """TMA (head dim 32; the pointer path takes a padded 24) reads past a sequence's rows: NaN in the
    keys past seqused_k and in rows after the last sequence must not reach any gradient. atomic: dQ added
    by the dK/dV kernel (with TMA, one reduce-add a tile: rows past a sequence add zeros to the next one's)."""
    dtype, num_heads, num_heads_k = torch.float32, 4, 2
    head_dim = 32 if use_tma else 24
    features = dict(features)
    lens_q, lens_k = [17, 0, 1, 40], [30, 5, 17, 33]
    used_k = [25, 0, 17, 1] if features.pop("seqused", False) else None
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    torch.manual_seed(1)
    q = torch.randn(sum(lens_q), num_heads, head_dim, dtype=dtype)
    k, v = (torch.randn(sum(lens_k), num_heads_k, head_dim, dtype=dtype) for _ in range(2))
    dout = torch.randn_like(q)
    slopes = torch.rand(len(lens_q), num_heads) if features.pop("alibi", False) else None
    scale = head_dim ** -0.5
    seqused = torch.tensor(used_k, dtype=torch.int32) if used_k else None
    oracle = dict(softmax_scale=scale, alibi_slopes=slopes, seqused_k=seqused, seed_offset=(SEED, OFFSET),
                  window_left=features.get("window_left", -1), window_right=features.get("window_right", -1),
                  softcap=features.get("softcap", 0.0), p_dropout=features.get("dropout_p", 0.0))
    varlen = (cu_q, cu_k, max(lens_k))
    out, lse, ref = _grads(q, k, v, dout, torch.float64, varlen, **oracle)
    _, _, lowp = _grads(q, k, v, dout, dtype, varlen, **oracle)
    params = AttentionParams(scale, oracle["window_left"], oracle["window_right"], oracle["softcap"], slopes,
                             oracle["p_dropout"], SEED, OFFSET)
    seqlens = Seqlens(len(lens_q), max(lens_q), max(lens_k), cu_q, cu_k, seqused)
    total_q = sum(lens_q)
    nan_rows = torch.full((3, num_heads, head_dim), math.nan, dtype=dtype)
    q_in, dout_in, out_in = (torch.cat([t, nan_rows]) for t in (q, dout, out.to(dtype)))
    k_in, v_in = k.clone(), v.clone()
    for start, used, stored in zip(cu_k.tolist(), used_k or lens_k, lens_k):
        k_in[start + used:start + stored] = math.nan
        v_in[start + used:start + stored] = math.nan
    dq, dk, dv, softmax_d = _run(dout_in, q_in, k_in, v_in, out_in, lse.float(), params, seqlens,
                                 deterministic=not atomic, use_tma=use_tma,
                                 config=((16, 32, 4, 1), (32, 16, 4, 1), True) if atomic else None)
    dq = dq[:total_q]
    for name, ours, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, lowp):
        _check(ours, r, lp, name)
    torch.testing.assert_close(softmax_d, (dout * out.to(dtype)).sum(-1).T, rtol=1e-5, atol=1e-5)


def test_deterministic_repeats_bitwise():
    """Two deterministic runs give the same bits (weak on the CPU; tests/gpu has the real check)."""
    kwargs = dict(seqlen_q=100, seqlen_k=17, num_heads=4, num_heads_k=2, dropout_p=0.1, window_right=0)
    first = check_dense(**kwargs)
    second = check_dense(**kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_falls_back_to_smaller_tiles(small_shared_memory):
    """Where the table's tiles do not fit (Triton raises OutOfResources), smaller ones run, with the
    grids recomputed: dK/dV and dQ each fall back on their own."""
    from pyflash.kernels import backward as kernels

    dkdv = small_shared_memory(kernels, "_dkdv_kernel", 16 * 16)
    dq = small_shared_memory(kernels, "_dq_kernel", 16 * 16)
    check_dense(seqlen_q=100, seqlen_k=128, window_right=0, head_dim=32, dropout_p=0.2)
    # The interpreter's (16, 32) and (32, 16) tiles do not fit; (16, 16) at one stage does.
    assert dkdv.launched == [dict(BLOCK_M=16, BLOCK_N=16, num_stages=1)]
    assert dq.launched == [dict(BLOCK_M=16, BLOCK_N=16, num_stages=1)]


def test_two_pass_rule(monkeypatch):
    """gluon_backward.two_pass: deterministic calls at TWO_PASS_HEAD_DIMS and
    DETERMINISTIC_TWO_PASS_HEAD_DIMS, causal ones at TWO_PASS_HEAD_DIMS while TWO_PASS_CAUSAL, the others
    there while TWO_PASS_NONCAUSAL, and short keys per TWO_PASS_MAX_SEQLEN_K; never elsewhere. two_pass_config
    has no dQ work (d=256: coop)."""
    from pyflash.kernels import gluon_backward as gb

    monkeypatch.setattr(gb, "TWO_PASS_MAX_SEQLEN_K", {(128, True): 1024})
    assert gb.two_pass(128, True, False, 1024) and gb.two_pass(128, True, False, 17)
    assert not gb.two_pass(128, True, False, 1025) and not gb.two_pass(128, True, False)
    assert not gb.two_pass(128, False, False, 512) and not gb.two_pass(64, True, False, 512)
    monkeypatch.setattr(gb, "TWO_PASS_MAX_SEQLEN_K", {})

    for head_dim in (64, 128, 256):
        for causal in (False, True):
            for deterministic in (False, True):
                by_mask = gb.TWO_PASS_CAUSAL if causal else gb.TWO_PASS_NONCAUSAL
                expect = (head_dim in gb.TWO_PASS_HEAD_DIMS and (deterministic or by_mask)
                          or deterministic and head_dim in gb.DETERMINISTIC_TWO_PASS_HEAD_DIMS)
                assert gb.two_pass(head_dim, causal, deterministic) == expect
    assert 256 in gb.TWO_PASS_HEAD_DIMS and gb.two_pass(256, False, True) and gb.two_pass(256, False, False)
    assert gb.two_pass(128, False, True) and gb.two_pass(128, True, True)
    assert not gb.two_pass(128, False, False) and not gb.two_pass(128, True, False) and not gb.two_pass(64, True, True)
    for head_dim in (128, 256):
        for causal in (False, True):
            cfg = gb.two_pass_config(head_dim, causal)
            assert not cfg.with_dq and cfg.split_d == (head_dim == 256) and cfg.coop == (head_dim == 256)
