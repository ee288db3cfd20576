"""The flash_attn-compatible interface on the GPU (Triton backend), run by scripts/gpu_check.py.

Values and gradients against the float64 oracle (tests/naive.py, on the CPU) with flash_attn's error
rule, packed/varlen variants, dropout through the custom ops, the SDPA drop-in against torch's SDPA,
and torch.compile(fullgraph=True) with the default (inductor) backend.
"""
import pytest
import torch
import torch.nn.functional as F

import naive
import pyflash

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]


def _inputs(*shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", dtype=dtype, generator=gen).requires_grad_() for s in shapes]


def _assert_rule(ours, ref64, lowp, atol):
    """flash_attn's rule: |ours - ref64| <= 2 |lowp - ref64| + atol (max abs); NaN never passes."""
    err = (ours.detach().cpu().double() - ref64).abs().max().item()
    bound = 2 * (lowp.detach().cpu().double() - ref64).abs().max().item() + atol
    assert err <= bound, f"max error {err} > bound {bound}"


def _oracle(oracle_fn, inputs, dout, dtype):
    """The oracle on the CPU in ``dtype``: float64 is the reference, the input dtype the baseline."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in inputs]
    out = oracle_fn(*leaves, dtype)
    return out, torch.autograd.grad(out, leaves, dout.cpu().to(dtype))


def _check(ours_fn, oracle_fn, inputs, dout, atol=1e-3):
    out = ours_fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    ref64, grads64 = _oracle(oracle_fn, inputs, dout, torch.float64)
    lowp, grads_lowp = _oracle(oracle_fn, inputs, dout, inputs[0].dtype)
    _assert_rule(out, ref64, lowp, atol)
    for ours, ref, baseline in zip(grads, grads64, grads_lowp):
        assert ours.shape == ref.shape
        _assert_rule(ours, ref, baseline, atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim,options", [
    (257, 257, 64, dict(causal=True)),
    (100, 300, 128, dict(causal=True, window_size=(64, 0))),
    (300, 128, 72, dict(softcap=30.0)),
    (128, 128, 20, dict(causal=True)),  # head dim padded by the API
])
def test_flash_attn_func(dtype, seqlen_q, seqlen_k, head_dim, options):
    q, k, v = _inputs((2, seqlen_q, 8, head_dim), (2, seqlen_k, 2, head_dim), (2, seqlen_k, 2, head_dim),
                      dtype=dtype)
    dout = torch.randn_like(q)
    left, right = options.get("window_size", (-1, -1))

    def oracle(q, k, v, dtype):
        return naive.attention(q, k, v, causal=options.get("causal", False), window_left=left,
                               window_right=right, softcap=options.get("softcap", 0.0),
                               compute_dtype=dtype)[0]

    _check(lambda q, k, v: pyflash.flash_attn_func(q, k, v, **options), oracle, [q, k, v], dout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attn_varlen_func(dtype):
    cu_seqlens_q = torch.tensor([0, 100, 101, 400], dtype=torch.int32, device="cuda")
    cu_seqlens_k = torch.tensor([0, 150, 300, 400], dtype=torch.int32, device="cuda")
    q, k, v = _inputs((400, 8, 64), (400, 4, 64), (400, 4, 64), dtype=dtype, seed=1)
    dout = torch.randn_like(q)
    alibi = torch.rand(8, device="cuda") * 0.1

    def oracle(q, k, v, dtype):
        return naive.attention_varlen(q, k, v, cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), max_seqlen_k=150,
                                      causal=True, alibi_slopes=alibi.cpu(), compute_dtype=dtype)[0]

    _check(lambda q, k, v: pyflash.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, 299, 150,
                                                          causal=True, alibi_slopes=alibi),
           oracle, [q, k, v], dout)


def test_packed_variants_match_unpacked():
    (qkv,) = _inputs((2, 200, 3, 4, 64), dtype=torch.bfloat16, seed=2)
    out = pyflash.flash_attn_qkvpacked_func(qkv, causal=True)
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    ref = pyflash.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, ref)
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), dout), 2))

    cu_seqlens = torch.tensor([0, 150, 400], dtype=torch.int32, device="cuda")
    flat = qkv.detach().flatten(0, 1).requires_grad_()
    out = pyflash.flash_attn_varlen_qkvpacked_func(flat, cu_seqlens, 250, causal=True)
    (dflat,) = torch.autograd.grad(out, flat, dout.flatten(0, 1))
    q, k, v = (t.detach().requires_grad_() for t in flat.unbind(1))
    ref = pyflash.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, 250, 250, causal=True)
    assert torch.equal(out, ref)
    assert torch.equal(dflat, torch.stack(torch.autograd.grad(ref, (q, k, v), dout.flatten(0, 1)), 1))


def test_dropout_backward_reuses_the_forward_mask():
    q, k, v = _inputs((2, 130, 4, 64), (2, 190, 4, 64), (2, 190, 4, 64), dtype=torch.float16, seed=3)
    out, _, _, seed, offset = torch.ops.pyflash.fwd(q, k, v, 0.2, 0.125, True, -1, -1, 0.0, None, False, False)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, _ = naive.attention(*leaves, softmax_scale=0.125, causal=True, p_dropout=0.2,
                             seed_offset=(int(seed), int(offset)), compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, leaves, dout.cpu().double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-2)
    for ours, expected in zip(grads, ref_grads):
        torch.testing.assert_close(ours.cpu().double(), expected, rtol=0, atol=2e-2)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(256, 256), (64, 300), (300, 100)])
def test_sdpa_matches_torch(seqlen_q, seqlen_k):
    query, key, value = _inputs((2, 8, seqlen_q, 64), (2, 2, seqlen_k, 64), (2, 2, seqlen_k, 64),
                                dtype=torch.float16, seed=4)
    dout = torch.randn_like(query)
    ours = pyflash.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    fp32 = [t.detach().float().requires_grad_() for t in (query, key, value)]
    ref = F.scaled_dot_product_attention(*fp32, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=5e-3)
    for mine, expected in zip(torch.autograd.grad(ours, (query, key, value), dout),
                              torch.autograd.grad(ref, fp32, dout.float())):
        torch.testing.assert_close(mine.float(), expected, rtol=0, atol=2e-2)


class _Attention(torch.nn.Module):
    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, seqlen, dim = x.shape
        qkv = self.qkv(x).view(batch, seqlen, 3, self.heads, dim // self.heads)
        y = pyflash.flash_attn_qkvpacked_func(qkv, causal=True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = y + pyflash.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        return self.proj(y.reshape(batch, seqlen, dim))


def test_compile_fullgraph_inductor():
    torch.manual_seed(5)
    model = _Attention().cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), list(model.parameters()))
    got = compiled(x)
    got_grads = torch.autograd.grad(got.float().square().sum(), list(model.parameters()))
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    for mine, ref in zip(got_grads, expected_grads):
        torch.testing.assert_close(mine, ref, rtol=5e-2, atol=5e-2)
