"""The Gluon kernels' index arithmetic checked on the CPU against brute force: the forward's key ranges, a query
tile's (gluon_forward._tile_range) and, with Config.trim, each consumer warpgroup's own (_wg_blocks), and the
persistent schedule (_tile_coords); the backward's query blocks of a key block (gluon_backward._tile_info), with
its Config.trim those that see none of warpgroup 1's keys (_trim_steps), and the deterministic order of dQ adds
(_turn_params, _turn_rank, _step_block).

The interpreter cannot run Gluon, but these functions are integer arithmetic: their own Python source
runs here on ints, with ``gl`` standing for the three operations they use (Triton's integer division
truncates toward zero: so does ``cdiv`` here). A wrong range is a wrong answer (keys a row sees left out)
or lost speed (blocks no row sees computed), so both directions are asserted.
"""
import itertools
import random
import types

import pytest

pytest.importorskip("triton.experimental.gluon")
from pyflash.kernels import gluon_backward as gb  # noqa: E402
from pyflash.kernels import gluon_forward as gf  # noqa: E402


def _truncating_div(a: int, b: int) -> int:
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b > 0) else -quotient


class _IntOps:
    minimum = staticmethod(min)
    maximum = staticmethod(max)

    @staticmethod
    def where(condition, a, b):
        return a if condition else b

    @staticmethod
    def cdiv(a, b):
        return _truncating_div(a + b - 1, b)


def _on_ints(jit_function):
    """The jit function's Python source as a function of ints (the jit functions it calls likewise)."""
    fn = jit_function.fn
    scope = {**fn.__globals__, "gl": _IntOps}
    for name in fn.__code__.co_names:
        if hasattr(scope.get(name), "fn"):
            scope[name] = _on_ints(scope[name])
    return types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__)


tile_range = _on_ints(gf._tile_range)
wg_blocks = _on_ints(gf._wg_blocks)
backward_tile_info = _on_ints(gb._tile_info)
trim_steps = _on_ints(gb._trim_steps)
step_block = _on_ints(gb._step_block)
turn_params = _on_ints(gb._turn_params)
turn_rank = _on_ints(gb._turn_rank)
tile_coords = _on_ints(gf._tile_coords)


def visible_keys(rows, seqlen_q, seqlen_k, left, right):
    """Smallest and largest key any of rows sees (bottom-right aligned windows), or None."""
    diag = seqlen_k - seqlen_q
    seen = [(max(r + diag - left, 0) if left >= 0 else 0, min(r + diag + right, seqlen_k - 1) if right >= 0
             else seqlen_k - 1) for r in rows]
    seen = [(lo, hi) for lo, hi in seen if lo <= hi]
    return (min(lo for lo, _ in seen), max(hi for _, hi in seen)) if seen else None


def _cases(count=400, seed=0):
    rng = random.Random(seed)
    fixed = [(512, 512, -1, 0), (1024, 1024, -1, 0), (1000, 3000, -1, 0), (3000, 1000, -1, 0), (77, 77, -1, 0),
             (700, 500, 100, 0), (513, 513, -1, -1), (300, 1000, -1, 30), (129, 129, 5, 5)]
    for seqlen_q, seqlen_k, left, right in fixed:
        yield seqlen_q, seqlen_k, left, right
    for _ in range(count):
        yield (rng.randint(1, 700), rng.randint(1, 700), rng.choice([-1, -1, rng.randint(0, 300)]),
               rng.choice([-1, 0, 0, rng.randint(0, 300)]))


