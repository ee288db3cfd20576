"""The Triton backward at real sizes on the GPU (run through scripts/gpu_check.py on the device).

Against a float32 reference through autograd (the flash_attn error rule: at most twice the error
of the same reference run in the input dtype, plus a small atol), against PyTorch's own
FlashAttention-2 backward (``aten._flash_attention_backward``) where it has the feature, and
bitwise determinism.
"""
import math

import pytest
import torch

from pyflash.kernels.backward import backward, backward_config
from pyflash.params import AttentionParams, Seqlens

from materialised import reference

pytestmark = pytest.mark.gpu


def make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(batch, seqlen_q, num_heads, head_dim), (batch, seqlen_k, num_heads_k, head_dim),
              (batch, seqlen_k, num_heads_k, head_dim), (batch, seqlen_q, num_heads, head_dim)]
    return [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in shapes]


def reference_grads(q, k, v, dout, params, batch_offset=0, compute_dtype=torch.float32):
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out, lse, _ = reference(*leaves, params, batch_offset, compute_dtype)
    grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype))
    return out.detach(), lse.detach(), grads


def run_backward(dout, q, k, v, out, lse, params, seqlens, deterministic=True, atomic_dq=False,
                 default_path=False):
    """dq, dk, dv, softmax_d from the kernels, outputs poisoned first so a missed element shows.
    atomic_dq: the table's config with dQ by fp32 atomics (used when not deterministic);
    default_path: no config, as the API calls it (the Gluon backward where it handles the call)."""
    dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
    softmax_d = torch.full_like(lse, math.nan)
    if default_path:
        backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, deterministic)
    else:
        config = backward_config(q, q.shape[-1], params.is_causal)._replace(atomic_dq=atomic_dq)
        backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, deterministic, config=config)
    return dq, dk, dv, softmax_d


def assert_error_rule(ours, ref, lowp, name, atol=1e-4):
    assert not ours.isnan().any(), f"{name}: NaN"
    err = (ours.float() - ref).abs().max().item()
    bound = 2 * (lowp.float() - ref).abs().max().item() + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


FEATURES = {
    "plain": {},
    "causal": dict(window_right=0),
    "window": dict(window_left=200, window_right=37),
    "softcap": dict(softcap=20.0),
    "alibi": dict(alibi=True, window_right=0),
    "dropout": dict(dropout_p=0.17),
}


def make_params(head_dim, batch, num_heads, window_left=-1, window_right=-1, softcap=0.0, alibi=False,
                dropout_p=0.0):
    slopes = None
    if alibi:
        slopes = torch.rand(batch, num_heads, device="cuda", dtype=torch.float32) * 0.3
    return AttentionParams(head_dim ** -0.5, window_left, window_right, softcap, slopes, dropout_p,
                           philox_seed=0x1234_5678_9ABC, philox_offset=4096)


DENSE_CASES = [  # (feature, head_dim, dtype, deterministic: False runs the atomic dQ path)
    *[("plain", d, dtype, True) for d in (64, 128, 256, 72) for dtype in (torch.bfloat16, torch.float16)],
    *[(f, d, torch.bfloat16, True) for f in FEATURES if f != "plain" for d in (64, 128, 256)],
    # fp32 (ieee dots)
    *[("plain", d, torch.float32, True) for d in (64, 128)],
    ("causal", 256, torch.float32, True),
    # dQ by fp32 atomics (not deterministic; on Hopper one TMA reduce-add a tile, DQ_TMA)
    *[(f, 128, dtype, False) for f in ("plain", "causal", "dropout") for dtype in (torch.bfloat16, torch.float16)],
    *[(f, 64, torch.bfloat16, False) for f in ("plain", "causal", "window", "softcap", "alibi", "dropout")],
    ("plain", 64, torch.float16, False), ("plain", 72, torch.bfloat16, False),  # d=72: element atomics (no TMA view)
]


