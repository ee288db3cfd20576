"""The flash_attn-compatible interface and the SDPA drop-in, on the reference path (CPU).

Values and gradients against the float64 oracle (tests/naive.py); packed variants against the
unpacked ones; the custom ops through torch.library.opcheck; torch.compile(fullgraph=True) of a tiny
model with backend "aot_eager" (traces forward and backward through the fake implementations).
"""
import pytest
import torch
import torch.nn.functional as F

import naive
from pyflash import interface
from pyflash.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)

ATOL = 1e-4  # fp32 inputs on the reference path: errors are ~1e-6


def _rand(*shape, dtype=torch.float32, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _assert_close(ours, ref, lowp):
    """flash_attn's rule: |ours - ref64| <= 2 |lowp - ref64| + atol; NaN never passes."""
    err = (ours.double() - ref).abs().max().item()
    bound = 2 * (lowp.double() - ref).abs().max().item() + ATOL
    assert err <= bound, f"max error {err} > bound {bound}"


def _check_against_oracle(q, k, v, dout, ours_fn, oracle_fn):
    out = ours_fn(q, k, v)
    grads = _grads(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle_fn(q64, k64, v64, torch.float64)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double())
    lowp = oracle_fn(q, k, v, torch.float32)
    lowp_grads = _grads(lowp, (q, k, v), dout)
    _assert_close(out, ref, lowp)
    for ours, ref_g, lowp_g in zip(grads, ref_grads, lowp_grads):
        assert ours.shape == ref_g.shape
        _assert_close(ours, ref_g, lowp_g)


CASES = [
    # batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, options
    (2, 17, 17, 4, 4, 16, dict(causal=True)),
    (1, 100, 33, 4, 2, 20, dict(causal=True)),  # head dim padded by the API, GQA, sq > sk
    (2, 1, 128, 2, 1, 8, dict(window_size=(5, 0))),
    (1, 33, 100, 6, 3, 32, dict(window_size=(7, 3), softcap=2.0)),
    (2, 17, 40, 4, 4, 24, dict(alibi=True, causal=True, softmax_scale=0.3)),
]


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads,heads_k,head_dim,options", CASES)
def test_flash_attn_func_matches_oracle(batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, options):
    torch.manual_seed(0)
    options = dict(options)
    alibi = torch.rand(heads) * 0.5 if options.pop("alibi", False) else None
    q = _rand(batch, seqlen_q, heads, head_dim)
    k, v = _rand(batch, seqlen_k, heads_k, head_dim), _rand(batch, seqlen_k, heads_k, head_dim)
    dout = torch.randn(batch, seqlen_q, heads, head_dim)
    window_left, window_right = options.get("window_size", (-1, -1))

    def oracle(q, k, v, dtype):
        return naive.attention(q, k, v, softmax_scale=options.get("softmax_scale"),
                               causal=options.get("causal", False), window_left=window_left,
                               window_right=window_right, softcap=options.get("softcap", 0.0),
                               alibi_slopes=alibi, compute_dtype=dtype)[0]

    _check_against_oracle(q, k, v, dout, lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=alibi, **options),
                          oracle)


def test_flash_attn_varlen_func_matches_oracle():
    torch.manual_seed(1)
    cu_seqlens_q = torch.tensor([0, 5, 5, 22, 40], dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, 9, 12, 12, 50], dtype=torch.int32)
    q = _rand(40, 4, 20)
    k, v = _rand(50, 2, 20), _rand(50, 2, 20)
    dout = torch.randn(40, 4, 20)

    def oracle(q, k, v, dtype):
        return naive.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k=38, causal=True,
                                      window_left=6, compute_dtype=dtype)[0]

    _check_against_oracle(q, k, v, dout, lambda q, k, v: flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, 18, 38, causal=True, window_size=(6, -1)), oracle)


def test_packed_variants_match_unpacked():
    torch.manual_seed(2)
    qkv = _rand(2, 19, 3, 4, 16)
    kv = _rand(2, 23, 2, 2, 16)
    q = _rand(2, 19, 4, 16)
    dout = torch.randn(2, 19, 4, 16)

    out = flash_attn_qkvpacked_func(qkv, causal=True)
    (dqkv,) = _grads(out, (qkv,), dout)
    q_, k_, v_ = (t.detach().requires_grad_() for t in qkv.unbind(2))
    ref = flash_attn_func(q_, k_, v_, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dqkv, torch.stack(_grads(ref, (q_, k_, v_), dout), 2), rtol=0, atol=0)

    out = flash_attn_kvpacked_func(q, kv, window_size=(4, 4))
    dq, dkv = _grads(out, (q, kv), dout)
    k_, v_ = (t.detach().requires_grad_() for t in kv.unbind(2))
    ref = flash_attn_func(q, k_, v_, window_size=(4, 4))
    ref_dq, ref_dk, ref_dv = _grads(ref, (q, k_, v_), dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dq, ref_dq, rtol=0, atol=0)
    torch.testing.assert_close(dkv, torch.stack((ref_dk, ref_dv), 2), rtol=0, atol=0)


