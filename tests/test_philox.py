"""pyflash.philox draws exactly what Triton's tl.philox / tl.rand draw, bit for bit.

The kernels run under TRITON_INTERPRET=1 (set by conftest.py when there is no GPU): a few launches
of a few thousand elements each.
"""
import pytest
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


@triton.jit
def _dropout_tile_kernel(uniform_ptr, keep_ptr, keep_t_ptr, seed, offset, bh, p_dropout, row_start, col_start,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program n draws the tile rows row_start + arange(BLOCK_M) x keys start_n + arange(BLOCK_N),
    start_n = col_start + n * BLOCK_N, through the tile helpers (also transposed, as the dK/dV kernel
    does) and the generic ones; outputs are (BLOCK_M, programs * BLOCK_N) row-major, the
    transposed keep mask (programs * BLOCK_N, BLOCK_M)."""
    pid = tl.program_id(0)
    width = tl.num_programs(0) * BLOCK_N
    start_n = col_start + pid * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_M)
    local_m = tl.arange(0, BLOCK_M)[:, None]
    local_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    at = local_m * width + local_n
    uniform = common.dropout_uniform_tile(seed, offset, bh, rows[:, None], start_n, BLOCK_N)
    keep = common.dropout_keep_tile(seed, offset, p_dropout, bh, rows[:, None], start_n, BLOCK_N)
    keep_t = tl.trans(common.dropout_keep_tile(seed, offset, p_dropout, bh, tl.trans(rows[None, :]),
                                               start_n, BLOCK_N))
    tl.store(uniform_ptr + 0 * BLOCK_M * width + at, uniform)
    tl.store(keep_ptr + 0 * BLOCK_M * width + at, keep.to(tl.int8))
    at_t = (pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    tl.store(keep_t_ptr + at_t, keep_t.to(tl.int8))
    cols = start_n + tl.arange(0, BLOCK_N)
    generic = common.dropout_uniform(seed, offset, bh, rows[:, None], cols[None, :])
    generic_keep = common.dropout_keep(seed, offset, p_dropout, bh, rows[:, None], cols[None, :])
    tl.store(uniform_ptr + 1 * BLOCK_M * width + at, generic)
    tl.store(keep_ptr + 1 * BLOCK_M * width + at, generic_keep.to(tl.int8))


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
    """The reference path's mask layout (bh, i, j, offset) is the kernels' layout (generic helper)."""
    seqlen_q, seqlen_k = 37, 61
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    for seed, offset, bh in [(2**40 + 99, 12, 5), (7, 2**31 - 5, 0), (2**62 + 1, 123456, 1000)]:
        got = torch.empty(seqlen_q, seqlen_k, dtype=torch.float32)
        _dropout_kernel[(1,)](got, seed, offset, bh, seqlen_q, seqlen_k, BLOCK_M=64, BLOCK_N=64)
        ours = philox.dropout_uniform(seed, offset, bh, i, j)
        assert torch.equal(ours.view(torch.int32), got.view(torch.int32))
        # and it is Philox on counter (j // 8, i, bh, offset), output word (j % 8) // 2, its low 16 bits for
        # even j and its high 16 for odd, over 2**16, as DEVELOPERS.md fixes it
        words = philox.philox4x32(seed, j // 8, i, bh, offset)
        for w in range(4):
            for half in range(2):
                direct = ((words[w] >> (16 * half)) & 0xFFFF).to(torch.float32) / 65536
                column = 2 * w + half
                assert torch.equal(ours[:, column::8], direct[:, column::8]), f"word {w} half {half}"
        for p_dropout in (0.3, 0.1, 1 - 2**-17, 2**-17, 0.5):
            keep = philox.dropout_keep(seed, offset, p_dropout, bh, i, j)
            assert torch.equal(keep, ours >= torch.tensor(p_dropout, dtype=torch.float32)), p_dropout


@triton.jit
def _threshold_kernel(p_ptr, out_ptr, n, BLOCK: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + idx, mask=idx < n)
    tl.store(out_ptr + idx, common.dropout_threshold(p), mask=idx < n)


def test_dropout_threshold_is_the_fp32_comparison():
    """16-bit values v are kept iff v >= dropout_threshold(p), which is v / 2**16 >= p in fp32: the kernels' and
    pyflash.philox's thresholds agree on probabilities at, just above and just below multiples of 2**-16."""
    gen = torch.Generator().manual_seed(3)
    grid = torch.tensor([1, 2, 6553, 6554, 19660, 19661, 32768, 65535], dtype=torch.float32) / 65536
    above, below = torch.nextafter(grid, torch.ones_like(grid)), torch.nextafter(grid, torch.zeros_like(grid))
    probs = torch.cat([grid, above, below, torch.rand(200, generator=gen),
                       torch.tensor([0.1, 0.3, 0.5, 0.9, 1e-9, 1 - 1e-7])])
    probs = probs.to(torch.float32)
    got = torch.empty(probs.numel(), dtype=torch.int32)
    _threshold_kernel[(1,)](probs, got, probs.numel(), BLOCK=512)
    for p, threshold in zip(probs.tolist(), got.tolist()):
        assert threshold == philox.dropout_threshold(p), p
        p32 = torch.tensor(p, dtype=torch.float32)
        assert torch.tensor(threshold / 65536, dtype=torch.float32) >= p32, p
        assert torch.tensor((threshold - 1) / 65536, dtype=torch.float32) < p32, p


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (64, 32), (32, 128), (128, 64)])
def test_dropout_tile_helper_matches_layout(block_m, block_n):
    """dropout_uniform_tile / dropout_keep_tile (one Philox call per 8 keys, the words' halves interleaved)
    and the generic helpers equal pyflash.philox.dropout_uniform bit for bit, at aligned block starts."""
    programs = 3
    width = programs * block_n
    cases = [(2**40 + 99, 12, 5, 0, 0, 0.3), (7, 2**31 - 5, 0, 100, 4 * block_n, 0.1),
             (2**62 + 1, 123456, 1000, 2**20 + 3, 2**24 - 2 * block_n, 0.5), (0, 0, 2**31 - 1, 17, 8, 0.9)]
    for seed, offset, bh, row_start, col_start, p_dropout in cases:
        uniform = torch.empty(2, block_m, width, dtype=torch.float32)
        keep = torch.empty(2, block_m, width, dtype=torch.int8)
        keep_t = torch.empty(width, block_m, dtype=torch.int8)
        _dropout_tile_kernel[(programs,)](uniform, keep, keep_t, seed, offset, bh, p_dropout, row_start, col_start,
                                          BLOCK_M=block_m, BLOCK_N=block_n)
        i = row_start + torch.arange(block_m)[:, None]
        j = col_start + torch.arange(width)[None, :]
        ours = philox.dropout_uniform(seed, offset, bh, i, j)
        ours_keep = philox.dropout_keep(seed, offset, p_dropout, bh, i, j)
        case = f"seed {seed} offset {offset} bh {bh} rows {row_start} cols {col_start}"
        assert torch.equal(uniform[0].view(torch.int32), ours.view(torch.int32)), "tile " + case
        assert torch.equal(uniform[1].view(torch.int32), ours.view(torch.int32)), "generic " + case
        assert torch.equal(keep[0].bool(), ours_keep), "tile keep " + case
        assert torch.equal(keep[1].bool(), ours_keep), "generic keep " + case
        assert torch.equal(keep_t.bool(), ours_keep.T), "transposed tile keep " + case
        assert 0 < int(ours_keep.sum()) < ours_keep.numel()


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


def test_dropout_bits_of_consecutive_keys_match_any_keys():
    """pyflash.philox.dropout_bits evaluates consecutive keys (the reference path's tiles) one Philox call per 8;
    any other key tensor per element: both give the same bits."""
    i = torch.arange(5)[:, None]
    for first, count in ((0, 37), (13, 64), (2**20 + 5, 9), (8, 1)):
        j = torch.arange(first, first + count)
        fast = philox.dropout_bits(2**40 + 3, 77, 6, i, j[None, :])
        order = torch.randperm(count, generator=torch.Generator().manual_seed(first))
        slow = philox.dropout_bits(2**40 + 3, 77, 6, i, j[order][None, :])  # not consecutive: per element
        assert torch.equal(fast[:, order], slow), (first, count)
        assert torch.equal(philox.dropout_bits(2**40 + 3, 77, 6, 2, j), fast[2])  # 1-D keys, one row