@pytest.mark.parametrize("feature,head_dim,dtype,deterministic", DENSE_CASES)
def test_dense_against_float32(feature, head_dim, dtype, deterministic):
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k = 2, 1000, 1531, 6, 2
    q, k, v, dout = make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype)
    params = make_params(head_dim, batch, num_heads, **FEATURES[feature])
    out, lse, ref = reference_grads(q, k, v, dout, params)
    _, _, lowp = reference_grads(q, k, v, dout, params, compute_dtype=dtype)
    dq, dk, dv, softmax_d = run_backward(dout, q, k, v, out.to(dtype), lse.float(), params,
                                         Seqlens(batch, seqlen_q, seqlen_k), deterministic,
                                         atomic_dq=not deterministic)
    for name, ours, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, lowp):
        # fp32: the "low precision" reference is the reference; allow float32 rounding of the sums
        assert_error_rule(ours, r, lp, name, atol=1e-4 * r.abs().max().item() if dtype == torch.float32 else 1e-4)
    delta = (dout.float() * out.to(dtype).float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(softmax_d, delta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("feature,head_dim,dtype", [
    ("plain", 128, torch.bfloat16), ("causal", 128, torch.bfloat16), ("causal", 128, torch.float16),
    ("plain", 128, torch.float16), ("plain", 64, torch.bfloat16), ("window", 128, torch.bfloat16)])
def test_default_path_against_float32(feature, head_dim, dtype):
    """As the API calls it (not deterministic, no config): the Gluon backward at d=128 without a window
    (GQA, seqlen_q != seqlen_k), the Triton kernels elsewhere."""
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k = 2, 1000, 1531, 6, 2
    q, k, v, dout = make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype)
    params = make_params(head_dim, batch, num_heads, **FEATURES[feature])
    out, lse, ref = reference_grads(q, k, v, dout, params)
    _, _, lowp = reference_grads(q, k, v, dout, params, compute_dtype=dtype)
    dq, dk, dv, softmax_d = run_backward(dout, q, k, v, out.to(dtype), lse.float(), params,
                                         Seqlens(batch, seqlen_q, seqlen_k), deterministic=False,
                                         default_path=True)
    for name, ours, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, lowp):
        assert_error_rule(ours, r, lp, name)
    delta = (dout.float() * out.to(dtype).float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(softmax_d, delta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gluon_dq", [False, True])
@pytest.mark.parametrize("feature,head_dim,dtype", [
    ("plain", 128, torch.bfloat16), ("causal", 128, torch.float16), ("plain", 256, torch.float16),
    ("causal", 256, torch.bfloat16)])
def test_deterministic_two_pass_against_float32(monkeypatch, feature, head_dim, dtype, gluon_dq):
    """Deterministic calls as the API makes them at d=128 / 256: the Gluon dK / dV kernel without dQ, then
    the Triton dQ kernel or (gluon_backward.GLUON_DQ) the Gluon one; twice, the same bits."""
    from pyflash.kernels import gluon_backward

    monkeypatch.setattr(gluon_backward, "GLUON_DQ", gluon_backward.GLUON_DQ_HEAD_DIMS if gluon_dq else ())
    batch, seqlen_q, seqlen_k, num_heads, num_heads_k = 2, 1000, 1531, 6, 2
    q, k, v, dout = make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype, seed=5)
    params = make_params(head_dim, batch, num_heads, **FEATURES[feature])
    out, lse, ref = reference_grads(q, k, v, dout, params)
    _, _, lowp = reference_grads(q, k, v, dout, params, compute_dtype=dtype)
    seqlens = Seqlens(batch, seqlen_q, seqlen_k)
    first = run_backward(dout, q, k, v, out.to(dtype), lse.float(), params, seqlens, True, default_path=True)
    second = run_backward(dout, q, k, v, out.to(dtype), lse.float(), params, seqlens, True, default_path=True)
    for name, ours, r, lp in zip(("dq", "dk", "dv"), first, ref, lowp):
        assert_error_rule(ours, r, lp, name)
    for name, a, b in zip(("dq", "dk", "dv", "softmax_d"), first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("coop", [1, 2])
@pytest.mark.parametrize("causal,dtype", [(False, torch.float16), (True, torch.bfloat16)])
@pytest.mark.parametrize("acc_init", [False, True])
def test_coop_first_pass_matches_split_d(causal, dtype, acc_init, coop):
    """gluon_backward.Config.coop (S^T and dP^T once each, P^T and dS^T crossing between the warpgroups
    through shared memory) against the split_d first pass it would replace (d=256, no dQ): the same
    arithmetic, so dK and dV with the same bits; both against float32 (GQA, seqlen_q != seqlen_k)."""
    from pyflash.kernels import gluon_backward as gb

    batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim = 2, 1000, 1531, 4, 2, 256
    q, k, v, dout = make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype, seed=7)
    params = make_params(head_dim, batch, num_heads, **FEATURES["causal" if causal else "plain"])
    out, lse, ref = reference_grads(q, k, v, dout, params)
    _, _, lowp = reference_grads(q, k, v, dout, params, compute_dtype=dtype)
    base = gb.two_pass_config(head_dim, causal)._replace(acc_init=acc_init)
    grads = {}
    for variant in (0, coop):
        dk, dv = (torch.full_like(t, math.nan) for t in (k, v))
        gb.backward_gluon(dout, q, k, v, out.to(dtype), lse.float(), params.softmax_scale, causal, dk=dk, dv=dv,
                          config=base._replace(coop=variant))
        grads[variant] = (dk, dv)
    for name, ours, r, lp in zip(("dk", "dv"), grads[coop], ref[1:], lowp[1:]):
        assert_error_rule(ours, r, lp, name)
    for name, a, b in zip(("dk", "dv"), grads[coop], grads[0]):
        assert torch.equal(a, b), f"coop={coop} {name} differs from split_d's"


@pytest.mark.parametrize("head_dim,causal,dtype,with_dq,coop", [
    (64, False, torch.bfloat16, True, 0), (64, True, torch.float16, True, 0),
    (128, False, torch.float16, True, 0), (128, True, torch.bfloat16, True, 0),
    (128, True, torch.bfloat16, False, 0), (128, False, torch.bfloat16, False, 0),
    (256, True, torch.bfloat16, False, 0), (256, False, torch.float16, False, 0),
    (256, True, torch.bfloat16, False, 2)])
def test_persistent_matches_one_tile_per_cta(head_dim, causal, dtype, with_dq, coop):
    """gluon_backward.Config.persistent (one CTA per SM looping over key-block tiles, the Q / dO ring and its
    barriers running on across tiles) against the same config with one tile per CTA: each key block's steps
    are the same arithmetic in the same order, so dK and dV with the same bits; dQ (TMA reduce-adds in
    another order) and all three against float32. 384 tiles (768 at d=256, split_d without dQ: the first pass
    of the two-pass backward; also with coop): several per CTA on any Hopper card; GQA, seqlen_q != seqlen_k,
    ragged ends."""
    from pyflash.kernels import gluon_backward as gb

    batch, seqlen_q, seqlen_k, num_heads, num_heads_k = 4, 700, 1531, 16, 8
    q, k, v, dout = make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype, seed=11)
    params = make_params(head_dim, batch, num_heads, **FEATURES["causal" if causal else "plain"])
    out, lse, ref = reference_grads(q, k, v, dout, params)
    _, _, lowp = reference_grads(q, k, v, dout, params, compute_dtype=dtype)
    base = gb.Config(acc_init=not causal, lpt=causal, with_dq=with_dq, split_d=head_dim == 256, coop=coop)
    grads = {}
    for persistent in (False, True):
        dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
        gb.backward_gluon(dout, q, k, v, out.to(dtype), lse.float(), params.softmax_scale, causal, dq=dq, dk=dk,
                          dv=dv, config=base._replace(persistent=persistent))
        grads[persistent] = (dq, dk, dv)
    names = ("dq", "dk", "dv") if with_dq else ("dk", "dv")
    for name, ours, r, lp in zip(("dq", "dk", "dv"), grads[True], ref, lowp):
        if name in names:
            assert_error_rule(ours, r, lp, name)
    if not with_dq:
        assert grads[True][0].isnan().all(), "with_dq=False wrote dq"
    for name, a, b in zip(("dk", "dv"), grads[True][1:], grads[False][1:]):
        assert torch.equal(a, b), f"persistent {name} differs from one tile per CTA"


