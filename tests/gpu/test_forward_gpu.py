"""The Triton forward at real sizes on the GPU (run through scripts/gpu_check.py on the device).

Against a materialised float32 reference with the flash_attn error rule (at most twice the error of
the same reference run in the input dtype, plus atol), against PyTorch's own FlashAttention-2
(``aten._flash_attention_forward``, the seed) where it has the feature, with dropout masks compared
bit for bit with pyflash.philox. The Gluon kernel (where it handles a case) and the Triton kernel over both load paths (TMA
descriptors on Hopper, pointers) are run.
"""
import math

import pytest
import torch

from pyflash.kernels.forward import forward
from pyflash.params import AttentionParams, Seqlens

from materialised import keep_mask, reference

pytestmark = pytest.mark.gpu

ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-5}


def assert_rule(ours, ref, lowp, name, dtype):
    assert not ours.isnan().any(), f"{name}: NaN in {int(ours.isnan().sum())} elements"
    inf = ref.isinf()
    assert torch.equal(ours.isinf(), inf) and torch.equal(ours[inf], ref[inf]), f"{name}: infinities differ"
    if inf.all():
        return
    err = (ours.float() - ref)[~inf].abs().max().item()
    bound = 2 * (lowp.float() - ref)[~inf].abs().max().item() + ATOL[dtype] * (1 + ref[~inf].abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def make_params(head_dim, batch, num_heads, causal=False, window=(-1, -1), softcap=0.0, alibi=False,
                dropout_p=0.0):
    left, right = window
    slopes = None
    if alibi:
        slopes = torch.rand(batch, num_heads, device="cuda") * 0.1
    return AttentionParams(head_dim ** -0.5, left, 0 if causal else right, softcap, slopes, dropout_p,
                           2**40 + 99, 1234 if dropout_p > 0 else 0)


def run_forward(q, k, v, params, seqlens, return_softmax=False, use_tma=None, kernel=None):
    """out, lse (and p) from the kernel, outputs poisoned first so a missed element shows."""
    out = torch.full_like(q, math.nan)
    lse_shape = (q.shape[1], q.shape[0]) if seqlens.is_varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, math.nan, device="cuda")
    p = None
    if return_softmax:
        rounded = [(n + 127) // 128 * 128 for n in (seqlens.max_seqlen_q, seqlens.max_seqlen_k)]
        p = torch.zeros(seqlens.batch_size, q.shape[-2], *rounded, dtype=q.dtype, device="cuda")
    forward(q, k, v, out, lse, p, params, seqlens, use_tma=use_tma, kernel=kernel)
    return out, lse, p


def make_inputs(shapes, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in shapes]


# (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, features)
DENSE = [
    (2, 4096, 4096, 8, 8, 128, torch.bfloat16, {}),
    (1, 8192, 8192, 4, 1, 128, torch.float16, dict(causal=True)),
    (2, 1000, 3000, 4, 2, 64, torch.bfloat16, dict(causal=True)),
    (2, 3000, 1000, 4, 4, 64, torch.float16, dict(causal=True)),  # rows that see no key
    (1, 2048, 2048, 4, 4, 96, torch.float16, dict(window=(256, 128))),
    (2, 1024, 1024, 8, 2, 256, torch.bfloat16, dict(causal=True)),
    (1, 2000, 2000, 4, 4, 256, torch.float16, dict(window=(-1, 300), softcap=20.0)),
    (1, 3000, 2500, 4, 4, 128, torch.bfloat16, dict(softcap=30.0, alibi=True)),
    (1, 4096, 4096, 4, 2, 128, torch.bfloat16, dict(causal=True, window=(1024, 0), alibi=True)),
    (2, 1024, 1024, 4, 4, 64, torch.float16, dict(dropout_p=0.1)),
    (1, 1500, 1700, 4, 2, 128, torch.bfloat16, dict(causal=True, softcap=10.0, alibi=True, dropout_p=0.25)),
    (1, 1024, 1024, 4, 4, 64, torch.float32, dict(causal=True)),
    (1, 777, 1024, 2, 2, 40, torch.bfloat16, dict(window=(100, 100))),
]


# default: the Gluon kernel where it handles the case; triton: the Triton kernel (TMA loads on Hopper);
# pointers: the Triton kernel over pointer loads.
PATHS = {"default": (None, None), "triton": (None, "triton"), "pointers": (False, "triton")}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", DENSE, ids=lambda c: f"{c[:6]}-{str(c[6])[6:]}-{c[7]}".replace(" ", ""))
def test_dense(case, path):
    use_tma, kernel = PATHS[path]
    batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, dtype, features = case
    q, k, v = make_inputs([(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_k, head_dim),
                           (batch, seqlen_k, heads_k, head_dim)], dtype, seed=seqlen_q + head_dim)
    params = make_params(head_dim, batch, heads, **features)
    dropout = params.dropout_p > 0
    out, lse, p = run_forward(q, k, v, params, Seqlens(batch, seqlen_q, seqlen_k), dropout, use_tma, kernel)
    ref_out, ref_lse, ref_probs = reference(q, k, v, params)
    low_out, _, low_probs = reference(q, k, v, params, compute_dtype=dtype)
    assert_rule(out, ref_out, low_out, "out", dtype)
    # lse is fp32 on every side: the input-dtype reference says nothing about its error.
    assert_rule(lse, ref_lse, ref_lse + 1e-4 * (1 + ref_lse.abs()), "lse", dtype)
    if dropout:
        assert_rule(p[:, :, :seqlen_q, :seqlen_k].abs(), ref_probs, low_probs, "p", dtype)
        keep = keep_mask(params, batch, heads, seqlen_q, seqlen_k).expand_as(ref_probs)
        nonzero = (p[:, :, :seqlen_q, :seqlen_k] != 0) & (ref_probs > 0)
        assert torch.equal((p[:, :, :seqlen_q, :seqlen_k] > 0)[nonzero], keep[nonzero])


def test_varlen_ragged():
    """Ragged lengths (some empty, some longer than a block), GQA, causal, seqused_k (NaN in the
    unused keys), dropout."""
    gen = torch.Generator().manual_seed(7)
    lens_q = [int(x) for x in torch.randint(0, 2000, (9,), generator=gen)] + [0, 1, 4096]
    lens_k = [n + int(x) for n, x in zip(lens_q, torch.randint(0, 300, (12,), generator=gen))]
    used_k = [max(n - 50, 0) for n in lens_k]
    heads, heads_k, head_dim, dtype = 8, 2, 128, torch.bfloat16
    cu_q = torch.tensor([0] + lens_q, device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = make_inputs([(sum(lens_q), heads, head_dim), (sum(lens_k), heads_k, head_dim),
                           (sum(lens_k), heads_k, head_dim)], dtype, seed=8)
    used = torch.tensor(used_k, dtype=torch.int32, device="cuda")
    # Keys past seqused_k are never read for a result: NaN there must not leak (TMA reads them).
    unused = torch.zeros(sum(lens_k), dtype=torch.bool, device="cuda")
    for start, n_used, n_k in zip(cu_k[:-1].tolist(), used_k, lens_k):
        unused[start + n_used:start + n_k] = True
    k_nan, v_nan = k.masked_fill(unused[:, None, None], math.nan), v.masked_fill(unused[:, None, None], math.nan)
    for features, seqused_k in ((dict(causal=True), None), (dict(causal=True, dropout_p=0.15, alibi=True), used),
                                (dict(window=(300, 64), softcap=15.0), used)):
        params = make_params(head_dim, len(lens_q), heads, **features)
        seqlens = Seqlens(len(lens_q), max(lens_q), max(lens_k), cu_q, cu_k, seqused_k)
        for use_tma in (None, False):
            k_in, v_in = (k_nan, v_nan) if seqused_k is not None else (k, v)
            out, lse, _ = run_forward(q, k_in, v_in, params, seqlens, use_tma=use_tma)
            q_start = k_start = 0
            for s, (n_q, n_k) in enumerate(zip(lens_q, lens_k)):
                n_used = used_k[s] if seqused_k is not None else n_k
                rows, keys = slice(q_start, q_start + n_q), slice(k_start, k_start + n_used)
                q_start, k_start = q_start + n_q, k_start + n_k
                if n_q == 0:
                    continue
                ref = reference(q[None, rows], k[None, keys], v[None, keys], params, batch_offset=s)
                low = reference(q[None, rows], k[None, keys], v[None, keys], params, batch_offset=s, compute_dtype=dtype)
                assert_rule(out[rows], ref[0][0], low[0][0], f"out of sequence {s}", dtype)
                assert_rule(lse[:, rows], ref[1][0], ref[1][0] + 1e-4 * (1 + ref[1][0].abs()), f"lse of {s}", dtype)


def test_packed_qkv_strides():
    """q/k/v as views of one (b, s, 3, h, d) tensor: TMA over the strided view, same answer."""
    qkv, = make_inputs([(2, 2048, 3, 8, 128)], torch.bfloat16, seed=9)
    q, k, v = qkv.unbind(2)
    params = make_params(128, 2, 8, causal=True)
    out, lse, _ = run_forward(q, k, v, params, Seqlens(2, 2048, 2048))
    ref_out, _, _ = reference(q, k, v, params)
    low_out, _, _ = reference(q, k, v, params, compute_dtype=torch.bfloat16)
    assert_rule(out, ref_out, low_out, "out", torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (512, 256)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_against_torch_flash(causal, window, head_dim):
    """out and lse next to the seed's own kernel: our error to the float32 reference is at most twice
    its error (plus atol)."""
    dtype, batch, seqlen, heads = torch.bfloat16, 2, 4096, 4
    q, k, v = make_inputs([(batch, seqlen, heads, head_dim)] * 3, dtype, seed=head_dim)
    left, right = (window[0], 0) if causal else window
    params = make_params(head_dim, batch, heads, window=(left, right))
    theirs, their_lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, seqlen, seqlen, 0.0, causal, False, scale=params.softmax_scale,
        window_size_left=left if left >= 0 else None, window_size_right=right if right >= 0 else None)
    out, lse, _ = run_forward(q, k, v, params, Seqlens(batch, seqlen, seqlen))
    ref_out, ref_lse, _ = reference(q, k, v, params)
    assert_rule(out, ref_out, theirs, "out", dtype)
    assert_rule(lse, ref_lse, their_lse[..., :seqlen], "lse", dtype)
