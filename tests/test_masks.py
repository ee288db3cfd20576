"""The visibility rule and ALiBi bias are written twice (torch for the reference path, Triton for the
kernels); these tests hold the two copies together, and the torch copy to SPEC's formulas."""
import pytest
import torch
import triton
import triton.language as tl

from pyflash import masks
from pyflash.kernels import common

ROWS, COLS = 32, 64


@triton.jit
def _rules_kernel(mask_ptr, bias_ptr, slope, seqlen_q, seqlen_k, window_left, window_right,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, COLS)[None, :]
    mask = common.visible_mask(rows, cols, seqlen_q, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT, True)
    tl.store(mask_ptr + rows * COLS + cols, mask.to(tl.int8))
    tl.store(bias_ptr + rows * COLS + cols, common.alibi_bias(slope, rows, cols, seqlen_q, seqlen_k))


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(32, 64), (17, 40), (32, 5), (1, 64)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (3, 0), (4, 7), (-1, 2), (0, 0)])
def test_kernel_rules_match_torch_rules(seqlen_q, seqlen_k, window):
    left, right = window
    mask = torch.empty(ROWS, COLS, dtype=torch.int8)
    bias = torch.empty(ROWS, COLS, dtype=torch.float32)
    _rules_kernel[(1,)](mask, bias, 0.25, seqlen_q, seqlen_k, left, right, left >= 0, right >= 0, ROWS, COLS)
    rows, cols = torch.arange(ROWS).view(-1, 1), torch.arange(COLS).view(1, -1)
    expected = masks.visible(rows, cols, seqlen_q, seqlen_k, left, right)
    assert torch.equal(mask.bool(), expected.expand(ROWS, COLS))
    assert torch.equal(bias, masks.alibi_bias(torch.tensor(0.25), rows, cols, seqlen_q, seqlen_k))


def test_torch_rule_follows_spec_formula():
    seqlen_q, seqlen_k, left, right = 5, 9, 2, 1
    rows, cols = torch.arange(seqlen_q).view(-1, 1), torch.arange(12).view(1, -1)
    got = masks.visible(rows, cols, seqlen_q, seqlen_k, left, right)
    for i in range(seqlen_q):
        for j in range(12):
            diag = i + seqlen_k - seqlen_q
            assert bool(got[i, j]) == (j < seqlen_k and diag - left <= j <= diag + right)
    causal = masks.visible(rows, cols, seqlen_q, seqlen_k, -1, 0)
    assert causal.sum(1).tolist() == [5, 6, 7, 8, 9]  # bottom-right aligned


def test_softcap_bounds_scores():
    scores = torch.linspace(-100, 100, 11)
    capped = masks.apply_softcap(scores, 5.0)
    assert capped.abs().max() <= 5.0 and torch.equal(masks.apply_softcap(scores, 0.0), scores)
