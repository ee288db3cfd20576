"""The public API on CPU tensors (the reference path) against the naive float64 oracle.

Forward through ``pyflash.mha_fwd`` / ``mha_varlen_fwd``, backward through ``mha_bwd`` /
``mha_varlen_bwd`` against autograd through ``naive.py``; the error rule is flash_attn's
(``naive.assert_rule``). Outputs are poisoned with NaN first so an unwritten element shows.
"""
import zlib

import pytest
import torch

import naive
import pyflash

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN = float("nan")


def _randn(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def _poisoned(shape, dtype):
    return torch.full(shape, NAN, dtype=dtype)


def _seeded(*key):
    """A generator seeded from the test's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _round_up(x, m):
    return (x + m - 1) // m * m


# name -> options; h/hk default 4/4
FEATURES = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(10, 5)),
    "window_left": dict(window=(20, -1)),
    "window_right": dict(window=(-1, 7)),
    "window_diagonal": dict(window=(0, 0)),
    # windows at or past seqlen_k (max_seqlen_k for varlen) are unbounded: right = sk matters when sq > sk
    "window_at_sk": dict(window=("sk", "sk")),
    "window_past_sk": dict(window=(1000, 1000)),
    "causal_local": dict(causal=True, window=(13, -1)),
    "alibi_h": dict(alibi="h"),
    "alibi_bh": dict(alibi="bh"),
    "softcap": dict(softcap=1.5, scale=0.5),
    "gqa": dict(h=6, hk=2),
    "mqa": dict(h=4, hk=1),
    "strided": dict(strided=True),
    "everything": dict(causal=True, window=(40, -1), alibi="bh", softcap=2.0, h=6, hk=3, strided=True),
}
SEQLENS = [(1, 1), (1, 257), (17, 100), (100, 17), (257, 100), (128, 257), (257, 257)]


def _inputs(batch, seqlen_q, seqlen_k, opts, dtype, head_dim, gen):
    h, hk = opts.get("h", 4), opts.get("hk", 4)
    if opts.get("strided"):
        # q/k/v as views of packed buffers: arbitrary strides, last dim contiguous
        q = _randn((batch, seqlen_q, h + 1, head_dim), dtype, gen)[:, :, 1:]
        kv = _randn((batch, seqlen_k, 2, hk, head_dim), dtype, gen)
        k, v = kv[:, :, 0], kv[:, :, 1]
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q = _randn((batch, seqlen_q, h, head_dim), dtype, gen)
        k = _randn((batch, seqlen_k, hk, head_dim), dtype, gen)
        v = _randn((batch, seqlen_k, hk, head_dim), dtype, gen)
    slopes = None
    if opts.get("alibi") == "h":
        slopes = torch.rand(h, generator=gen) * 0.5 + 0.05
    elif opts.get("alibi") == "bh":
        slopes = torch.rand(batch, h, generator=gen) * 0.5 + 0.05
    return q, k, v, slopes


def _naive_kwargs(opts, scale, seqlen_k):
    wl, wr = _api_window(opts, seqlen_k)
    return dict(softmax_scale=scale, causal=opts.get("causal", False), window_left=wl,
                window_right=wr, softcap=opts.get("softcap", 0.0))


def _api_window(opts, seqlen_k):
    return tuple(seqlen_k if w == "sk" else w for w in opts.get("window", (-1, -1)))


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)[0]
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("feature", list(FEATURES))
def test_dense_forward_backward(feature, seqlens, dtype):
    opts = FEATURES[feature]
    seqlen_q, seqlen_k = seqlens
    batch, head_dim = 2, 32
    gen = _seeded(feature, seqlens, dtype)
    q, k, v, slopes = _inputs(batch, seqlen_q, seqlen_k, opts, dtype, head_dim, gen)
    scale = opts.get("scale", head_dim ** -0.5)
    wl, wr = _api_window(opts, seqlen_k)
    causal = opts.get("causal", False)
    softcap = opts.get("softcap", 0.0)
    atol = naive.RULE_ATOL[dtype]

    out_ = _poisoned(q.shape, dtype)
    res = pyflash.mha_fwd(q, k, v, out_, slopes, 0.0, scale, causal, wl, wr, False, None,
                          softcap=softcap)
    assert len(res) == 8
    out, _, _, _, lse, seed_t, offset_t, _ = res
    assert out.data_ptr() == out_.data_ptr(), "out_ must be written in place and returned"
    assert lse.dtype == torch.float32 and lse.shape == (batch, q.shape[2], seqlen_q)

    kwargs = dict(_naive_kwargs(opts, scale, seqlen_k), alibi_slopes=slopes)
    dout = _randn(out.shape, dtype, gen)
    out64, grads64 = _grads(lambda *t: naive.attention(*t, compute_dtype=torch.float64, **kwargs),
                            (q.double(), k.double(), v.double()), dout)
    lowp, grads_lowp = _grads(lambda *t: naive.attention(*t, **kwargs), (q, k, v), dout)
    _, lse64 = naive.attention(q, k, v, compute_dtype=torch.float64, **kwargs)
    _, lse32 = naive.attention(q, k, v, compute_dtype=torch.float32, **kwargs)
    assert_rule = naive.assert_rule
    assert_rule(out, out64, lowp, "out", atol)
    # lse is an fp32 output whatever the input dtype: its baseline is the naive math in fp32
    assert_rule(lse, lse64, lse32, "lse", naive.RULE_ATOL[torch.float32])

    dq_, dk_, dv_ = _poisoned(q.shape, dtype), _poisoned(k.shape, dtype), _poisoned(v.shape, dtype)
    dq, dk, dv, softmax_d = pyflash.mha_bwd(dout, q, k, v, out, lse, dq_, dk_, dv_, slopes, 0.0,
                                            scale, causal, wl, wr, False, seed_t, offset_t,
                                            softcap=softcap)
    for got, given in ((dq, dq_), (dk, dk_), (dv, dv_)):
        assert got.data_ptr() == given.data_ptr(), "dq_/dk_/dv_ must be written in place and returned"
    for name, got, ref, low in zip(("dq", "dk", "dv"), (dq, dk, dv), grads64, grads_lowp):
        assert_rule(got, ref, low, name, atol)
    # softmax_d = rowsum(dout * out) of the out handed in
    d64 = (dout.double() * out64.double()).sum(-1).transpose(1, 2)
    d_lowp = (dout.float() * lowp.float()).sum(-1).transpose(1, 2)
    assert softmax_d.dtype == torch.float32
    assert_rule(softmax_d[..., :seqlen_q], d64, d_lowp, "softmax_d", atol)


def _varlen_case(lens_q, lens_k, pad_q, pad_k, seqused_k=None):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    used = None if seqused_k is None else torch.tensor(seqused_k, dtype=torch.int32)
    return cu_q, cu_k, used, int(cu_q[-1]) + pad_q, int(cu_k[-1]) + pad_k


# (lens_q, lens_k, padding rows after the last q / k sequence)
VARLEN_CASES = {
    "mixed": ([17, 1, 100, 257], [100, 17, 257, 1], 0, 0),
    "empty_k_and_q": ([17, 0, 40, 5], [0, 33, 100, 130], 0, 0),
    "padded_tail": ([33, 129], [7, 200], 5, 9),
    "single": ([257], [100], 0, 0),
}
VARLEN_FEATURES = ["plain", "causal", "window", "window_at_sk", "causal_local", "alibi_h", "alibi_bh", "softcap",
                   "gqa", "mqa", "everything"]


def _varlen_inputs(total_q, total_k, num_seqs, opts, dtype, head_dim, gen):
    h, hk = opts.get("h", 4), opts.get("hk", 4)
    if opts.get("strided"):
        q = _randn((total_q, h + 2, head_dim), dtype, gen)[:, 2:]
        kv = _randn((total_k, 2, hk, head_dim), dtype, gen)
        k, v = kv[:, 0], kv[:, 1]
    else:
        q = _randn((total_q, h, head_dim), dtype, gen)
        k = _randn((total_k, hk, head_dim), dtype, gen)
        v = _randn((total_k, hk, head_dim), dtype, gen)
    slopes = None
    if opts.get("alibi") == "h":
        slopes = torch.rand(h, generator=gen) * 0.5 + 0.05
    elif opts.get("alibi") == "bh":
        slopes = torch.rand(num_seqs, h, generator=gen) * 0.5 + 0.05
    return q, k, v, slopes


def _seq_rows(cu):
    """Bool over the flattened rows: True for rows that belong to a sequence."""
    rows = torch.zeros(int(cu[-1]), dtype=torch.bool)
    for s in range(len(cu) - 1):
        rows[int(cu[s]):int(cu[s + 1])] = True
    return rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("feature", VARLEN_FEATURES)
def test_varlen_forward_backward(feature, case, dtype):
    opts = FEATURES[feature]
    lens_q, lens_k, pad_q, pad_k = VARLEN_CASES[case]
    cu_q, cu_k, _, total_q, total_k = _varlen_case(lens_q, lens_k, pad_q, pad_k)
    num_seqs, head_dim = len(lens_q), 40
    max_q, max_k = max(lens_q), max(lens_k)
    gen = _seeded(feature, case, dtype)
    q, k, v, slopes = _varlen_inputs(total_q, total_k, num_seqs, opts, dtype, head_dim, gen)
    scale = opts.get("scale", head_dim ** -0.5)
    wl, wr = _api_window(opts, max_k)
    causal = opts.get("causal", False)
    softcap = opts.get("softcap", 0.0)
    atol = naive.RULE_ATOL[dtype]

    out_ = _poisoned(q.shape, dtype)
    res = pyflash.mha_varlen_fwd(q, k, v, out_, cu_q, cu_k, None, slopes, max_q, max_k, 0.0, scale,
                                 False, causal, wl, wr, False, None, softcap=softcap)
    assert len(res) == 8
    out, _, _, _, lse, seed_t, offset_t, _ = res
    assert out.data_ptr() == out_.data_ptr()
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], total_q)

    kwargs = dict(_naive_kwargs(opts, scale, max_k), alibi_slopes=slopes)
    rows = torch.arange(total_q) < int(cu_q[-1])
    keys = torch.arange(total_k) < int(cu_k[-1])
    dout = _randn(out.shape, dtype, gen)

    def oracle(qq, kk, vv, compute_dtype=None):
        return naive.attention_varlen(qq, kk, vv, cu_q, cu_k, max_k, compute_dtype=compute_dtype,
                                      **kwargs)

    out64, grads64 = _grads(lambda *t: oracle(*t, compute_dtype=torch.float64),
                            (q.double(), k.double(), v.double()), dout * rows[:, None, None])
    lowp, grads_lowp = _grads(oracle, (q, k, v), dout * rows[:, None, None])
    _, lse64 = oracle(q, k, v, torch.float64)
    _, lse32 = oracle(q, k, v, torch.float32)
    naive.assert_rule(out[rows], out64[rows], lowp[rows], "out", atol)
    naive.assert_rule(lse[:, rows], lse64[:, rows], lse32[:, rows], "lse", naive.RULE_ATOL[torch.float32])

    dq_, dk_, dv_ = _poisoned(q.shape, dtype), _poisoned(k.shape, dtype), _poisoned(v.shape, dtype)
    dq, dk, dv, softmax_d = pyflash.mha_varlen_bwd(
        dout, q, k, v, out, lse, dq_, dk_, dv_, cu_q, cu_k, slopes, max_q, max_k, 0.0, scale, False,
        causal, wl, wr, False, seed_t, offset_t, softcap=softcap)
    for got, given in ((dq, dq_), (dk, dk_), (dv, dv_)):
        assert got.data_ptr() == given.data_ptr()
    naive.assert_rule(dq[rows], grads64[0][rows], grads_lowp[0][rows], "dq", atol)
    naive.assert_rule(dk[keys], grads64[1][keys], grads_lowp[1][keys], "dk", atol)
    naive.assert_rule(dv[keys], grads64[2][keys], grads_lowp[2][keys], "dv", atol)
    d64 = (dout.double() * out64).sum(-1).t()
    d_lowp = (dout.float() * lowp.float()).sum(-1).t()
    naive.assert_rule(softmax_d[:, rows], d64[:, rows], d_lowp[:, rows], "softmax_d", atol)


@pytest.mark.parametrize("feature", ["plain", "causal", "window", "alibi_bh"])
def test_varlen_seqused_k(feature):
    """seqused_k: sequence s uses only its first seqused_k[s] keys. The seed's mha_varlen_bwd has no
    seqused_k; ours takes it as a keyword extra and gives unused keys zero gradients."""
    opts = FEATURES[feature]
    dtype = torch.float32
    cu_q, cu_k, used, total_q, total_k = _varlen_case([17, 100, 5, 30], [100, 40, 257, 3], 0, 0,
                                                      seqused_k=[60, 0, 257, 1])
    max_q, max_k = 100, 257
    gen = torch.Generator().manual_seed(7)
    q, k, v, slopes = _varlen_inputs(total_q, total_k, 4, opts, dtype, 32, gen)
    wl, wr = _api_window(opts, max_k)
    out_ = _poisoned(q.shape, dtype)
    out, *_, lse, seed_t, offset_t, _ = pyflash.mha_varlen_fwd(
        q, k, v, out_, cu_q, cu_k, used, slopes, max_q, max_k, 0.0, 0.2, False,
        opts.get("causal", False), wl, wr, False, None)
    kwargs = dict(_naive_kwargs(opts, 0.2, max_k), alibi_slopes=slopes, seqused_k=used)
    out64, lse64 = naive.attention_varlen(q, k, v, cu_q, cu_k, max_k, compute_dtype=torch.float64, **kwargs)
    lowp, lse32 = naive.attention_varlen(q, k, v, cu_q, cu_k, max_k, **kwargs)
    naive.assert_rule(out, out64, lowp, "out", 1e-5)
    naive.assert_rule(lse, lse64, lse32, "lse", 1e-5)
    # the unused keys must not matter: poison them
    k2, v2 = k.clone(), v.clone()
    for s in range(4):
        k2[int(cu_k[s]) + int(used[s]):int(cu_k[s + 1])] = NAN
        v2[int(cu_k[s]) + int(used[s]):int(cu_k[s + 1])] = NAN
    out2 = pyflash.mha_varlen_fwd(q, k2, v2, None, cu_q, cu_k, used, slopes, max_q, max_k, 0.0, 0.2,
                                  False, opts.get("causal", False), wl, wr, False, None)[0]
    assert torch.equal(out2, out)
    # sequence 1 uses no key: output 0, lse +inf
    rows1 = slice(int(cu_q[1]), int(cu_q[2]))
    assert torch.equal(out[rows1], torch.zeros_like(out[rows1]))
    assert torch.isposinf(lse[:, rows1]).all()

    dout = _randn(q.shape, dtype, gen)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    naive.attention_varlen(*leaves64, cu_q, cu_k, max_k, compute_dtype=torch.float64, **kwargs)[0].backward(dout.double())
    leaves32 = [t.clone().requires_grad_() for t in (q, k, v)]
    naive.attention_varlen(*leaves32, cu_q, cu_k, max_k, **kwargs)[0].backward(dout)
    grads = pyflash.mha_varlen_bwd(dout, q, k, v, out, lse, *[_poisoned(t.shape, dtype) for t in (q, k, v)],
                                   cu_q, cu_k, slopes, max_q, max_k, 0.0, 0.2, False, opts.get("causal", False),
                                   wl, wr, False, seed_t, offset_t, seqused_k=used)
    for name, got, ref, low in zip(("dq", "dk", "dv"), grads, leaves64, leaves32):
        naive.assert_rule(got, ref.grad, low.grad, name, 1e-5)


def test_varlen_zero_tensors():
    """zero_tensors: padding rows of out are 0 and their lse -inf (the seed's fill); the backward
    zeroes dq/dk/dv/softmax_d outside the sequences."""
    dtype = torch.float32
    cu_q, cu_k, _, total_q, total_k = _varlen_case([17, 30], [20, 50], 6, 4)
    gen = torch.Generator().manual_seed(3)
    q, k, v, _ = _varlen_inputs(total_q, total_k, 2, {}, dtype, 16, gen)
    out_ = _poisoned(q.shape, dtype)
    out, *_, lse, seed_t, offset_t, _ = pyflash.mha_varlen_fwd(
        q, k, v, out_, cu_q, cu_k, None, None, 30, 50, 0.0, 0.25, True, True, -1, -1, False, None)
    tail_q = slice(int(cu_q[-1]), None)
    tail_k = slice(int(cu_k[-1]), None)
    assert torch.equal(out[tail_q], torch.zeros_like(out[tail_q]))
    assert torch.isneginf(lse[:, tail_q]).all()
    out64, lse64 = naive.attention_varlen(q, k, v, cu_q, cu_k, 50, softmax_scale=0.25, causal=True,
                                          compute_dtype=torch.float64)
    lowp, _ = naive.attention_varlen(q, k, v, cu_q, cu_k, 50, softmax_scale=0.25, causal=True)
    naive.assert_rule(out, out64, lowp, "out", 1e-5)
    dout = _randn(q.shape, dtype, gen)
    dq_, dk_, dv_ = _poisoned(q.shape, dtype), _poisoned(k.shape, dtype), _poisoned(v.shape, dtype)
    dq, dk, dv, softmax_d = pyflash.mha_varlen_bwd(
        dout, q, k, v, out, lse, dq_, dk_, dv_, cu_q, cu_k, None, 30, 50, 0.0, 0.25, True, True,
        -1, -1, False, seed_t, offset_t)
    for name, t, tail in (("dq", dq, tail_q), ("dk", dk, tail_k), ("dv", dv, tail_k)):
        assert torch.equal(t[tail], torch.zeros_like(t[tail])), name
        assert not torch.isnan(t).any(), name
    assert torch.equal(softmax_d[:, tail_q], torch.zeros_like(softmax_d[:, tail_q]))
    assert not torch.isnan(softmax_d).any()


def test_rows_without_keys_dense():
    """Causal with sq > sk: the first sq - sk rows see no key: out 0, lse +inf, dq 0."""
    gen = torch.Generator().manual_seed(11)
    q = _randn((2, 50, 2, 16), torch.float32, gen)
    k = _randn((2, 20, 2, 16), torch.float32, gen)
    v = _randn((2, 20, 2, 16), torch.float32, gen)
    out, *_, lse, seed_t, offset_t, _ = pyflash.mha_fwd(q, k, v, _poisoned(q.shape, q.dtype), None,
                                                        0.0, 0.25, True, -1, -1, False, None)
    blind = slice(0, 30)
    assert torch.equal(out[:, blind], torch.zeros_like(out[:, blind]))
    assert torch.isposinf(lse[:, :, blind]).all()
    assert torch.isfinite(lse[:, :, 30:]).all()
    assert (out[:, 30:] != 0).any()
    dout = _randn(q.shape, torch.float32, gen)
    dq, dk, dv, _ = pyflash.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, 0.25, True,
                                    -1, -1, False, seed_t, offset_t)
    assert torch.equal(dq[:, blind], torch.zeros_like(dq[:, blind]))
    assert not torch.isnan(dk).any() and not torch.isnan(dv).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seqlen_k_zero(dtype):
    gen = torch.Generator().manual_seed(5)
    q = _randn((2, 17, 4, 32), dtype, gen)
    k = _randn((2, 0, 2, 32), dtype, gen)
    v = _randn((2, 0, 2, 32), dtype, gen)
    out_ = _poisoned(q.shape, dtype)
    out, *_, lse, seed_t, offset_t, _ = pyflash.mha_fwd(q, k, v, out_, None, 0.0, 0.2, False, -1, -1,
                                                        False, None)
    assert out.data_ptr() == out_.data_ptr()
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 4, 17) and torch.isposinf(lse).all()
    dout = _randn(q.shape, dtype, gen)
    dq, dk, dv, softmax_d = pyflash.mha_bwd(dout, q, k, v, out, lse, _poisoned(q.shape, dtype), None,
                                            None, None, 0.0, 0.2, False, -1, -1, False, seed_t, offset_t)
    assert torch.equal(dq, torch.zeros_like(dq))
    assert dk.shape == k.shape and dv.shape == v.shape
    assert not torch.isnan(softmax_d).any()


def test_batch_size_zero():
    q = torch.randn(0, 17, 4, 32)
    k = torch.randn(0, 33, 4, 32)
    v = torch.randn(0, 33, 4, 32)
    out, q_padded, k_padded, v_padded, lse, seed_t, offset_t, p = pyflash.mha_fwd(
        q, k, v, None, None, 0.0, 0.2, True, -1, -1, False, None)
    assert out.shape == q.shape and lse.shape == (0, 4, 17)
    dq, dk, dv, softmax_d = pyflash.mha_bwd(torch.randn(q.shape), q, k, v, out, lse, None, None, None,
                                            None, 0.0, 0.2, True, -1, -1, False, seed_t, offset_t)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert softmax_d.shape[:2] == (0, 4)


def test_returns_seed_and_offset_tensors_without_dropout():
    q = torch.randn(1, 8, 2, 16)
    res = pyflash.mha_fwd(q, q, q, None, None, 0.0, 0.25, False, -1, -1, False, None)
    for t in res[5:7]:
        assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == "cpu"
        assert t.dim() == 0


@pytest.mark.parametrize("head_dim", [5, 20, 60, 96, 200, 256])
def test_head_dims(head_dim):
    """Any head dim: multiples of 8 run as they are; others are zero-padded as the seed does, the
    padded copies returned, the output sliced back to the original head dim."""
    gen = torch.Generator().manual_seed(head_dim)
    dtype = torch.bfloat16
    padded_dim = _round_up(head_dim, 8)
    q = _randn((2, 33, 4, head_dim), dtype, gen)
    k = _randn((2, 65, 2, head_dim), dtype, gen)
    v = _randn((2, 65, 2, head_dim), dtype, gen)
    scale = head_dim ** -0.5
    out_ = _poisoned(q.shape, dtype)
    out, q_padded, k_padded, v_padded, lse, seed_t, offset_t, _ = pyflash.mha_fwd(
        q, k, v, out_, None, 0.0, scale, True, -1, -1, False, None)
    assert out.shape == q.shape
    assert torch.equal(out_, out), "out_ must hold the result"
    for given, padded in ((q, q_padded), (k, k_padded), (v, v_padded)):
        assert padded.shape == given.shape[:-1] + (padded_dim,)
        assert torch.equal(padded[..., :head_dim], given)
        assert not padded[..., head_dim:].any()
    out64, lse64 = naive.attention(q, k, v, softmax_scale=scale, causal=True, compute_dtype=torch.float64)
    lowp, lse32 = naive.attention(q, k, v, softmax_scale=scale, causal=True)
    naive.assert_rule(out, out64, lowp, "out", naive.RULE_ATOL[dtype])
    naive.assert_rule(lse, lse64, naive.attention(q, k, v, softmax_scale=scale, causal=True,
                                                 compute_dtype=torch.float32)[1], "lse", 1e-5)

    dout = _randn(q.shape, dtype, gen)
    _, grads64 = _grads(lambda *t: naive.attention(*t, softmax_scale=scale, causal=True,
                                                   compute_dtype=torch.float64),
                        (q.double(), k.double(), v.double()), dout)
    _, grads_lowp = _grads(lambda *t: naive.attention(*t, softmax_scale=scale, causal=True), (q, k, v), dout)
    bwd_args = (None, 0.0, scale, True, -1, -1, False, seed_t, offset_t)

    # As the seed's callers do it: padded q/k/v/out, dout at the original head dim; the gradients
    # come back at the padded head dim with zeros in the padding.
    out_padded = torch.nn.functional.pad(out, (0, padded_dim - head_dim))
    seed_style = pyflash.mha_bwd(dout, q_padded, k_padded, v_padded, out_padded, lse, None, None, None, *bwd_args)
    # And on the caller's own tensors: gradients at the original head dim, dq_/dk_/dv_ filled in place.
    given = [_poisoned(t.shape, dtype) for t in (q, k, v)]
    own = pyflash.mha_bwd(dout, q, k, v, out, lse, *given, *bwd_args)
    for name, padded_grad, grad, buffer, ref, low in zip(("dq", "dk", "dv"), seed_style, own, given,
                                                        grads64, grads_lowp):
        assert padded_grad.shape[-1] == padded_dim, name
        assert not padded_grad[..., head_dim:].any(), name
        naive.assert_rule(padded_grad[..., :head_dim], ref, low, name, naive.RULE_ATOL[dtype])
        assert grad.shape == ref.shape and torch.equal(grad, buffer), name
        naive.assert_rule(grad, ref, low, name, naive.RULE_ATOL[dtype])


def test_deterministic_backward_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(21)
    q = _randn((2, 100, 4, 32), torch.bfloat16, gen)
    k = _randn((2, 257, 2, 32), torch.bfloat16, gen)
    v = _randn((2, 257, 2, 32), torch.bfloat16, gen)
    out, *_, lse, seed_t, offset_t, _ = pyflash.mha_fwd(q, k, v, None, None, 0.0, 0.2, True, -1, -1,
                                                        False, None)
    dout = _randn(q.shape, torch.bfloat16, gen)
    runs = [pyflash.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, 0.2, True, -1, -1,
                            True, seed_t, offset_t) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_default_scale_not_assumed():
    """softmax_scale is taken as given (no hidden 1/sqrt(d)): two scales give the oracle's answers."""
    gen = torch.Generator().manual_seed(8)
    q = _randn((1, 20, 2, 16), torch.float32, gen)
    k = _randn((1, 30, 2, 16), torch.float32, gen)
    v = _randn((1, 30, 2, 16), torch.float32, gen)
    for scale in (0.05, 1.3):
        out = pyflash.mha_fwd(q, k, v, None, None, 0.0, scale, False, -1, -1, False, None)[0]
        ref, _ = naive.attention(q, k, v, softmax_scale=scale, compute_dtype=torch.float64)
        assert (out.double() - ref).abs().max() < 1e-5


def test_varlen_no_keys_at_all():
    """Every sequence has zero keys (total_k == 0, max_seqlen_k == 0): out 0, lse +inf, dq 0."""
    cu_q = torch.tensor([0, 5, 17], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 0], dtype=torch.int32)
    gen = torch.Generator().manual_seed(13)
    q = _randn((17, 4, 16), torch.bfloat16, gen)
    k = _randn((0, 2, 16), torch.bfloat16, gen)
    v = _randn((0, 2, 16), torch.bfloat16, gen)
    out_ = _poisoned(q.shape, q.dtype)
    out, *_, lse, seed_t, offset_t, _ = pyflash.mha_varlen_fwd(
        q, k, v, out_, cu_q, cu_k, None, None, 12, 0, 0.0, 0.25, False, True, -1, -1, False, None)
    assert out.data_ptr() == out_.data_ptr()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()
    dq, dk, dv, softmax_d = pyflash.mha_varlen_bwd(
        _randn(q.shape, q.dtype, gen), q, k, v, out, lse, _poisoned(q.shape, q.dtype), None, None, cu_q, cu_k,
        None, 12, 0, 0.0, 0.25, False, True, -1, -1, False, seed_t, offset_t)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape
    assert not torch.isnan(softmax_d).any()
