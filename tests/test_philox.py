"""pyflash.philox draws exactly what Triton's tl.philox / tl.rand draw, bit for bit.

The kernels run under TRITON_INTERPRET=1 (set by conftest.py when there is no GPU): a few launches
of a few thousand elements each.
"""
import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from pyflash import philox
from pyflash.kernels import common

SEEDS = [0, 1, 0x7FFFFFFF, 0x9E3779B97F4A7C15 & (2**63 - 1), 2**32 + 7, 2**62 + 12345, 2**63 - 1]
BLOCK = 1024


@triton.jit
def _rand_kernel(offsets_ptr, rand_ptr, n, seed, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n
    offsets = tl.load(offsets_ptr + idx, mask=in_range)
    tl.store(rand_ptr + idx, tl.rand(seed, offsets), mask=in_range)


@triton.jit
def _philox_kernel(counters_ptr, words_ptr, n, seed, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n
    c0 = tl.load(counters_ptr + 0 * n + idx, mask=in_range)
    c1 = tl.load(counters_ptr + 1 * n + idx, mask=in_range)
    c2 = tl.load(counters_ptr + 2 * n + idx, mask=in_range)
    c3 = tl.load(counters_ptr + 3 * n + idx, mask=in_range)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(words_ptr + 0 * n + idx, r0.to(tl.int32, bitcast=True), mask=in_range)
    tl.store(words_ptr + 1 * n + idx, r1.to(tl.int32, bitcast=True), mask=in_range)
    tl.store(words_ptr + 2 * n + idx, r2.to(tl.int32, bitcast=True), mask=in_range)
    tl.store(words_ptr + 3 * n + idx, r3.to(tl.int32, bitcast=True), mask=in_range)
    tl.store(words_ptr + 4 * n + idx, uint_to_uniform_float(r0).to(tl.int32, bitcast=True), mask=in_range)


@triton.jit
def _dropout_kernel(uniform_ptr, seed, offset, bh, seqlen_q, seqlen_k,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    uniform = common.dropout_uniform(seed, offset, bh, rows, cols)
    in_range = (rows < seqlen_q) & (cols < seqlen_k)
    tl.store(uniform_ptr + rows * seqlen_k + cols, uniform, mask=in_range)


def _as_uint32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & 0xFFFFFFFF


def test_rand_matches_tl_rand():
    gen = torch.Generator().manual_seed(0)
    # Small offsets, random ones over the whole int32 range, and the edges.
    offsets = torch.cat([
        torch.arange(1500, dtype=torch.int32),
        torch.randint(-2**31, 2**31 - 1, (1500,), generator=gen, dtype=torch.int32),
        torch.tensor([2**31 - 1, -2**31, -1, 2**31 - 2], dtype=torch.int32),
    ])
    n = offsets.numel()
    for seed in SEEDS:
        got = torch.empty(n, dtype=torch.float32)
        _rand_kernel[(triton.cdiv(n, BLOCK),)](offsets, got, n, seed, BLOCK=BLOCK)
        ours = philox.rand(seed, _as_uint32(offsets))
        assert ours.dtype == torch.float32
        assert torch.equal(ours.view(torch.int32), got.view(torch.int32)), f"seed {seed}"
        assert bool(((ours >= 0) & (ours < 1)).all())


def test_philox_words_match_tl_philox():
    gen = torch.Generator().manual_seed(1)
    n = 3000
    counters = torch.randint(-2**31, 2**31 - 1, (4, n), generator=gen, dtype=torch.int32)
    counters[:, :8] = torch.tensor([0, 1, 2**31 - 1, -1, -2**31, 5, 6, 7], dtype=torch.int32)
    for seed in [3, 2**32 + 7, 2**62 + 12345]:
        words = torch.empty(5, n, dtype=torch.int32)
        _philox_kernel[(triton.cdiv(n, BLOCK),)](counters, words, n, seed, BLOCK=BLOCK)
        ours = philox.philox4x32(seed, *[_as_uint32(c) for c in counters])
        for w in range(4):
            assert torch.equal(ours[w], _as_uint32(words[w])), f"seed {seed} word {w}"
        uniform = philox.uint_to_uniform(ours[0])
        assert torch.equal(uniform.view(torch.int32), words[4]), f"seed {seed} uniform"


def test_dropout_layout_matches_kernel_helper():
    """The reference path's mask layout (bh, i, j, offset) is the kernels' layout."""
    seqlen_q, seqlen_k = 37, 61
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    for seed, offset, bh in [(2**40 + 99, 12, 5), (7, 2**31 - 5, 0), (2**62 + 1, 123456, 1000)]:
        got = torch.empty(seqlen_q, seqlen_k, dtype=torch.float32)
        _dropout_kernel[(1,)](got, seed, offset, bh, seqlen_q, seqlen_k, BLOCK_M=64, BLOCK_N=64)
        ours = philox.dropout_uniform(seed, offset, bh, i, j)
        assert torch.equal(ours.view(torch.int32), got.view(torch.int32))
        # and it is Philox on counter (j, i, bh, offset), as DEVELOPERS.md fixes it
        direct = philox.uint_to_uniform(philox.philox4x32(seed, j, i, bh, offset)[0])
        assert torch.equal(ours, direct)
        keep = philox.dropout_keep(seed, offset, 0.3, bh, i, j)
        assert torch.equal(keep, ours >= torch.tensor(0.3, dtype=torch.float32))


def test_known_answer():
    """Philox4x32-10 known-answer vectors (Random123 kat_vectors), independent of Triton."""
    # counter (0,0,0,0), key (0,0)
    words = philox.philox4x32(0, 0, 0, 0, 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # counter all ones, key all ones
    ones = 0xFFFFFFFF
    words = philox.philox4x32((ones << 32) | ones, ones, ones, ones, ones)
    assert [int(w) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    # counter pi digits, key (0xa4093822, 0x299f31d0)
    words = philox.philox4x32((0x299F31D0 << 32) | 0xA4093822,
                              0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_next_seed_offset_from_generator_advances():
    gen = torch.Generator().manual_seed(1234)
    first = philox.next_seed_offset(gen, torch.device("cpu"))
    second = philox.next_seed_offset(gen, torch.device("cpu"))
    assert first != second
    replay = torch.Generator().manual_seed(1234)
    assert philox.next_seed_offset(replay, torch.device("cpu")) == first
    assert philox.next_seed_offset(replay, torch.device("cpu")) == second
    for seed, offset in (first, second):
        assert isinstance(seed, int) and isinstance(offset, int)
        assert 0 <= seed < 2**63
        assert 0 <= offset < 2**31


def test_next_seed_offset_default_generator_advances():
    state = torch.get_rng_state()
    try:
        torch.manual_seed(99)
        first = philox.next_seed_offset(None, torch.device("cpu"))
        second = philox.next_seed_offset(None, torch.device("cpu"))
        assert first != second
        torch.manual_seed(99)
        assert philox.next_seed_offset(None, torch.device("cpu")) == first
        # a private generator does not touch the default one
        torch.manual_seed(99)
        philox.next_seed_offset(torch.Generator().manual_seed(5), torch.device("cpu"))
        assert philox.next_seed_offset(None, torch.device("cpu")) == first
    finally:
        torch.set_rng_state(state)