def test_varlen_packed_variants_match_unpacked():
    torch.manual_seed(3)
    cu_seqlens = torch.tensor([0, 7, 30], dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, 3, 12], dtype=torch.int32)
    qkv = _rand(30, 3, 2, 8)
    q, kv = _rand(30, 2, 8), _rand(12, 2, 1, 8)
    dout = torch.randn(30, 2, 8)

    out = flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, 23, causal=True)
    (dqkv,) = _grads(out, (qkv,), dout)
    q_, k_, v_ = (t.detach().requires_grad_() for t in qkv.unbind(1))
    ref = flash_attn_varlen_func(q_, k_, v_, cu_seqlens, cu_seqlens, 23, 23, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dqkv, torch.stack(_grads(ref, (q_, k_, v_), dout), 1), rtol=0, atol=0)

    out = flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, 23, 9)
    dq, dkv = _grads(out, (q, kv), dout)
    k_, v_ = (t.detach().requires_grad_() for t in kv.unbind(1))
    ref = flash_attn_varlen_func(q, k_, v_, cu_seqlens, cu_seqlens_k, 23, 9)
    ref_dq, ref_dk, ref_dv = _grads(ref, (q, k_, v_), dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dq, ref_dq, rtol=0, atol=0)
    torch.testing.assert_close(dkv, torch.stack((ref_dk, ref_dv), 1), rtol=0, atol=0)


def test_return_attn_probs():
    torch.manual_seed(4)
    q, k, v = _rand(2, 17, 2, 8), _rand(2, 130, 2, 8), _rand(2, 130, 2, 8)
    out, softmax_lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    ref_out, ref_lse = naive.attention(q, k, v, compute_dtype=torch.float64)
    assert probs is None
    assert softmax_lse.shape == (2, 2, 17) and softmax_lse.dtype == torch.float32
    torch.testing.assert_close(softmax_lse.double(), ref_lse, rtol=0, atol=1e-5)
    out, softmax_lse, probs = flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)
    assert probs.shape == (2, 2, 128, 256)
    # Dropped entries are negated: their magnitudes are the undropped probabilities.
    ref_probs = naive.attention(q, k, v, compute_dtype=torch.float64, return_probs=True)[2]
    torch.testing.assert_close(probs[:, :, :17, :130].abs().double(), ref_probs, rtol=0, atol=1e-5)
    assert (probs < 0).any() and (probs > 0).any()

    cu_seqlens = torch.tensor([0, 5, 17], dtype=torch.int32)
    out, softmax_lse, probs = flash_attn_varlen_func(q[0], k[0, :17], v[0, :17], cu_seqlens, cu_seqlens,
                                                     12, 12, return_attn_probs=True)
    assert softmax_lse.shape == (2, 17) and probs is None


def test_dropout_forward_and_backward_use_one_mask():
    """The op returns the philox seed/offset it drew; the oracle with that seed gives the same
    values and gradients, so the backward reused the forward's mask."""
    torch.manual_seed(5)
    q, k, v = _rand(2, 33, 4, 16), _rand(2, 40, 2, 16), _rand(2, 40, 2, 16)
    dout = torch.randn(2, 33, 4, 16)
    out, _, _, seed, offset = torch.ops.pyflash.fwd(q, k, v, 0.3, 0.25, True, -1, -1, 0.0, None, False, False)
    grads = _grads(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = naive.attention(q64, k64, v64, softmax_scale=0.25, causal=True, p_dropout=0.3,
                             seed_offset=(int(seed), int(offset)), compute_dtype=torch.float64)
    ref_grads = _grads(ref, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for ours, expected in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-4)
    # Each call draws a fresh seed: two forwards differ.
    again = flash_attn_func(q, k, v, dropout_p=0.3)
    assert not torch.equal(again, flash_attn_func(q, k, v, dropout_p=0.3))


def test_expanded_grad_and_non_contiguous_inputs():
    """out.sum().backward() hands the backward a stride-0 dout; q sliced from a wider tensor has a
    contiguous last dim but odd strides."""
    torch.manual_seed(6)
    wide = _rand(2, 17, 4, 48)
    q = wide[..., 8:24]
    k, v = _rand(2, 9, 4, 16), _rand(2, 9, 4, 16)
    flash_attn_func(q, k, v, causal=True).sum().backward()
    ref = naive.attention(q.detach().double(), k.detach().double(), v.detach().double(), causal=True)[0]
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True).double(), ref, rtol=0, atol=1e-5)
    assert wide.grad[..., :8].abs().max() == 0 and wide.grad[..., 8:24].abs().max() > 0
    assert k.grad.shape == k.shape