@pytest.mark.parametrize("block_n, num_wg", [(128, 2), (128, 3), (64, 2), (32, 2)])
def test_tile_and_warpgroup_ranges_match_brute_force(block_n, num_wg):
    wg_rows = gf.WG_M
    tile_m = wg_rows * num_wg
    trimmed_blocks = full_blocks = 0
    for seqlen_q, seqlen_k, left, right in _cases():
        has_left, has_right = left >= 0, right >= 0
        for start_m in range(0, seqlen_q, tile_m):
            lo_blk, n_left, n_mid, n_blocks = tile_range(start_m, seqlen_q, seqlen_k, left, right, block_n, tile_m,
                                                         has_left, has_right)
            assert 0 <= n_left <= n_mid <= n_blocks and n_blocks >= 1
            tile_rows = range(start_m, min(start_m + tile_m, seqlen_q))
            tile_keys = visible_keys(tile_rows, seqlen_q, seqlen_k, left, right)
            where = f"sq={seqlen_q} sk={seqlen_k} window=({left}, {right}) start_m={start_m}"
            if tile_keys is not None:
                assert lo_blk * block_n <= tile_keys[0] and tile_keys[1] < (lo_blk + n_blocks) * block_n, where
            for wg in range(num_wg):
                n_wg, half = wg_blocks(start_m, seqlen_q, seqlen_k, right, lo_blk, n_blocks, block_n, wg, wg_rows,
                                       has_right)
                assert 1 <= n_wg <= n_blocks, where
                rows = range(start_m + wg * wg_rows, min(start_m + (wg + 1) * wg_rows, seqlen_q))
                if not rows:
                    continue  # rows past the sequence: computed, never stored
                keys = visible_keys(rows, seqlen_q, seqlen_k, left, right)
                full_blocks += n_blocks
                trimmed_blocks += n_blocks - n_wg + 0.5 * half
                if keys is None:
                    assert n_wg == 1, where  # one all-masked block (out 0, lse +inf)
                    continue
                # Exactly the block holding the warpgroup's last visible key, and half of it when that key
                # is in its first half: nothing seen is left out, no block past it is computed.
                last = keys[1] - lo_blk * block_n
                assert n_wg - 1 == last // block_n, f"{where} wg={wg}: {n_wg} blocks, last key {keys[1]}"
                assert bool(half) == (last % block_n < block_n // 2), f"{where} wg={wg}: half={half}"
    assert trimmed_blocks > 0.05 * full_blocks  # the rule trims something on these cases


@pytest.mark.parametrize("head_dim, block_n, num_wg", [(64, 128, 2), (128, 128, 2), (256, 64, 2), (64, 128, 3)])
def test_causal_trim_saves_what_it_should(head_dim, block_n, num_wg):
    """Square causal calls: every warpgroup but a tile's last stops early (tiles of 128 rows, 128-key
    blocks: warpgroup 0 computes half of the diagonal block; 64-key blocks: it skips the last block)."""
    seqlen, wg_rows = 512, gf.WG_M
    tile_m = wg_rows * num_wg
    computed = trimmed = 0
    for start_m, wg in itertools.product(range(0, seqlen, tile_m), range(num_wg)):
        lo_blk, _, _, n_blocks = tile_range(start_m, seqlen, seqlen, -1, 0, block_n, tile_m, False, True)
        n_wg, half = wg_blocks(start_m, seqlen, seqlen, 0, lo_blk, n_blocks, block_n, wg, wg_rows, True)
        if start_m + wg * wg_rows < seqlen:
            computed += n_blocks
            trimmed += n_wg - 0.5 * half
        if wg == num_wg - 1 and (start_m + tile_m) % block_n == 0:
            assert (n_wg, bool(half)) == (n_blocks, False)  # the tile's last rows see its whole range
    # 512 causal rows in 4 tiles of 128: 20 warpgroup-blocks of 128 keys, of which warpgroup 0 of each tile
    # saves half a block; of 64 keys: 40, and warpgroup 0 of each tile skips one.
    expected = {(128, 2): 20 - 2, (64, 2): 40 - 4}.get((block_n, num_wg))
    if expected is not None:
        assert trimmed == expected, (computed, trimmed)
    assert trimmed < computed


@pytest.mark.parametrize("block_m", [64, 128])
def test_backward_trim_skips_exactly_the_blocks_warpgroup_1_does_not_see(block_m):
    """Causal backward, a CTA of 128 keys (warpgroup 1: the second 64): the query blocks _trim_steps skips for
    warpgroup 1 hold no query that sees one of its keys, the next one does (by its last row), and there is at
    most one (its _consumer_tile loop relies on that)."""
    block_n, wg_rows = gb.BLOCK_N, gb.WG_N
    skipped = 0
    for seqlen_q, seqlen_k, _, _ in _cases(200, seed=1):
        diag = seqlen_k - seqlen_q
        for n_blk in range(-(-seqlen_k // block_n)):
            start_n, _, _, _, _, m_lo, n_steps, _, _ = backward_tile_info(n_blk, 0, seqlen_q, seqlen_k, 1, 1, block_m,
                                                                          block_n, 64, True)
            n_skip = trim_steps(start_n, diag, m_lo, n_steps, block_m, wg_rows)
            where = f"sq={seqlen_q} sk={seqlen_k} key block {n_blk}"
            assert 0 <= n_skip <= min(1, n_steps), where
            first_key = start_n + wg_rows  # warpgroup 1's first key
            for m in range(m_lo, m_lo + n_skip):
                rows = range(m * block_m, min((m + 1) * block_m, seqlen_q))
                assert all(i + diag < first_key for i in rows), f"{where}: block {m} skipped but seen"
            if n_skip < n_steps:
                m = m_lo + n_skip
                assert (m + 1) * block_m - 1 + diag >= first_key, f"{where}: block {m} not skipped"
            skipped += n_skip
    assert skipped > 0
    # Square causal: every key block's first query block is skipped.
    for n_blk in range(4):
        start_n, _, _, _, _, m_lo, n_steps, _, _ = backward_tile_info(n_blk, 0, 512, 512, 1, 1, 64, block_n, 64, True)
        assert trim_steps(start_n, 0, m_lo, n_steps, 64, wg_rows) == 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", [1, 2])
def test_deterministic_dq_turns_are_a_permutation_in_arrival_order(causal, mode):
    """The deterministic backward's order of dQ adds (_turn_params, _turn_rank over _tile_info's walks and
    _step_block's rotation): for every query block, the key blocks whose walk reaches it hold the ranks
    0 .. count - 1 once each (a repeated or missing rank would deadlock or race), and in mode 1 the ranks
    follow the step at which each key block reaches the block (so that nobody waits in the steady state)."""
    block_m, block_n = 64, gb.BLOCK_N
    for seqlen_q, seqlen_k, _, _ in _cases(120, seed=2):
        diag, n_m, n_kblk = seqlen_k - seqlen_q, -(-seqlen_q // block_m), -(-seqlen_k // block_n)
        rotate = mode == 1 and not causal
        arrivals = {}  # query block -> [(rank, step at which the key block reaches it)]
        for kblk in range(n_kblk):
            _, _, _, _, _, m_lo, n_steps, _, rot = backward_tile_info(kblk, 0, seqlen_q, seqlen_k, 1, 1, block_m,
                                                                      block_n, 64, causal)
            rank_a, rank_b = turn_params(kblk, n_kblk, diag, block_m, block_n, causal, mode)
            for t in range(n_steps):
                m = m_lo + step_block(t, n_steps, rot, rotate)
                rank = turn_rank(m, rank_a, rank_b, n_m, block_m, block_n, causal, mode)
                arrivals.setdefault(m, []).append((rank, t))
        where = f"sq={seqlen_q} sk={seqlen_k}"
        for m, seen in arrivals.items():
            assert sorted(rank for rank, _ in seen) == list(range(len(seen))), f"{where} query block {m}: {seen}"
            if mode == 1:
                steps = [t for _, t in sorted(seen)]
                assert steps == sorted(steps), f"{where} query block {m}: ranks against arrival steps {seen}"


@pytest.mark.parametrize("num_m_blocks, batch_heads, section_heads", [(4, 6, 6), (7, 5, 2), (1, 9, 4), (3, 10, 3)])
def test_persistent_forward_tiles_cover_each_tile_once(num_m_blocks, batch_heads, section_heads):
    """gluon_forward._tile_coords: tile ids 0 .. num_tiles - 1 map onto every (batch, head, query tile) once, in
    sections of section_heads heads, the heaviest query tiles (the last) first within a section."""
    num_heads, head_group, tile_m, head_dim = 3, 1, 128, 64
    num_tiles = num_m_blocks * batch_heads
    seen = []
    for tile in range(num_tiles):
        batch, head, start_m, q_col, kv_col = tile_coords(tile, num_m_blocks, section_heads, batch_heads, num_heads,
                                                          head_group, tile_m, head_dim)
        assert q_col == head * head_dim and kv_col == head * head_dim
        seen.append((batch * num_heads + head, start_m // tile_m))
    assert sorted(seen) == [(bh, m) for bh in range(batch_heads) for m in range(num_m_blocks)]
    for first in range(0, num_tiles, section_heads * num_m_blocks):
        section = seen[first:first + section_heads * num_m_blocks]
        blocks = [m for _, m in section]
        assert blocks == sorted(blocks, reverse=True), section  # heaviest first
        assert len({bh for bh, _ in section}) == len(section) // num_m_blocks  # whole heads in a section


@pytest.mark.parametrize("lpt", [False, True])
def test_persistent_backward_tiles_cover_each_key_block_once(lpt):
    """gluon_backward._tile: tile ids map onto every (key block, batch * kv head) once; with lpt every head's
    first (under causal masking the heaviest) key block comes before any second one, else a head's key blocks
    are next to each other."""
    tile_fn = _on_ints(gb._tile)
    batch, num_heads, num_heads_k, seqlen = 3, 4, 2, 700
    n_kblk = -(-seqlen // gb.BLOCK_N)
    num_tiles = n_kblk * batch * num_heads_k
    seen = [tile_fn(tile, num_tiles, n_kblk, seqlen, seqlen, num_heads, num_heads_k, 64, gb.BLOCK_N, 64, True, lpt)
            for tile in range(num_tiles)]
    pairs = [(n_blk, b * num_heads_k + h) for n_blk, _, b, h, *_ in seen]
    assert sorted(pairs) == [(j, bh) for j in range(n_kblk) for bh in range(batch * num_heads_k)]
    blocks = [j for j, _ in pairs]
    if lpt:
        assert blocks == sorted(blocks)
    else:
        assert [bh for _, bh in pairs] == sorted(bh for _, bh in pairs)
    for n_blk, start_n, _, head_k, head0, *_ in seen:
        assert start_n == n_blk * gb.BLOCK_N and head0 == head_k * (num_heads // num_heads_k)
