"""Dropout on the reference path: the mask statistics, reproducibility from the seed, the mask's layout
(checked against naive.keep_mask, written from DEVELOPERS.md), return_softmax's probabilities, and a
backward that uses the forward's mask."""
import math

import pytest
import torch

import naive
import pyflash

NAN = float("nan")


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _dense(batch, seqlen_q, seqlen_k, h, hk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (_randn((batch, seqlen_q, h, d), dtype, gen), _randn((batch, seqlen_k, hk, d), dtype, gen),
            _randn((batch, seqlen_k, hk, d), dtype, gen), gen)


def _fwd(q, k, v, p_dropout, gen_, causal=False, window=(-1, -1), slopes=None, softcap=0.0,
         return_softmax=False, scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out_ = torch.full(q.shape, NAN, dtype=q.dtype)
    res = pyflash.mha_fwd(q, k, v, out_, slopes, p_dropout, scale, causal, window[0], window[1],
                          return_softmax, gen_, softcap=softcap)
    assert res[0].data_ptr() == out_.data_ptr()
    return res


def test_kept_fraction_within_three_sigma():
    for p_dropout in (0.1, 0.5, 0.83):
        q, k, v, _ = _dense(2, 130, 100, 4, 2, 8, torch.float32, seed=1)
        gen = torch.Generator().manual_seed(int(p_dropout * 1000))
        out, *_, lse, seed, offset, p = _fwd(q, k, v, p_dropout, gen, return_softmax=True)
        visible = p[:, :, :130, :100]
        assert (visible != 0).all(), "every visible probability is nonzero (kept > 0, dropped < 0)"
        kept = (visible > 0).double().mean().item()
        n = visible.numel()
        sigma = math.sqrt(p_dropout * (1 - p_dropout) / n)
        assert abs(kept - (1 - p_dropout)) < 3 * sigma, (p_dropout, kept, sigma)


# A single key (1x1) only in fp32: there dq is exactly 0 in exact math and in the naive low-precision
# math, while FlashAttention's delta = rowsum(dout * out) uses the out rounded to the input dtype,
# which leaves a rounding-sized dq the error rule has no baseline for.
MASK_CASES = [((1, 1), torch.float32)] + [
    (seqlens, dtype) for seqlens in [(1, 17), (17, 100), (100, 17), (257, 129)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("seqlens,dtype", MASK_CASES, ids=[f"{s[0]}x{s[1]}-{d}" for s, d in MASK_CASES])
def test_mask_output_probs_and_backward(seqlens, dtype):
    """The mask recovered from return_softmax's sign is naive.keep_mask of the returned seed/offset;
    out, |p| and the gradients match the naive oracle using that mask."""
    seqlen_q, seqlen_k = seqlens
    batch, h, hk, d, p_dropout = 2, 4, 2, 24, 0.3
    q, k, v, gen = _dense(batch, seqlen_q, seqlen_k, h, hk, d, dtype, seed=seqlen_q * 1000 + seqlen_k)
    slopes = torch.rand(batch, h, generator=gen) * 0.3
    opts = dict(causal=True, slopes=slopes, softcap=3.0)
    out, _, _, _, lse, seed_t, offset_t, p = _fwd(q, k, v, p_dropout, torch.Generator().manual_seed(5),
                                                  return_softmax=True, **opts)
    assert seed_t.dtype == torch.int64 and offset_t.dtype == torch.int64 and seed_t.dim() == 0
    seed, offset = int(seed_t), int(offset_t)
    assert p.shape == (batch, h, -(-seqlen_q // 128) * 128, -(-seqlen_k // 128) * 128)
    assert p.dtype == dtype

    kwargs = dict(softmax_scale=d ** -0.5, causal=True, alibi_slopes=slopes, softcap=3.0,
                  p_dropout=p_dropout, seed_offset=(seed, offset))
    out64, lse64, probs64 = naive.attention(q, k, v, compute_dtype=torch.float64, return_probs=True, **kwargs)
    lowp, _, probs_lowp = naive.attention(q, k, v, return_probs=True, **kwargs)
    atol = naive.RULE_ATOL[dtype]
    naive.assert_rule(out, out64, lowp, "out", atol)
    _, lse32 = naive.attention(q, k, v, compute_dtype=torch.float32, **kwargs)
    naive.assert_rule(lse, lse64, lse32, "lse (undropped)", 1e-5)

    # p: probabilities, dropped ones negated, zeros where invisible and in the rounding padding
    keep = torch.stack([naive.keep_mask(seed, offset, p_dropout, b, h, seqlen_q, seqlen_k) for b in range(batch)])
    vis = naive.visible(seqlen_q, seqlen_k, causal=True).expand_as(keep)
    inner = p[:, :, :seqlen_q, :seqlen_k]
    assert not (inner > 0)[~(keep & vis)].any(), "positive entries are kept and visible"
    assert not (inner < 0)[~(~keep & vis)].any(), "negative entries are dropped and visible"
    representable = vis & (probs64 >= torch.finfo(dtype).tiny)  # the rest may round to 0
    assert (inner[representable] != 0).all(), "visible probabilities are stored"
    assert representable.any()
    assert not p[:, :, seqlen_q:].any() and not p[:, :, :, seqlen_k:].any()
    naive.assert_rule(inner.abs(), probs64, probs_lowp, "|p|", atol)

    # backward with the forward's seed/offset: the oracle's gradients under the same mask
    dout = _randn(q.shape, dtype, gen)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    naive.attention(*leaves64, compute_dtype=torch.float64, **kwargs)[0].backward(dout.double())
    leaves_lowp = [t.clone().requires_grad_() for t in (q, k, v)]
    naive.attention(*leaves_lowp, **kwargs)[0].backward(dout)
    dq_, dk_, dv_ = (torch.full(t.shape, NAN, dtype=dtype) for t in (q, k, v))
    grads = pyflash.mha_bwd(dout, q, k, v, out, lse, dq_, dk_, dv_, slopes, p_dropout, d ** -0.5, True,
                            -1, -1, False, seed_t, offset_t, softcap=3.0)
    for name, got, ref, low in zip(("dq", "dk", "dv"), grads[:3], leaves64, leaves_lowp):
        naive.assert_rule(got, ref.grad, low.grad, name, atol)
    d64 = (dout.double() * out64).sum(-1).transpose(1, 2)
    naive.assert_rule(grads[3], d64, (dout.float() * lowp.float()).sum(-1).transpose(1, 2), "softmax_d", atol)


def test_backward_uses_the_given_seed():
    """A backward handed another offset draws another mask: its gradients differ from the right ones."""
    q, k, v, gen = _dense(1, 40, 50, 2, 2, 16, torch.float32, seed=3)
    out, *_, lse, seed_t, offset_t, _ = _fwd(q, k, v, 0.4, torch.Generator().manual_seed(9))
    dout = _randn(q.shape, torch.float32, gen)
    args = (None, None, None, None, 0.4, 0.25, False, -1, -1, False)
    right = pyflash.mha_bwd(dout, q, k, v, out, lse, *args, seed_t, offset_t)
    wrong = pyflash.mha_bwd(dout, q, k, v, out, lse, *args, seed_t, offset_t + 1)
    assert not torch.allclose(right[1], wrong[1])


def test_same_seed_same_output_other_seed_different():
    q, k, v, _ = _dense(2, 33, 65, 4, 4, 16, torch.bfloat16, seed=4)
    first = _fwd(q, k, v, 0.25, torch.Generator().manual_seed(123))
    again = _fwd(q, k, v, 0.25, torch.Generator().manual_seed(123))
    other = _fwd(q, k, v, 0.25, torch.Generator().manual_seed(124))
    assert torch.equal(first[0], again[0])
    assert torch.equal(first[5], again[5]) and torch.equal(first[6], again[6])
    assert not torch.equal(first[0], other[0])
    assert (int(first[5]), int(first[6])) != (int(other[5]), int(other[6]))


def test_generator_advances_per_call():
    q, k, v, _ = _dense(1, 17, 17, 2, 2, 16, torch.float32, seed=5)
    gen = torch.Generator().manual_seed(77)
    first = _fwd(q, k, v, 0.5, gen)
    second = _fwd(q, k, v, 0.5, gen)
    assert (int(first[5]), int(first[6])) != (int(second[5]), int(second[6]))
    assert not torch.equal(first[0], second[0])


def test_default_generator_advances_and_replays():
    q, k, v, _ = _dense(1, 17, 17, 2, 2, 16, torch.float32, seed=6)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(2024)
        first = _fwd(q, k, v, 0.5, None)
        second = _fwd(q, k, v, 0.5, None)
        assert not torch.equal(first[0], second[0])
        torch.manual_seed(2024)
        replay = _fwd(q, k, v, 0.5, None)
        assert torch.equal(first[0], replay[0])
    finally:
        torch.set_rng_state(state)


def test_no_dropout_draws_nothing():
    """p_dropout == 0 leaves the default generator alone (as the seed: no RNG state is drawn)."""
    q, k, v, _ = _dense(1, 9, 9, 1, 1, 8, torch.float32, seed=7)
    state = torch.get_rng_state()
    try:
        torch.manual_seed(1)
        _fwd(q, k, v, 0.0, None)
        after = torch.rand(4)
        torch.manual_seed(1)
        assert torch.equal(after, torch.rand(4))
    finally:
        torch.set_rng_state(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_dropout_mask_forward_backward(dtype):
    """Varlen: sequence s uses bh = s * h + head and sequence-local (i, j)."""
    lens_q, lens_k = [17, 1, 100, 0], [100, 17, 129, 5]
    cu_q = torch.tensor([0, 17, 18, 118, 118], dtype=torch.int32)
    cu_k = torch.tensor([0, 100, 117, 246, 251], dtype=torch.int32)
    h, hk, d, p_dropout = 4, 1, 16, 0.2
    gen = torch.Generator().manual_seed(8)
    q = _randn((118, h, d), dtype, gen)
    k = _randn((251, hk, d), dtype, gen)
    v = _randn((251, hk, d), dtype, gen)
    out_ = torch.full(q.shape, NAN, dtype=dtype)
    out, _, _, _, lse, seed_t, offset_t, p = pyflash.mha_varlen_fwd(
        q, k, v, out_, cu_q, cu_k, None, None, 100, 129, p_dropout, 0.25, False, False, 30, 4, True,
        torch.Generator().manual_seed(99))
    assert p.shape == (4, h, 128, 256)
    seed, offset = int(seed_t), int(offset_t)
    for s in range(4):
        sq, sk = lens_q[s], lens_k[s]
        keep = naive.keep_mask(seed, offset, p_dropout, s, h, sq, sk)
        vis = naive.visible(sq, sk, 30, 4).expand_as(keep)
        inner = p[s, :, :sq, :sk]
        assert torch.equal(inner > 0, keep & vis), f"sequence {s}"
        assert torch.equal(inner < 0, ~keep & vis), f"sequence {s}"
        assert not p[s, :, sq:].any() and not p[s, :, :, sk:].any()
    kwargs = dict(softmax_scale=0.25, window_left=30, window_right=4, p_dropout=p_dropout,
                  seed_offset=(seed, offset))
    atol = naive.RULE_ATOL[dtype]
    dout = _randn(q.shape, dtype, gen)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = naive.attention_varlen(*leaves64, cu_q, cu_k, 129, compute_dtype=torch.float64, **kwargs)
    out64.backward(dout.double())
    leaves_lowp = [t.clone().requires_grad_() for t in (q, k, v)]
    lowp, _ = naive.attention_varlen(*leaves_lowp, cu_q, cu_k, 129, **kwargs)
    lowp.backward(dout)
    naive.assert_rule(out, out64.detach(), lowp, "out", atol)
    dq, dk, dv, _ = pyflash.mha_varlen_bwd(dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, None, 100,
                                           129, p_dropout, 0.25, False, False, 30, 4, False, seed_t, offset_t)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves64, leaves_lowp):
        naive.assert_rule(got, ref.grad, low.grad, name, atol)