def test_invalid_input_reaches_the_user_as_a_clear_error():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="num_heads"):
        flash_attn_func(q, k, k)


# --------------------------------------------------------------------------------------------
# SDPA drop-in


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 17), (5, 40), (40, 17), (100, 33), (33, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(seqlen_q, seqlen_k, is_causal):
    torch.manual_seed(7)
    query = _rand(2, 4, seqlen_q, 16)
    key, value = _rand(2, 4, seqlen_k, 16), _rand(2, 4, seqlen_k, 16)
    dout = torch.randn(2, 4, seqlen_q, 16)
    ours = scaled_dot_product_attention(query, key, value, is_causal=is_causal)
    grads = _grads(ours, (query, key, value), dout)
    ref = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
    ref_grads = _grads(ref, (query, key, value), dout)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    for mine, expected in zip(grads, ref_grads):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)


def test_sdpa_gqa_scale_and_odd_head_dim():
    torch.manual_seed(8)
    query = _rand(1, 6, 21, 12)
    key, value = _rand(1, 2, 30, 12), _rand(1, 2, 30, 12)
    dout = torch.randn(1, 6, 21, 12)
    ours = scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.2, enable_gqa=True)
    ref = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    for mine, expected in zip(_grads(ours, (query, key, value), dout), _grads(ref, (query, key, value), dout)):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="enable_gqa"):
        scaled_dot_product_attention(query, key, value)


def test_sdpa_reads_through_views():
    query, key, value = (t.transpose(1, 2) for t in torch.randn(3, 2, 5, 4, 16).unbind(0))
    out = scaled_dot_product_attention(query, key, value)
    assert out.shape == query.shape
    assert out.transpose(1, 2).is_contiguous()  # computed in (b, s, h, d), handed back as a view


def test_sdpa_rejects_attn_mask():
    query = torch.randn(1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="attn_mask"):
        scaled_dot_product_attention(query, query, query, attn_mask=mask)


# --------------------------------------------------------------------------------------------
# custom ops and torch.compile


def test_opcheck_custom_ops():
    torch.manual_seed(9)
    q, k, v = _rand(1, 9, 2, 8), _rand(1, 12, 1, 8), _rand(1, 12, 1, 8)
    torch.library.opcheck(torch.ops.pyflash.fwd.default, (q, k, v, 0.0, 0.3, True, -1, -1, 0.0, None, False, False))
    cu_seqlens_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    torch.library.opcheck(torch.ops.pyflash.varlen_fwd.default,
                          (q[0], k[0], v[0], cu_seqlens_q, cu_seqlens_k, 5, 7, 0.0, 0.3, True, 3, -1, 0.0,
                           None, False, False, None))


class _TinyAttentionModel(torch.nn.Module):
    """One attention layer per interface: dense, packed varlen, and the SDPA drop-in."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens, max_seqlen):
        batch, seqlen, dim = x.shape
        qkv = self.qkv(x).view(batch, seqlen, 3, self.heads, dim // self.heads)
        y = flash_attn_qkvpacked_func(qkv, causal=True)
        y = y + flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu_seqlens, max_seqlen,
                                                 window_size=(3, 0)).view_as(y)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = y + scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(batch, seqlen, dim))


def test_compile_fullgraph_no_graph_break():
    torch.manual_seed(10)
    model = _TinyAttentionModel()
    x = torch.randn(2, 11, 32)
    cu_seqlens = torch.tensor([0, 11, 22], dtype=torch.int32)

    explanation = torch._dynamo.explain(model)(x, cu_seqlens, 11)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    expected = model(x, cu_seqlens, 11)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    got = compiled(x, cu_seqlens, 11)
    got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for mine, ref in zip(got_grads, expected_grads):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)


def test_imports_match_flash_attn_layout():
    """`from flash_attn import X` and `from flash_attn.flash_attn_interface import X` both map over."""
    import pyflash
    from pyflash import flash_attn_interface

    for name in interface.__all__:
        assert getattr(pyflash, name) is getattr(interface, name)
    for name in flash_attn_interface.__all__:
        assert callable(getattr(flash_attn_interface, name))
    assert flash_attn_interface.flash_attn_varlen_func is interface.flash_attn_varlen_func