@pytest.mark.parametrize("causal,dtype,num_stages,acc_init,dq_bufs", [
    (False, torch.bfloat16, 2, True, 1), (True, torch.bfloat16, 2, False, 1), (False, torch.float16, 3, False, 1),
    (True, torch.float16, 3, True, 1), (True, torch.bfloat16, 2, True, 2)])
def test_one_warpgroup_against_float32(causal, dtype, num_stages, acc_init, dq_bufs):
    """gluon_backward.Config(wgs=1, dq_own): one consumer warpgroup of 64 keys a CTA, two CTAs an SM (a
    d=64 tuning candidate): dQ, dK and dV against float32 with flash_attn's rule; GQA, seqlen_q != seqlen_k,
    ragged ends."""
    from pyflash.kernels import gluon_backward as gb

    batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim = 2, 1000, 1531, 6, 2, 64
    q, k, v, dout = make_inputs(batch, seqlen_q, seqlen_k, num_heads, num_heads_k, head_dim, dtype, seed=13)
    params = make_params(head_dim, batch, num_heads, **FEATURES["causal" if causal else "plain"])
    out, lse, ref = reference_grads(q, k, v, dout, params)
    _, _, lowp = reference_grads(q, k, v, dout, params, compute_dtype=dtype)
    dq, dk, dv = (torch.full_like(t, math.nan) for t in (q, k, v))
    config = gb.Config(num_stages=num_stages, acc_init=acc_init, dq_bufs=dq_bufs, dq_own=True, wgs=1)
    gb.backward_gluon(dout, q, k, v, out.to(dtype), lse.float(), params.softmax_scale, causal, dq=dq, dk=dk, dv=dv,
                      config=config)
    for name, ours, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, lowp):
        assert_error_rule(ours, r, lp, name)


