"""Rules shared by the Triton kernels, mirroring ``pyflash.masks`` and ``pyflash.philox``."""
import os

import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

# Under the interpreter tl.dot on bf16 operands returns garbage: kernels upcast when this is set.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def visible_mask(rows, cols, seqlen_q, seqlen_k, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, CHECK_SEQLEN_K: tl.constexpr):
    """rows (M, 1), cols (1, N), sequence-local: True where key j is visible to query i."""
    diag = rows + seqlen_k - seqlen_q
    mask = (rows >= 0) & (cols >= 0)  # a full-shaped all-true start
    if CHECK_SEQLEN_K:
        mask = mask & (cols < seqlen_k)
    if HAS_LEFT:
        mask = mask & (cols >= diag - window_left)
    if HAS_RIGHT:
        mask = mask & (cols <= diag + window_right)
    return mask


@triton.jit
def alibi_bias(slope, rows, cols, seqlen_q, seqlen_k):
    dist = rows + seqlen_k - seqlen_q - cols
    return -slope * tl.abs(dist).to(tl.float32)


@triton.jit
def dropout_uniform(seed, offset, bh, rows, cols):
    """Uniform [0, 1) of elements (bh, rows, cols): Philox counter (j, i, bh, offset), key = seed."""
    zero = (rows * 0 + cols * 0).to(tl.int32)
    c0 = (cols + zero).to(tl.int32)
    c1 = (rows + zero).to(tl.int32)
    c2 = (zero + bh).to(tl.int32)
    c3 = (zero + offset).to(tl.int32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return uint_to_uniform_float(r0)


@triton.jit
def dropout_keep(seed, offset, p_dropout, bh, rows, cols):
    return dropout_uniform(seed, offset, bh, rows, cols) >= p_dropout