@pytest.mark.parametrize("atomic_dq", [False, True])
@pytest.mark.parametrize("seqused", [False, True])
def test_varlen_against_float32(seqused, atomic_dq):
    dtype, head_dim, num_heads, num_heads_k = torch.bfloat16, 128, 4, 1
    lens_q, lens_k = [513, 1, 1200, 77], [700, 300, 1200, 1]
    used_k = [650, 0, 1199, 1] if seqused else lens_k
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    q, k, v, dout = (t[0] for t in make_inputs(1, sum(lens_q), sum(lens_k), num_heads, num_heads_k, head_dim,
                                              dtype))
    params = make_params(head_dim, len(lens_q), num_heads, window_left=300, window_right=0, alibi=True,
                         dropout_p=0.1)
    out = torch.empty_like(q)
    lse = torch.empty(num_heads, q.shape[0], device="cuda")
    # Sequence by sequence into whole tensors: the error rule holds over the whole output, as
    # flash_attn's tests do (a row that sees one key has dq = 0 exactly in the reference, and
    # only O's rounding in delta = rowsum(dO * O) in ours).
    ref = [torch.zeros(t.shape, device="cuda") for t in (q, k, v)]
    lowp = [torch.zeros_like(t) for t in (q, k, v)]
    for s in range(len(lens_q)):
        rq, rk = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s] + used_k[s])
        args = (q[None, rq], k[None, rk], v[None, rk], dout[None, rq], params, s)
        o, l, grads = reference_grads(*args)
        for whole, part, rows in zip(ref, grads, (rq, rk, rk)):
            whole[rows] = part[0]
        for whole, part, rows in zip(lowp, reference_grads(*args, compute_dtype=dtype)[2], (rq, rk, rk)):
            whole[rows] = part[0]
        out[rq], lse[:, rq] = o[0].to(dtype), l[0]
    seqlens = Seqlens(len(lens_q), max(lens_q), max(lens_k), cu_q, cu_k,
                      torch.tensor(used_k, device="cuda", dtype=torch.int32) if seqused else None)
    dq, dk, dv, _ = run_backward(dout, q, k, v, out, lse, params, seqlens, deterministic=not atomic_dq,
                                 atomic_dq=atomic_dq)
    for name, ours, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, lowp):
        assert_error_rule(ours, r, lp, name)
    for s in range(len(lens_q)):
        # Keys past seqused_k get no gradient.
        unused = slice(cu_k[s] + used_k[s], cu_k[s + 1])
        assert (dk[unused] == 0).all() and (dv[unused] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (256, 128)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_against_torch_flash(causal, window, head_dim):
    """Same out/lse through PyTorch's FlashAttention-2 backward: our error to the float32 reference
    is at most twice its error (plus atol)."""
    if causal and window != (-1, -1):
        pytest.skip("causal with window is covered by the window case's right bound")
    dtype, batch, seqlen, num_heads = torch.bfloat16, 2, 2048, 4
    q, k, v, dout = make_inputs(batch, seqlen, seqlen, num_heads, num_heads, head_dim, dtype, seed=1)
    scale = head_dim ** -0.5
    left, right = window if not causal else (-1, 0)
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, seqlen, seqlen, 0.0, causal, False, scale=scale,
        window_size_left=left if left >= 0 else None, window_size_right=right if right >= 0 else None)
    torch_grads = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, None, None, seqlen, seqlen, 0.0, causal, rng_state, unused, scale=scale,
        window_size_left=left if left >= 0 else None, window_size_right=right if right >= 0 else None)
    params = AttentionParams(scale, left, right)
    dq, dk, dv, _ = run_backward(dout, q, k, v, out, lse, params, Seqlens(batch, seqlen, seqlen),
                                 deterministic=False, default_path=True)
    _, _, ref = reference_grads(q, k, v, dout, params)
    for name, ours, theirs, r in zip(("dq", "dk", "dv"), (dq, dk, dv), torch_grads, ref):
        assert_error_rule(ours, r, theirs, name)


@pytest.mark.parametrize("feature", ["plain", "causal", "dropout"])
def test_deterministic_bitwise(feature):
    dtype, head_dim, batch, seqlen, num_heads, num_heads_k = torch.bfloat16, 128, 2, 4096, 8, 2
    q, k, v, dout = make_inputs(batch, seqlen, seqlen, num_heads, num_heads_k, head_dim, dtype, seed=2)
    params = make_params(head_dim, batch, num_heads, **FEATURES[feature])
    out = torch.randn_like(q)
    lse = torch.randn(batch, num_heads, seqlen, device="cuda") + 8.0
    seqlens = Seqlens(batch, seqlen, seqlen)
    first = run_backward(dout, q, k, v, out, lse, params, seqlens, deterministic=True)
    second = run_backward(dout, q, k, v, out, lse, params, seqlens, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv", "softmax_d"), first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
