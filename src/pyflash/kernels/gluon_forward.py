"""FlashAttention-3-style forward for Hopper (sm_90) written in Gluon (prototype).

One CTA owns 64 * NUM_WG (128 by default, 192 with three consumers) query rows of one
(batch, head) and runs warp-specialized partitions (``gl.warp_specialize``):

* producer (1 warp, few registers): TMA loads of the two 64-row Q halves (once) and of the K and V
  tiles into a NUM_STAGES-deep ring in shared memory.
* consumer 0 (the default partition, 4 warps = one warpgroup) and consumers 1 (, 2) (worker
  partitions of 4 warps): each owns 64 of the query rows and runs the online softmax over the same key blocks
  with asynchronous wgmma, Q, K and V read straight from shared memory, P fed from registers.

Barriers (mbarriers in shared memory, one slot per ring stage):

* ``q_ready[w]``          producer -> consumer w: Q half w has landed (TMA transaction count).
* ``k_ready/v_ready[s]``  producer -> consumers: K_j / V_j has landed in stage s.
* ``k_empty/v_empty[s]``  consumers -> producer: every consumer warpgroup is done reading stage s (count NUM_WG).
* ``turn[w]`` (PINGPONG)  consumer w-1 -> consumer w (a ring): "your turn to issue GEMMs". The warpgroups
  alternate their GEMM issue so that one warpgroup's softmax (MUFU exp2) runs while the other's
  GEMMs occupy the tensor cores (FlashAttention-3's ping-pong schedule).

Inside a consumer (FlashAttention-3's intra-warpgroup overlap): at key block j it issues
S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, waits for S_j only, runs the softmax of S_j while
the PV GEMM still runs, then waits for the PV GEMM, rescales O and releases K_j / V_{j-1}.

Scores stay in raw units; the softmax scale and log2(e) are folded into one FMA,
p = exp2(s * scale_log2 - m * scale_log2) (with softcap the scores are already in log2 units and the
multiplier is 1). The key range of a CTA (common.visible_block_ranges' rules) is [lo, hi): blocks
outside it are never loaded; of the blocks inside, only those at a window edge (the diagonal for
causal), at the ragged end of the keys, and the first one go through the mask. A CTA whose rows
see no key runs one all-masked block (out 0, lse +inf).

Features (constexpr switches; off they compile away): GQA/MQA (kv head = head // (h // hk)),
seqlen_q != seqlen_k with bottom-right alignment, sliding windows (HAS_LEFT / HAS_RIGHT; causal is
right = 0), softcap (HAS_SOFTCAP), ALiBi (HAS_ALIBI). Not here: dropout, return_softmax, varlen,
head dims other than 64 / 128 / 256 (supported() says no and kernels/forward.py's Triton kernel runs).

Tensors are (batch, seqlen, heads, head_dim) with any batch / seqlen strides TMA can read (heads
packed at head_dim, 16-byte aligned): TMA descriptors are 3-D over the (batch, seqlen, heads *
head_dim) view with boxes [1, rows, head_dim], so loads past a sequence's end read zeros and the O
store is clipped at the sequence end (never writes the next batch's rows or padding around out).
The O tile is staged through the (then dead) Q buffer of its warpgroup; lse goes through its strides.

Persistent variant (Config.persistent; tuning candidates for short sequences, plain / causal /
right-window calls only: persistent_launch): a grid of one CTA per SM, each looping over query tiles
(_tile_coords: heaviest first inside L2-sized sections of heads). The K / V ring and the ping-pong
turns run on across tiles (ring index = blocks loaded so far); ``q_empty[w]`` (consumer w ->
producer) releases Q half w, after the tile's last S GEMM when O has a buffer of its own
(separate_o: d <= 128), so the next tile's K_0, Q and V_0 load under the last PV GEMM and the
epilogue, whose TMA store stays in flight until the next epilogue.

Entry points: supported() / forward() (the backend contract of kernels/forward.py), forward_gluon()
(scripts), compile_sm90() / offline_report() (offline compilation: scripts/gluon_compile.py,
tests/test_gluon_compile.py).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from pyflash.kernels.aot import ptxas_stats
from pyflash.kernels.common import device_capability, multiprocessor_count
from pyflash.kernels.launch import Launch, Plans, call_key, current_device, record, replay_or_record

try:  # Gluon ships with triton >= 3.5; nothing here may fail on a CPU-only machine.
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _IMPORT_ERROR = None
except Exception as error:  # noqa: BLE001 - any failure means "not available"
    _IMPORT_ERROR = error

# Importable and compilable (the interpreter cannot run Gluon); the kernel itself needs sm_90.
AVAILABLE = _IMPORT_ERROR is None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

LOG2E = math.log2(math.e)
WG_M = 64  # query rows per consumer warpgroup
PRODUCER_REGS = 24


if _IMPORT_ERROR is None:

    @gluon.jit
    def _ring_barriers(NUM_STAGES: gl.constexpr, NUM_WG: gl.constexpr):
        """The K / V ring's barriers, initialised: (k_ready, k_empty, v_ready, v_empty); ready completes
        with the producer's TMA load, empty with one arrive per consumer warpgroup."""
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NUM_WG)
            mbarrier.init(v_empty.index(i), count=NUM_WG)
        return k_ready, k_empty, v_ready, v_empty

    @gluon.jit
    def _load_kv(desc, smem, ready, empty, batch, row, kv_col, i, NUM_STAGES: gl.constexpr):
        """The i-th K (or V) tile of the ring (i counts every block this CTA has loaded) into stage
        i % NUM_STAGES once the consumers have released that stage."""
        stage = i % NUM_STAGES
        # Fresh mbarriers count as having completed the phase before phase 0: the first pass
        # through the ring waits on parity 1 and goes straight through.
        phase = ((i // NUM_STAGES) & 1) ^ 1
        mbarrier.wait(empty.index(stage), phase)
        mbarrier.expect(ready.index(stage), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [batch, row, kv_col], ready.index(stage), smem.index(stage))

    @gluon.jit
    def _tile_coords(tile, num_m_blocks, section_heads, batch_heads, num_heads, head_group,
                     TILE_M: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Persistent schedule: tile -> (batch, head, start_m, q_col, kv_col). Tiles run in sections of
        section_heads (batch, head) pairs (their K / V stay in L2 while the section runs); inside a
        section the heaviest query tiles (the last ones: causal) come first, all heads of one query
        tile next to each other (longest-processing-time first)."""
        per_section = section_heads * num_m_blocks
        section = tile // per_section
        rem = tile - section * per_section
        heads_here = gl.minimum(section_heads, batch_heads - section * section_heads)
        m_rev = rem // heads_here
        bh = section * section_heads + rem - m_rev * heads_here
        start_m = (num_m_blocks - 1 - m_rev) * TILE_M
        batch = bh // num_heads
        head = bh - batch * num_heads
        return batch, head, start_m, head * HEAD_DIM, (head // head_group) * HEAD_DIM

    @gluon.jit
    def _tile_range(start_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_N: gl.constexpr,
                    TILE_M: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """The key blocks of the query tile at start_m (common.visible_block_ranges): (lo_blk, n_left,
        n_mid, n_blocks): blocks [0, n_left) of the range are at the left window edge (masked),
        [n_left, n_mid) every row sees whole, [n_mid, n_blocks) right edge / diagonal / ragged end."""
        # The keys the tile's rows [first, last] can see: [lo, hi), of which [full_lo, full_hi) every
        # row sees whole. All non-negative before any division.
        diag = seqlen_k - seqlen_q
        first = start_m
        last = gl.minimum(start_m + TILE_M, seqlen_q) - 1
        lo = 0
        full_lo = 0
        hi = seqlen_k
        full_hi = seqlen_k // BLOCK_N * BLOCK_N
        if HAS_LEFT:
            lo = gl.maximum(first + diag - window_left, 0) // BLOCK_N * BLOCK_N
            full_lo = gl.cdiv(gl.maximum(last + diag - window_left, 0), BLOCK_N) * BLOCK_N
        if HAS_RIGHT:
            hi = gl.minimum(last + diag + window_right + 1, seqlen_k)
            full_hi = gl.maximum(gl.minimum(first + diag + window_right + 1, seqlen_k), 0) // BLOCK_N * BLOCK_N
        hi = gl.maximum(hi, lo)
        full_lo = gl.minimum(gl.maximum(full_lo, lo), hi)
        full_hi = gl.minimum(gl.maximum(full_hi, full_lo), hi)
        lo_blk = lo // BLOCK_N
        n_left = full_lo // BLOCK_N - lo_blk
        n_mid = full_hi // BLOCK_N - lo_blk
        # At least one block: a tile whose rows see no key runs one all-masked block (l = 0: O = 0, lse = +inf).
        n_blocks = gl.maximum(gl.cdiv(hi, BLOCK_N) - lo_blk, 1)
        return lo_blk, n_left, n_mid, n_blocks

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                  v_empty, batch, q_col, kv_col, start_m, lo_blk, n_blocks,
                  seqlen_q, seqlen_k, window_left, window_right, num_heads, head_group,
                  num_tiles, num_m_blocks, section_heads, batch_heads,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG_ROWS: gl.constexpr,
                  NUM_WG: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                  PERSISTENT: gl.constexpr):
        if PERSISTENT:
            TILE_M: gl.constexpr = NUM_WG * WG_ROWS
            ring = 0
            tile_iter = 0
            for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
                batch, head, start_m, q_col, kv_col = _tile_coords(tile, num_m_blocks, section_heads, batch_heads,
                                                                    num_heads, head_group, TILE_M, HEAD_DIM)
                lo_blk, n_left, n_mid, n_blocks = _tile_range(start_m, seqlen_q, seqlen_k, window_left,
                                                              window_right, BLOCK_N, TILE_M, HAS_LEFT, HAS_RIGHT)
                # K_0 first (its stage frees earliest), then the Q halves as their consumers release
                # them (after the previous tile's last S GEMM), then V_0 and the rest.
                _load_kv(k_desc, k_smem, k_ready, k_empty, batch, lo_blk * BLOCK_N, kv_col, ring, NUM_STAGES)
                for w in gl.static_range(NUM_WG):
                    mbarrier.wait(q_empty.index(w), (tile_iter & 1) ^ 1)
                    mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(q_desc, [batch, start_m + w * WG_ROWS, q_col], q_ready.index(w),
                                                    q_smem.index(w))
                _load_kv(v_desc, v_smem, v_ready, v_empty, batch, lo_blk * BLOCK_N, kv_col, ring, NUM_STAGES)
                for t in range(1, n_blocks):
                    row = (lo_blk + t) * BLOCK_N
                    _load_kv(k_desc, k_smem, k_ready, k_empty, batch, row, kv_col, ring + t, NUM_STAGES)
                    _load_kv(v_desc, v_smem, v_ready, v_empty, batch, row, kv_col, ring + t, NUM_STAGES)
                ring += n_blocks
                tile_iter += 1
        else:
            # Q: one load per consumer warpgroup so that each can start as soon as its rows are in.
            for w in gl.static_range(NUM_WG):
                mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [batch, start_m + w * WG_ROWS, q_col], q_ready.index(w),
                                                q_smem.index(w))
            for t in range(n_blocks):
                row = (lo_blk + t) * BLOCK_N
                _load_kv(k_desc, k_smem, k_ready, k_empty, batch, row, kv_col, t, NUM_STAGES)
                _load_kv(v_desc, v_smem, v_ready, v_empty, batch, row, kv_col, t, NUM_STAGES)

    @gluon.jit
    def _softmax(s, m_i, l_i, col_offs, col_base, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out,
                 alibi_coef, MASKED: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                 HAS_ALIBI: gl.constexpr, REL_COLS: gl.constexpr = False):
        """Online-softmax step on the raw scores s (WG_M, BLOCK_N) of the keys col_base + col_offs: returns
        p (fp32), alpha, m, l. Scores stay in units where score_scale * s is log2(e) times the true score.
        REL_COLS: the mask and the ALiBi distance compare the per-thread column offsets with per-row
        limits shifted by col_base (two subtractions per row instead of an add per element: fewer
        live registers)."""
        if REL_COLS:
            row_hi = row_hi - col_base
            row_lo = row_lo - col_base
            row_pos = row_pos - col_base
            cols = col_offs
        else:
            cols = col_base + col_offs
        if HAS_SOFTCAP:
            # softcap * tanh(scale * qk / softcap) in log2 units (score_scale is 1 then); tanh as
            # 1 - 2 / (e^{2x} + 1), exact to fp32 rounding and saturating cleanly to +-1.
            x = s * softcap_in
            s = softcap_out * (1.0 - 2.0 / (gl.exp2(x * 2.8853900817779268) + 1.0))
        if HAS_ALIBI:
            # -slope * |i + sk - sq - j|, alibi_coef = -slope in these units.
            # In fp32 (exact below 2**24): no per-element integer ops, nothing for LLVM to reassociate.
            dist = gl.abs(row_pos.to(gl.float32)[:, None] - cols.to(gl.float32)[None, :])
            s = s + alibi_coef * dist
        if MASKED:
            visible = cols[None, :] < row_hi[:, None]
            if HAS_LEFT:
                visible = visible & (cols[None, :] >= row_lo[:, None])
            s = gl.where(visible, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_scaled = m_new * score_scale
        if MASKED:
            # A row with no visible key yet keeps m = -inf: subtract 0 so p and alpha are 0, not NaN.
            m_scaled = gl.where(m_new == float("-inf"), 0.0, m_scaled)
        p = gl.exp2(s * score_scale - m_scaled[:, None])
        alpha = gl.exp2(m_i * score_scale - m_scaled)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _pingpong_wait(turn, count, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.wait(turn.index(WG), count & 1)
        return count + 1

    @gluon.jit
    def _pingpong_pass(turn, WG: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index((WG + 1) % NUM_WG))

    @gluon.jit
    def _attend(t, ring, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                lo_blk, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out, alibi_coef,
                s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                WG: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr, MASKED: gl.constexpr,
                HAS_LEFT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, REL_COLS: gl.constexpr,
                HALF: gl.constexpr = False):
        """The t-th key block (t >= 1) of this tile (ring + t of the CTA's K / V ring): S_t = Q K_t^T and
        O += P_{t-1} V_{t-1} in flight together, softmax of S_t under the PV GEMM, then O rescaled by alpha_t.
        HALF: S_t over the block's first BLOCK_N // 2 keys only (s_layout, col_offs and the row vectors
        shaped for that; the P returned is that wide)."""
        WG_ROWS: gl.constexpr = q.shape[0]
        N: gl.constexpr = BLOCK_N // 2 if HALF else BLOCK_N
        i = ring + t
        stage = i % NUM_STAGES
        prev = (i - 1) % NUM_STAGES
        mbarrier.wait(k_ready.index(stage), (i // NUM_STAGES) & 1)
        k_t = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        if HALF:
            k_t = k_t.slice(0, N)
        k_t = k_t.permute((1, 0))
        v_prev = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_t, gl.zeros([WG_ROWS, N], gl.float32, s_layout), use_acc=False,
                              is_async=True)
        mbarrier.wait(v_ready.index(prev), ((i - 1) // NUM_STAGES) & 1)
        o_tok = warpgroup_mma(p, v_prev, o, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        # wgmma groups retire in order: one outstanding means S_t is done, PV may still run.
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(stage))
        p_new, alpha, m_i, l_i = _softmax(s, m_i, l_i, col_offs, (lo_blk + t) * BLOCK_N, row_lo, row_hi, row_pos,
                                          score_scale, softcap_in, softcap_out, alibi_coef, MASKED, HAS_LEFT,
                                          HAS_SOFTCAP, HAS_ALIBI, REL_COLS)
        o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(prev))
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = gl.convert_layout(p_new.to(q.dtype), p_layout)
        return o, p, m_i, l_i, turn_count

    @gluon.jit
    def _attend_blocks(t_lo, t_hi, ring, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty, v_ready,
                       v_empty, turn, lo_blk, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out,
                       alibi_coef, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                       NUM_WG: gl.constexpr, PINGPONG: gl.constexpr, MASKED: gl.constexpr, HAS_LEFT: gl.constexpr,
                       HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr):
        """Key blocks t_lo .. t_hi - 1 of the tile (_attend each), all through the mask or none."""
        for t in range(t_lo, t_hi):
            o, p, m_i, l_i, turn_count = _attend(
                t, ring, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                lo_blk, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out, alibi_coef,
                s_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, MASKED,
                HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, False)
        return o, p, m_i, l_i, turn_count

    @gluon.jit
    def _wg_blocks(start_m, seqlen_q, seqlen_k, window_right, lo_blk, n_blocks, BLOCK_N: gl.constexpr,
                   WG: gl.constexpr, WG_ROWS: gl.constexpr, HAS_RIGHT: gl.constexpr):
        """TRIM: of the tile's key blocks [0, n_blocks), those the rows of warpgroup WG see: (n_wg, half),
        blocks [0, n_wg), and of the last only its first BLOCK_N // 2 keys where half (no row of this
        warpgroup sees the rest): the causal diagonal of every warpgroup but a tile's last, right windows,
        the ragged end of the keys."""
        last_row = gl.minimum(start_m + (WG + 1) * WG_ROWS, seqlen_q) - 1
        hi = seqlen_k
        if HAS_RIGHT:
            hi = gl.minimum(last_row + (seqlen_k - seqlen_q) + window_right + 1, seqlen_k)
        keys = hi - lo_blk * BLOCK_N
        # At least one block (rows that see no key still run one, all masked).
        n_wg = gl.minimum(gl.maximum(gl.cdiv(keys, BLOCK_N), 1), n_blocks)
        half = keys - (n_wg - 1) * BLOCK_N <= BLOCK_N // 2
        return n_wg, half

    @gluon.jit
    def _first_block(ring, m_i, l_i, turn_count, q, k_smem, k_ready, k_empty, turn, lo_blk, n_left, n_mid,
                     col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out, alibi_coef,
                     s_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     NUM_STAGES: gl.constexpr, WG: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr,
                     HAS_LEFT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                     FIRST_UNMASKED: gl.constexpr, HALF: gl.constexpr):
        """Block 0 of the range on its own (ring index ring): S_0 and its softmax, through the mask (a window
        edge, the diagonal, the ragged end, or a tile whose rows see no key at all: then this block is all
        masked). FIRST_UNMASKED: without the mask when block 0 is one every row sees whole. HALF: the
        block's first BLOCK_N // 2 keys only (s_layout, col_offs and the row vectors shaped for that).
        Returns P_0 (p_layout), m, l and the turn count."""
        WG_ROWS: gl.constexpr = q.shape[0]
        N: gl.constexpr = BLOCK_N // 2 if HALF else BLOCK_N
        stage0 = ring % NUM_STAGES
        mbarrier.wait(k_ready.index(stage0), (ring // NUM_STAGES) & 1)
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        k_0 = k_smem.index(stage0).reshape([BLOCK_N, HEAD_DIM])
        if HALF:
            k_0 = k_0.slice(0, N)
        s_tok = warpgroup_mma(q, k_0.permute((1, 0)), gl.zeros([WG_ROWS, N], gl.float32, s_layout), use_acc=False,
                              is_async=True)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(stage0))
        if FIRST_UNMASKED and not HALF:
            if (n_left == 0) & (n_mid >= 1):
                p32, alpha, m_i, l_i = _softmax(s, m_i, l_i, col_offs, lo_blk * BLOCK_N, row_lo, row_hi, row_pos,
                                                score_scale, softcap_in, softcap_out, alibi_coef, False, HAS_LEFT,
                                                HAS_SOFTCAP, HAS_ALIBI, True)
            else:
                p32, alpha, m_i, l_i = _softmax(s, m_i, l_i, col_offs, lo_blk * BLOCK_N, row_lo, row_hi, row_pos,
                                                score_scale, softcap_in, softcap_out, alibi_coef, True, HAS_LEFT,
                                                HAS_SOFTCAP, HAS_ALIBI, True)
        else:
            p32, alpha, m_i, l_i = _softmax(s, m_i, l_i, col_offs, lo_blk * BLOCK_N, row_lo, row_hi, row_pos,
                                            score_scale, softcap_in, softcap_out, alibi_coef, True, HAS_LEFT,
                                            HAS_SOFTCAP, HAS_ALIBI, FIRST_UNMASKED)
        return gl.convert_layout(p32.to(q.dtype), p_layout), m_i, l_i, turn_count

    @gluon.jit
    def _release_q(q_empty, WG: gl.constexpr, PERSISTENT: gl.constexpr, SEPARATE_O: gl.constexpr):
        if PERSISTENT:
            if SEPARATE_O:
                # Every S GEMM of the tile has retired: the producer may load the next tile's Q now,
                # under the last PV GEMM and the epilogue.
                mbarrier.arrive(q_empty.index(WG))

    @gluon.jit
    def _last_pv(i, o, p, v_smem, v_ready, v_empty, turn, turn_count, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                 NUM_STAGES: gl.constexpr, WG: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr,
                 HALF: gl.constexpr):
        """The tile's last PV GEMM, O += P V over ring index i (HALF: the block's first BLOCK_N // 2 keys)."""
        last = i % NUM_STAGES
        mbarrier.wait(v_ready.index(last), (i // NUM_STAGES) & 1)
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        v_last = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM])
        if HALF:
            v_last = v_last.slice(0, BLOCK_N // 2)
        o_tok = warpgroup_mma(p, v_last, o, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(last))
        return o, turn_count

    @gluon.jit
    def _skip_block(i, turn, turn_count, k_ready, k_empty, v_ready, v_empty, NUM_STAGES: gl.constexpr,
                    WG: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr):
        """TRIM: a block of the tile that no row of this warpgroup sees (ring index i): its ping-pong turn
        passed on at once, its K / V stages released once loaded (an arrive before the load could count
        towards the stage's previous use)."""
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        stage = i % NUM_STAGES
        phase = (i // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.arrive(k_empty.index(stage))
        mbarrier.wait(v_ready.index(stage), phase)
        mbarrier.arrive(v_empty.index(stage))
        return turn_count

    @gluon.jit
    def _tile_blocks(ring, m_i, l_i, turn_count, q, k_smem, v_smem, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                     lo_blk, n_left, n_mid, n_full, half, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in,
                     softcap_out, alibi_coef, s_layout: gl.constexpr, o_layout: gl.constexpr,
                     p_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                     WG: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr, HAS_LEFT: gl.constexpr,
                     HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr, PERSISTENT: gl.constexpr,
                     SEPARATE_O: gl.constexpr, FIRST_UNMASKED: gl.constexpr, TRIM: gl.constexpr):
        """Blocks [0, n_full) of the tile (n_full >= 1) whole, then (TRIM and half) the first half of block
        n_full, and the last PV GEMM. Returns o (not yet divided by l), m, l and the turn count."""
        WG_ROWS: gl.constexpr = q.shape[0]
        p, m_i, l_i, turn_count = _first_block(
            ring, m_i, l_i, turn_count, q, k_smem, k_ready, k_empty, turn, lo_blk, n_left, n_mid, col_offs, row_lo,
            row_hi, row_pos, score_scale, softcap_in, softcap_out, alibi_coef, s_layout, p_layout, BLOCK_N, HEAD_DIM,
            NUM_STAGES, WG, NUM_WG, PINGPONG, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, FIRST_UNMASKED, False)
        o = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, o_layout)

        # Blocks [0, n_left): left window edge (masked); [n_left, n_mid): every row sees them whole;
        # [n_mid, n_full): right edge / diagonal / ragged end (masked).
        left_end = n_left
        mid_end = n_mid
        if TRIM:
            left_end = gl.minimum(n_left, n_full)
            mid_end = gl.minimum(n_mid, n_full)
        if HAS_LEFT:
            o, p, m_i, l_i, turn_count = _attend_blocks(
                1, left_end, ring, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                turn, lo_blk, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out, alibi_coef,
                s_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, True, HAS_LEFT,
                HAS_SOFTCAP, HAS_ALIBI)
        o, p, m_i, l_i, turn_count = _attend_blocks(
            gl.maximum(n_left, 1), mid_end, ring, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty,
            v_ready, v_empty, turn, lo_blk, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out,
            alibi_coef, s_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, False,
            HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI)
        o, p, m_i, l_i, turn_count = _attend_blocks(
            gl.maximum(n_mid, 1), n_full, ring, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty,
            v_ready, v_empty, turn, lo_blk, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in, softcap_out,
            alibi_coef, s_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, True,
            HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI)
        if TRIM:
            if half:
                # Block n_full: only its first half, S over those keys beside the previous block's PV GEMM.
                sh_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                    instr_shape=[16, BLOCK_N // 2, 16])
                hrow_layout: gl.constexpr = gl.SliceLayout(1, sh_layout)
                row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
                o, p_h, m_h, l_h, turn_count = _attend(
                    n_full, ring, o, p, gl.convert_layout(m_i, hrow_layout), gl.convert_layout(l_i, hrow_layout),
                    turn_count, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, lo_blk,
                    gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, sh_layout)),
                    gl.convert_layout(row_lo, hrow_layout), gl.convert_layout(row_hi, hrow_layout),
                    gl.convert_layout(row_pos, hrow_layout), score_scale, softcap_in, softcap_out, alibi_coef,
                    sh_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, True,
                    HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, False, True)
                _release_q(q_empty, WG, PERSISTENT, SEPARATE_O)
                o, turn_count = _last_pv(ring + n_full, o, p_h, v_smem, v_ready, v_empty, turn, turn_count, BLOCK_N,
                                         HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, True)
                m_i = gl.convert_layout(m_h, row_layout)
                l_i = gl.convert_layout(l_h, row_layout)
            else:
                _release_q(q_empty, WG, PERSISTENT, SEPARATE_O)
                o, turn_count = _last_pv(ring + n_full - 1, o, p, v_smem, v_ready, v_empty, turn, turn_count,
                                         BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, False)
        else:
            _release_q(q_empty, WG, PERSISTENT, SEPARATE_O)
            o, turn_count = _last_pv(ring + n_full - 1, o, p, v_smem, v_ready, v_empty, turn, turn_count, BLOCK_N,
                                     HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, False)
        return o, m_i, l_i, turn_count

    @gluon.jit
    def _consumer_tile(q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                       turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                       batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                       lo_blk, n_left, n_mid, n_blocks, ring, turn_count, q_phase,
                       score_scale, softcap_in, softcap_out, alibi_scale,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                       NUM_WG: gl.constexpr, WG_ROWS: gl.constexpr, PINGPONG: gl.constexpr, HAS_LEFT: gl.constexpr,
                       HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                       PERSISTENT: gl.constexpr, SEPARATE_O: gl.constexpr, TRIM: gl.constexpr):
        """One query tile's 64 rows of warpgroup WG; blocks ring .. ring + n_blocks - 1 of the K / V ring.
        Returns the ping-pong turn count. PERSISTENT: Q's buffer is released to the producer (q_empty)
        once free, and the O store of this tile is left in flight (SEPARATE_O: its own buffer, waited
        for before the next tile's epilogue writes it)."""
        FIRST_UNMASKED: gl.constexpr = PERSISTENT
        dtype: gl.constexpr = o_desc.dtype
        # wgmma accumulators: warps stacked along M (4 warps x 16 rows), instruction N = tile N.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        # P as the register A operand of the PV wgmma (k_width 2: two 16-bit values per 32-bit register).
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows = start_m + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=row_layout)
        col_offs = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        # Bottom-right alignment: query i sits at key position i + sk - sq; it sees keys
        # [row_pos - left, row_pos + right] within [0, sk).
        row_pos = rows + (seqlen_k - seqlen_q)
        row_lo = row_pos
        if HAS_LEFT:
            row_lo = row_pos - window_left
        if HAS_RIGHT:
            row_hi = gl.minimum(row_pos + window_right + 1, seqlen_k)
        else:
            row_hi = gl.full([WG_ROWS], 0, gl.int32, row_layout) + seqlen_k
        alibi_coef = 0.0
        if HAS_ALIBI:
            alibi_coef = -gl.load(alibi_ptr + batch * stride_ab + head * stride_ah) * alibi_scale

        q = q_smem.index(WG).reshape([WG_ROWS, HEAD_DIM])
        mbarrier.wait(q_ready.index(WG), q_phase)

        m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([WG_ROWS], gl.float32, row_layout)
        if TRIM:
            # Only the blocks this warpgroup's rows see; the rest of the tile's blocks are released unread
            # (_skip_block) after the last PV GEMM.
            n_wg, half = _wg_blocks(start_m, seqlen_q, seqlen_k, window_right, lo_blk, n_blocks, BLOCK_N, WG, WG_ROWS,
                                    HAS_RIGHT)
            n_full = n_wg - half.to(gl.int32)
            turn_count = gl.to_tensor(turn_count)  # a literal 0 outside the persistent loop; the branches add to it
            if n_full == 0:
                # Block 0 is the warpgroup's only block, and only its first half.
                sh_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                    instr_shape=[16, BLOCK_N // 2, 16])
                hrow_layout: gl.constexpr = gl.SliceLayout(1, sh_layout)
                p_h, m_h, l_h, turn_count = _first_block(
                    ring, gl.convert_layout(m_i, hrow_layout), gl.convert_layout(l_i, hrow_layout), turn_count, q,
                    k_smem, k_ready, k_empty, turn, lo_blk, n_left, n_mid,
                    gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, sh_layout)),
                    gl.convert_layout(row_lo, hrow_layout), gl.convert_layout(row_hi, hrow_layout),
                    gl.convert_layout(row_pos, hrow_layout), score_scale, softcap_in, softcap_out, alibi_coef,
                    sh_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, PINGPONG, HAS_LEFT, HAS_SOFTCAP,
                    HAS_ALIBI, FIRST_UNMASKED, True)
                _release_q(q_empty, WG, PERSISTENT, SEPARATE_O)
                o, turn_count = _last_pv(ring, gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, o_layout), p_h, v_smem,
                                         v_ready, v_empty, turn, turn_count, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG,
                                         PINGPONG, True)
                m_i = gl.convert_layout(m_h, row_layout)
                l_i = gl.convert_layout(l_h, row_layout)
            else:
                o, m_i, l_i, turn_count = _tile_blocks(
                    ring, m_i, l_i, turn_count, q, k_smem, v_smem, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                    lo_blk, n_left, n_mid, n_full, half, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in,
                    softcap_out, alibi_coef, s_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG,
                    NUM_WG, PINGPONG, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, FIRST_UNMASKED, TRIM)
            for t in range(n_wg, n_blocks):
                turn_count = _skip_block(ring + t, turn, turn_count, k_ready, k_empty, v_ready, v_empty, NUM_STAGES, WG,
                                         NUM_WG, PINGPONG)
        else:
            o, m_i, l_i, turn_count = _tile_blocks(
                ring, m_i, l_i, turn_count, q, k_smem, v_smem, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                lo_blk, n_left, n_mid, n_blocks, False, col_offs, row_lo, row_hi, row_pos, score_scale, softcap_in,
                softcap_out, alibi_coef, s_layout, o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG,
                NUM_WG, PINGPONG, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, FIRST_UNMASKED, TRIM)

        # Epilogue: O / l through a shared buffer (this warpgroup's then dead Q buffer, or SEPARATE_O
        # its own) and a TMA store (clipped at the sequence end); lse (natural log, +inf for a row
        # that saw no key) through its strides.
        l_safe = gl.where(l_i > 0.0, l_i, 1.0)
        o = o * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
        lse = gl.where(l_i > 0.0, (m_i * score_scale + gl.log2(l_safe)) * 0.6931471805599453, float("inf"))
        lse_rows = (lse_ptr + batch.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh
                    + rows.to(gl.int64) * stride_lm)
        gl.store(lse_rows, lse, mask=rows < seqlen_q)
        if SEPARATE_O:
            tma.store_wait(0)  # the previous tile's O store has read the buffer
            o_smem.index(WG).reshape([WG_ROWS, HEAD_DIM]).store(o.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [batch, start_m + WG * WG_ROWS, q_col], o_smem.index(WG))
        else:
            q_smem.index(WG).reshape([WG_ROWS, HEAD_DIM]).store(o.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [batch, start_m + WG * WG_ROWS, q_col], q_smem.index(WG))
            tma.store_wait(0)
            if PERSISTENT:
                mbarrier.arrive(q_empty.index(WG))
        return turn_count

    @gluon.jit
    def _consumer(q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                  lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                  batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                  lo_blk, n_left, n_mid, n_blocks, score_scale, softcap_in, softcap_out, alibi_scale,
                  num_heads, head_group, num_tiles, num_m_blocks, section_heads, batch_heads,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                  NUM_WG: gl.constexpr, WG_ROWS: gl.constexpr, PINGPONG: gl.constexpr, HAS_LEFT: gl.constexpr,
                  HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                  PERSISTENT: gl.constexpr, SEPARATE_O: gl.constexpr, TRIM: gl.constexpr):
        if PERSISTENT:
            TILE_M: gl.constexpr = NUM_WG * WG_ROWS
            ring = 0
            pid = gl.program_id(0)
            ctas = gl.num_programs(0)
            for tile_iter in range(0, gl.cdiv(num_tiles - pid, ctas)):
                batch, head, start_m, q_col, kv_col = _tile_coords(pid + tile_iter * ctas, num_m_blocks, section_heads,
                                                                   batch_heads, num_heads, head_group, TILE_M, HEAD_DIM)
                lo_blk, n_left, n_mid, n_blocks = _tile_range(start_m, seqlen_q, seqlen_k, window_left,
                                                              window_right, BLOCK_N, TILE_M, HAS_LEFT, HAS_RIGHT)
                # Each tile takes n_blocks + 1 ping-pong turns: the count's parity is all that matters.
                _consumer_tile(
                    q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                    turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                    batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                    lo_blk, n_left, n_mid, n_blocks, ring, (ring + tile_iter) & 1, tile_iter & 1,
                    score_scale, softcap_in, softcap_out, alibi_scale,
                    BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                    HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)
                ring += n_blocks
            if SEPARATE_O:
                tma.store_wait(0)
        else:
            _consumer_tile(
                q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                lo_blk, n_left, n_mid, n_blocks, 0, 0, 0,
                score_scale, softcap_in, softcap_out, alibi_scale,
                BLOCK_N, HEAD_DIM, NUM_STAGES, WG, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)

    @gluon.jit
    def _forward_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, alibi_ptr,
                        stride_lb, stride_lh, stride_lm, stride_ab, stride_ah,
                        seqlen_q, seqlen_k, num_heads, head_group, window_left, window_right,
                        num_tiles, num_m_blocks, section_heads, batch_heads,
                        score_scale, softcap_in, softcap_out, alibi_scale,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                        HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                        HAS_ALIBI: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr,
                        PERSISTENT: gl.constexpr, SEPARATE_O: gl.constexpr, TRIM: gl.constexpr,
                        CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """Grid (query tiles, batch * heads), one tile per CTA; PERSISTENT: grid (CTAs,), each CTA runs
        tiles program_id, program_id + CTAs, ... of num_tiles (_tile_coords' order; the per-tile
        arguments batch .. n_blocks are then computed inside the partitions)."""
        WG_ROWS: gl.constexpr = q_desc.block_type.shape[1]
        TILE_M: gl.constexpr = NUM_WG * WG_ROWS
        if PERSISTENT:
            start_m = 0
            batch = 0
            head = 0
            q_col = 0
            kv_col = 0
            lo_blk = 0
            n_left = 0
            n_mid = 0
            n_blocks = 0
        else:
            # Reverse order: under causal masking the last query tiles see the most keys; start them first.
            start_m = (gl.num_programs(0) - 1 - gl.program_id(0)) * TILE_M
            batch = gl.program_id(1) // num_heads
            head = gl.program_id(1) % num_heads
            q_col = head * HEAD_DIM
            kv_col = (head // head_group) * HEAD_DIM
            lo_blk, n_left, n_mid, n_blocks = _tile_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                                          BLOCK_N, TILE_M, HAS_LEFT, HAS_RIGHT)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [NUM_WG] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        if SEPARATE_O:
            o_smem = gl.allocate_shared_memory(o_desc.dtype, [NUM_WG] + o_desc.block_type.shape, o_desc.layout)
        else:
            o_smem = q_smem
        q_ready = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NUM_WG):
            mbarrier.init(q_ready.index(w), count=1)
            mbarrier.init(q_empty.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        k_ready, k_empty, v_ready, v_empty = _ring_barriers(NUM_STAGES, NUM_WG)
        if PINGPONG:
            mbarrier.arrive(turn.index(0))  # consumer 0 issues first
        fence_async_shared()

        # (Gluon wants the partitions' argument tuples spelled out.)
        if NUM_WG == 2:
            gl.warp_specialize([
                (_consumer, (q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready,
                             v_empty, turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                             batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                             lo_blk, n_left, n_mid, n_blocks, score_scale, softcap_in, softcap_out, alibi_scale,
                             num_heads, head_group, num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, 0, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                             HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)),
                (_consumer, (q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready,
                             v_empty, turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                             batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                             lo_blk, n_left, n_mid, n_blocks, score_scale, softcap_in, softcap_out, alibi_scale,
                             num_heads, head_group, num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, 1, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                             HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)),
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, batch, q_col, kv_col, start_m, lo_blk, n_blocks,
                             seqlen_q, seqlen_k, window_left, window_right, num_heads, head_group,
                             num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, WG_ROWS, NUM_WG, HAS_LEFT, HAS_RIGHT, PERSISTENT)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready,
                             v_empty, turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                             batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                             lo_blk, n_left, n_mid, n_blocks, score_scale, softcap_in, softcap_out, alibi_scale,
                             num_heads, head_group, num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, 0, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                             HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)),
                (_consumer, (q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready,
                             v_empty, turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                             batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                             lo_blk, n_left, n_mid, n_blocks, score_scale, softcap_in, softcap_out, alibi_scale,
                             num_heads, head_group, num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, 1, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                             HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)),
                (_consumer, (q_smem, o_smem, k_smem, v_smem, o_desc, q_ready, q_empty, k_ready, k_empty, v_ready,
                             v_empty, turn, lse_ptr, stride_lb, stride_lh, stride_lm, alibi_ptr, stride_ab, stride_ah,
                             batch, head, q_col, start_m, seqlen_q, seqlen_k, window_left, window_right,
                             lo_blk, n_left, n_mid, n_blocks, score_scale, softcap_in, softcap_out, alibi_scale,
                             num_heads, head_group, num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, 2, NUM_WG, WG_ROWS, PINGPONG, HAS_LEFT, HAS_RIGHT,
                             HAS_SOFTCAP, HAS_ALIBI, PERSISTENT, SEPARATE_O, TRIM)),
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                             v_ready, v_empty, batch, q_col, kv_col, start_m, lo_blk, n_blocks,
                             seqlen_q, seqlen_k, window_left, window_right, num_heads, head_group,
                             num_tiles, num_m_blocks, section_heads, batch_heads,
                             BLOCK_N, HEAD_DIM, NUM_STAGES, WG_ROWS, NUM_WG, HAS_LEFT, HAS_RIGHT, PERSISTENT)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_GRID_Y = 65535


class Config(NamedTuple):
    """A launch configuration: key block size, K/V ring depth, consumer warpgroups (64 query rows
    each: the CTA's tile is 64 * num_wg rows), the ping-pong GEMM schedule between them, and
    persistent: one CTA per SM looping over the query tiles (_tile_coords' order: heaviest first
    within L2-sized sections of heads), the next tile's K / V (and, where shared memory allows an O
    buffer of its own, Q) loading under the current tile's last GEMM and epilogue; block 0 of a
    tile skips the mask when every row sees it whole. trim: each consumer warpgroup computes only the
    key blocks its own rows see, and of the last of them only the first half where its rows see no
    more (_wg_blocks: under causal masking every warpgroup but a tile's last stops at least half a
    block early); the blocks it skips are released unread (_skip_block)."""

    block_n: int
    num_stages: int
    num_wg: int = 2
    pingpong: bool = True
    persistent: bool = False
    trim: bool = False


def config_label(cfg: Config) -> str:
    """Short name of a config (scripts/gluon_check.py --candidates filters on it):
    bn128-st2-wg2[-nopp][-ps][-tr]."""
    return (f"bn{cfg.block_n}-st{cfg.num_stages}-wg{cfg.num_wg}{'' if cfg.pingpong else '-nopp'}"
            f"{'-ps' if cfg.persistent else ''}{'-tr' if cfg.trim else ''}")


def shared_bytes(head_dim: int, cfg: Config, element_size: int = 2, separate_o: bool = False) -> int:
    """Shared memory of a launch (tiles and barriers; the compiler's own scratch may add a little)."""
    tiles = cfg.num_wg * WG_M * head_dim * (2 if separate_o else 1) + 2 * cfg.num_stages * cfg.block_n * head_dim
    return tiles * element_size + 8 * (3 * cfg.num_wg + 4 * cfg.num_stages)


def persistent_launch(cfg: Config, has_left: bool, softcap: bool, alibi: bool) -> bool:
    """Whether a launch of cfg runs persistent: cfg.persistent, for plain, causal and right-window calls.
    With a left window, softcap or ALiBi the persistent loop's extra live scalars make some configs
    spill (scripts/gluon_compile.py --candidates '*-ps'), so those calls take the one-tile-per-CTA grid."""
    return bool(cfg.persistent) and not (has_left or softcap or alibi)


def separate_o(head_dim: int, cfg: Config, element_size: int = 2) -> bool:
    """Whether a persistent launch stages O through a buffer of its own (so the next tile's Q can load
    under this tile's epilogue): when it fits, with 2 KiB to spare for the compiler's scratch."""
    return bool(cfg.persistent) and shared_bytes(head_dim, cfg, element_size, True) + 2048 <= SM90_MAX_SHARED


def register_budget(num_wg: int):
    """(maxnreg, consumer setmaxnreg, producer setmaxnreg): the CTA (num_wg consumer warpgroups and one
    producer warpgroup's worth of registers) holds the register file; the producer keeps 24."""
    groups = num_wg + 1
    maxnreg = 65536 // (groups * 128) // 8 * 8
    consumer = (65536 // 128 - PRODUCER_REGS) // num_wg // 8 * 8
    return maxnreg, min(consumer, 240), PRODUCER_REGS


# Longest key sequence that takes the persistent grid (default_config), per (head_dim, causal); measured
# with CUDA-graph replays on an H100 (benchmarks/RESULTS.md, fourth session): where it is missing or
# the keys are longer, the one-tile-per-CTA grid measured faster. d=128 causal (seventh session, H200):
# s=512 283 vs 256 TFLOP/s (CUDA graphs; H100: 254 vs 255), s=1024 366 vs 362 (H100: 345 vs 365),
# s=2048 424 vs 457; so up to 512 keys.
PERSISTENT_MAX_SEQLEN_K = {(64, False): 1024, (64, True): 4096, (128, False): 1024, (128, True): 512}
# Shortest key sequence from which a causal d=64 call takes three consumer warpgroups (192-row tiles):
# at s=4096 their diagonal costs more than they gain (359 vs 372 TFLOP/s), at s=8192 they win (431 vs
# 403; CUDA-graph replays on an H100, benchmarks/RESULTS.md, fifth session).
THREE_WG_MIN_CAUSAL_SEQLEN_K = 8192


# Whether causal calls take Config.trim (each consumer warpgroup computes only the key blocks its rows see):
# PYFLASH_TRIM=fwd (or fwd,bwd, or 1: both kernels) sets it. Off until timed on a GPU
# (scripts/trim_device_call.sh; benchmarks/RESULTS.md, fifteenth session).
TRIM_CAUSAL = bool({"fwd", "1"} & set(os.environ.get("PYFLASH_TRIM", "").split(",")))


def default_config(head_dim: int, causal: bool, seqlen_q: int = None, seqlen_k: int = None,
                   two_sided_window: bool = False, softcap_or_alibi: bool = False) -> Config:
    """_untrimmed_config's pick, with trim for causal calls where TRIM_CAUSAL says so."""
    cfg = _untrimmed_config(head_dim, causal, seqlen_q, seqlen_k, two_sided_window, softcap_or_alibi)
    return cfg._replace(trim=True) if causal and TRIM_CAUSAL else cfg


def _untrimmed_config(head_dim: int, causal: bool, seqlen_q: int = None, seqlen_k: int = None,
                      two_sided_window: bool = False, softcap_or_alibi: bool = False) -> Config:
    """Tiles bounded by registers (S is 64 x BLOCK_N fp32 per warpgroup, O 64 x head_dim) and shared
    memory, ranked on an H100 by scripts/gluon_check.py --sweep (benchmarks/RESULTS.md). d=64: three
    consumer warpgroups (192-row tiles) win without a mask (481 vs 424 TFLOP/s at s=4096) but lose
    under causal masking (365 vs 385), where the diagonal wastes more of a taller tile; with a
    two-sided window and softcap or ALiBi their 128 registers a thread spill (216-380 B), so two.
    Causal at d=64 takes them from THREE_WG_MIN_CAUSAL_SEQLEN_K keys (not with softcap or ALiBi: not
    compile-checked there), where the diagonal is a small part of a tile's work.
    Short keys (seqlen_k <= PERSISTENT_MAX_SEQLEN_K; None: unknown / long) take the persistent grid
    (bn128-st2-wg2-ps), where a CTA's prologue and epilogue are a large part of its time: d=64
    s=512 294 -> 354 TFLOP/s, causal 162 -> 210, d=128 s=512 419 -> 446, d=64 causal s=4096 372 -> 391
    (CUDA-graph time)."""
    limit = PERSISTENT_MAX_SEQLEN_K.get((head_dim, bool(causal)))
    if limit is not None and seqlen_k is not None and seqlen_k <= limit:
        return Config(128, 2, 2, True, True)
    if head_dim <= 64:
        if causal:
            three = (seqlen_k is not None and seqlen_k >= THREE_WG_MIN_CAUSAL_SEQLEN_K
                     and not softcap_or_alibi)
        else:
            three = not (two_sided_window and softcap_or_alibi)
        return Config(128, 3, 3, True) if three else Config(128, 2, 2, True)
    if head_dim <= 128:
        return Config(128, 2, 2, True)
    return Config(64, 2, 2, True)


def tuning_candidates(head_dim: int, short: bool = None):
    """Configs besides default_config worth timing (scripts/gluon_check.py --sweep ranks them; each
    compiles without spills but the trimmed persistent ones at d=128 / 256, 4-24 B of kernel arguments
    at the partitions' entry: scripts/gluon_compile.py --sweep). With BLOCK_N 64 and trim the first
    warpgroup of a 128-row causal tile skips a whole block rather than half of one. BLOCK_N is a power of two (TMA box).
    short: None every candidate, False those for long sequences, True the persistent ones (aimed at
    short sequences, where a CTA's prologue and epilogue are a large part of its time).
    Trimmed (Config.trim) copies of the defaults close each group: they change only causal and
    right-window calls (and keys ending in the first half of a block)."""
    if head_dim <= 64:
        rows = ((128, 2, 2, True), (128, 4, 2, True), (128, 3, 2, False), (64, 3, 2, True),
                (128, 2, 3, True), (128, 3, 3, True), (128, 2, 3, False), (64, 4, 3, True))
        persistent = ((128, 2, 2, True), (128, 3, 2, True), (64, 3, 2, True), (64, 4, 3, True))
        trimmed, trimmed_persistent = ((128, 2, 2, True), (128, 3, 3, True)), ((128, 2, 2, True), (64, 3, 2, True))
    elif head_dim <= 128:
        rows = ((128, 3, 2, True), (128, 2, 2, False), (64, 3, 2, True), (64, 2, 3, True))
        persistent = ((128, 2, 2, True), (64, 3, 2, True), (64, 2, 3, True))
        trimmed, trimmed_persistent = ((128, 2, 2, True), ), ((128, 2, 2, True), (64, 3, 2, True))
    else:
        rows = ((64, 2, 2, False), (64, 1, 2, True), (32, 3, 2, True))
        persistent = ((32, 3, 2, True), )
        trimmed, trimmed_persistent = ((64, 2, 2, True), ), ((32, 3, 2, True), )
    long_rows = ([Config(*row) for row in rows] + [Config(*row, False, True) for row in trimmed]
                 if short is not True else [])
    short_rows = ([Config(*row, True) for row in persistent] + [Config(*row, True, True) for row in trimmed_persistent]
                  if short is not False else [])
    return long_rows + short_rows


_LAYOUTS = {}


def smem_layout(block_shape, torch_dtype):
    """The NVMMA shared layout (128-byte swizzle where it fits) of a TMA box of block_shape; remembered,
    as building one costs ~7 us of host time and every launch needs four."""
    key = (tuple(block_shape), torch_dtype)
    layout = _LAYOUTS.get(key)
    if layout is None:
        element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[torch_dtype]
        layout = _LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for(list(block_shape), element)
    return layout


def tma_view3(t):
    """(shape, strides) of t (batch, seqlen, heads, head_dim) as the (batch, seqlen, heads * head_dim)
    view TMA reads, or None when that view does not exist or TMA cannot read it (16-byte aligned
    base and strides, contiguous last dim, heads packed at head_dim). Strides of size-1 dims do not
    matter and are replaced by aligned ones."""
    if t.dim() != 4:
        return None
    batch, seqlen, heads, head_dim = t.shape
    stride_b, stride_s, stride_h, stride_d = t.stride()  # one call: each costs ~1 us of host time
    esize = t.element_size()
    if stride_d != 1 and head_dim > 1:
        return None
    if heads > 1 and stride_h != head_dim:
        return None
    row = stride_s if seqlen > 1 else heads * head_dim
    bstride = stride_b if batch > 1 else max(seqlen, 1) * row
    if t.data_ptr() % 16 or (row * esize) % 16 or (bstride * esize) % 16 or row <= 0 or bstride <= 0:
        return None
    if max(row, bstride) * esize >= 1 << 40:
        return None
    return [batch, seqlen, heads * head_dim], [bstride, row, 1]


def descriptor(t, rows: int, head_dim: int):
    """Host TMA descriptor over t's (batch, seqlen, heads * head_dim) view with box [1, rows, head_dim]."""
    shape, strides = tma_view3(t)
    block = [1, rows, head_dim]
    return TensorDescriptor(t, shape, strides, block, smem_layout(block, t.dtype))


L2_SECTION_BYTES = 16 << 20  # persistent schedule: K + V bytes of the heads whose tiles run together


def supported(q, k, v, out, softmax_lse, params, seqlens, return_softmax: bool) -> bool:
    """Whether forward() handles this call exactly (the backend contract of kernels/forward.py)."""
    try:
        if not AVAILABLE or return_softmax or seqlens.is_varlen or params.dropout_p != 0:
            return False
        # The online softmax keeps the running max of the raw scores: that needs a positive scale.
        if not (params.softmax_scale > 0 and math.isfinite(params.softmax_scale)):
            return False
        if params.softcap and not (params.softcap > 0 and math.isfinite(params.softcap)):
            return False
        if not (isinstance(q, torch.Tensor) and q.is_cuda and q.dim() == 4):
            return False
        if device_capability(q.device)[0] != 9:
            return False
        if q.dtype not in _GL_DTYPES or not (q.dtype == k.dtype == v.dtype == out.dtype):
            return False
        if any(t.device != q.device for t in (k, v, out, softmax_lse)):
            return False
        batch, seqlen_q, heads, head_dim = q.shape
        if k.dim() != 4 or k.shape != v.shape or out.shape != q.shape:
            return False
        _, seqlen_k, heads_k, _ = k.shape
        if head_dim not in SUPPORTED_HEAD_DIMS or k.shape[0] != batch or k.shape[-1] != head_dim:
            return False
        if heads_k == 0 or heads % heads_k or batch * heads > MAX_GRID_Y:
            return False
        if seqlens.batch_size != batch or seqlens.max_seqlen_q != seqlen_q or seqlens.max_seqlen_k != seqlen_k:
            return False
        if softmax_lse.dtype != torch.float32 or tuple(softmax_lse.shape) != (batch, heads, seqlen_q):
            return False
        alibi = params.alibi_slopes
        if alibi is not None:
            if alibi.dtype != torch.float32 or alibi.device != q.device:
                return False
            if tuple(alibi.shape) not in ((heads, ), (batch, heads)):
                return False
        if q.numel() == 0 or seqlen_k == 0:
            return True  # forward() fills these without a launch
        return all(tma_view3(t) is not None for t in (q, k, v, out))
    except Exception:  # noqa: BLE001 - anything unexpected: let the Triton kernel handle it
        return False


def forward(q, k, v, out, softmax_lse, params, seqlens, config: Config = None):
    """Fill out (b, sq, h, d) and softmax_lse (b, h, sq) for a call supported() accepts.

    config: a Config instead of default_config (tuning, tests). Returns the launch as a launch.Launch
    over a call's tensors by name: q, k, v, out (TMA descriptors), softmax_lse and alibi (softmax_lse
    where there are no slopes); None where nothing was launched or recorded."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    if batch == 0 or seqlen_q == 0 or num_heads == 0:
        return None
    if seqlen_k == 0:
        out.zero_()
        softmax_lse.fill_(float("inf"))
        return None
    causal = params.window_left < 0 and params.window_right == 0
    cfg = config or default_config(head_dim, causal, seqlen_q, seqlen_k,
                                   params.window_left >= 0 and params.window_right >= 0,
                                   bool(params.softcap) or params.alibi_slopes is not None)
    maxnreg, consumer_regs, producer_regs = register_budget(cfg.num_wg)

    scale = float(params.softmax_scale)
    softcap = float(params.softcap or 0.0)
    if softcap > 0:
        # Scores in log2 units: s = softcap * log2(e) * tanh(qk * scale / softcap); exp2 multiplier 1.
        score_scale, softcap_in, softcap_out = 1.0, scale / softcap, softcap * LOG2E
        alibi_scale = LOG2E
    else:
        # Raw qk; exp2(qk * scale * log2(e) - ...); an ALiBi bias b enters the raw scores as b / scale.
        score_scale, softcap_in, softcap_out = scale * LOG2E, 0.0, 0.0
        alibi_scale = 1.0 / scale if scale != 0 else 0.0
    # Windows past both sequences are unbounded in effect; clamping keeps the kernel's int32 math exact.
    bound = seqlen_q + seqlen_k
    left = min(int(params.window_left), bound) if params.window_left >= 0 else -1
    right = min(int(params.window_right), bound) if params.window_right >= 0 else -1

    alibi = params.alibi_slopes
    if alibi is not None:
        stride_ab, stride_ah = (0, alibi.stride(0)) if alibi.dim() == 1 else alibi.stride()
        alibi_arg = alibi
    else:
        stride_ab = stride_ah = 0
        alibi_arg = softmax_lse  # never read

    q_desc = descriptor(q, WG_M, head_dim)
    o_desc = descriptor(out, WG_M, head_dim)
    k_desc = descriptor(k, cfg.block_n, head_dim)
    v_desc = descriptor(v, cfg.block_n, head_dim)
    tile_m = WG_M * cfg.num_wg
    num_m_blocks = triton.cdiv(seqlen_q, tile_m)
    batch_heads = batch * num_heads
    num_tiles = num_m_blocks * batch_heads
    if not persistent_launch(cfg, left >= 0, softcap > 0, alibi is not None):
        cfg = cfg._replace(persistent=False)
    if cfg.persistent:
        grid = (min(num_tiles, multiprocessor_count(q.device)), )
        # Sections of heads whose K and V (~L2_SECTION_BYTES) stay in L2 while their tiles run.
        kv_bytes = 2 * seqlen_k * head_dim * q.element_size()
        section_heads = max(1, min(batch_heads, L2_SECTION_BYTES // max(kv_bytes, 1)))
    else:
        grid = (num_m_blocks, batch_heads)
        section_heads = 1
    args = (q_desc, k_desc, v_desc, o_desc, softmax_lse, alibi_arg,
            *softmax_lse.stride(), stride_ab, stride_ah,
            seqlen_q, seqlen_k, num_heads, num_heads // num_heads_k, left, right,
            num_tiles, num_m_blocks, section_heads, batch_heads,
            score_scale, softcap_in, softcap_out, alibi_scale)
    constexprs = dict(
        BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, NUM_STAGES=cfg.num_stages,
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
        PINGPONG=bool(cfg.pingpong), NUM_WG=cfg.num_wg, PERSISTENT=bool(cfg.persistent),
        SEPARATE_O=separate_o(head_dim, cfg, q.element_size()), TRIM=bool(cfg.trim),
        CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4, maxnreg=maxnreg)
    descs = dict(q=q_desc, k=k_desc, v=v_desc, out=o_desc)
    sources = (*(("desc", name, d.shape, d.strides) for name, d in descs.items()), "softmax_lse", "alibi")
    recorded = record(_forward_kernel, grid, args, constexprs, slots=range(6))
    return None if recorded is None else Launch(recorded, sources)


_PLANS = Plans()  # launch.call_key -> forward()'s Launch, or None for calls supported() rejects


def try_forward(q, k, v, out, softmax_lse, params, seqlens, return_softmax: bool) -> bool:
    """forward() where supported() accepts the call (True), else nothing (False); the kernels/forward.py
    entry. A call like an earlier one (launch.call_key) skips supported() and Triton's launch path: its
    recorded launch is replayed with this call's tensors (launch.replay_or_record)."""
    if not AVAILABLE or return_softmax or seqlens.is_varlen or params.dropout_p != 0:
        return False
    alibi = params.alibi_slopes
    tensors = (q, k, v, out, softmax_lse) if alibi is None else (q, k, v, out, softmax_lse, alibi)
    key = call_key(tensors, params, seqlens, current_device() if q.is_cuda else None, TRIM_CAUSAL)
    named = dict(q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, alibi=softmax_lse if alibi is None else alibi)
    return replay_or_record(_PLANS, key, named,
                            lambda: supported(q, k, v, out, softmax_lse, params, seqlens, return_softmax),
                            lambda: forward(q, k, v, out, softmax_lse, params, seqlens))


def forward_gluon(q, k, v, softmax_scale=None, causal=False, *, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, block_n=None, num_stages=None, pingpong=None, num_wg=None, persistent=None,
                  trim=None, out=None, lse=None):
    """Convenience entry (scripts, tests): q (b, sq, h, d), k, v (b, sk, hk, d) bf16/fp16 on an sm_90
    GPU. Returns (out (b, sq, h, d), lse (b, h, sq) fp32, natural log). block_n / num_stages /
    pingpong / num_wg / persistent / trim override default_config; out / lse: preallocated outputs (any
    TMA-able strides)."""
    from pyflash.params import AttentionParams, Seqlens

    if not AVAILABLE:
        raise RuntimeError(f"Gluon is not available here (import error {_IMPORT_ERROR!r} or TRITON_INTERPRET=1)")
    batch, seqlen_q, num_heads, head_dim = q.shape
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    left, right = window_size
    if causal:
        right = 0
    params = AttentionParams(softmax_scale, left, right, softcap=softcap,
                             alibi_slopes=None if alibi_slopes is None else alibi_slopes.float())
    seqlens = Seqlens(batch, seqlen_q, k.shape[1])
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if not supported(q, k, v, out, lse, params, seqlens, False):
        raise ValueError("this call is not supported by the Gluon forward (see supported())")
    base = default_config(head_dim, params.is_causal, seqlen_q, k.shape[1],
                          params.window_left >= 0 and params.window_right >= 0,
                          bool(params.softcap) or params.alibi_slopes is not None)
    cfg = Config(block_n or base.block_n, num_stages or base.num_stages, num_wg or base.num_wg,
                 base.pingpong if pingpong is None else bool(pingpong),
                 base.persistent if persistent is None else bool(persistent),
                 base.trim if trim is None else bool(trim))
    forward(q, k, v, out, lse, params, seqlens, cfg)
    return out, lse


# ------------------------------------------------------------------------------------------------
# Offline compilation for sm_90 (no GPU needed): scripts/gluon_compile.py, tests/test_gluon_compile.py.
# Needs a process where TRITON_INTERPRET is off.
# ------------------------------------------------------------------------------------------------

SM90_MAX_SHARED = 232448  # bytes of shared memory a block may use on H100
_SIG_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_signature(head_dim: int, block_n: int, dtype: str = "bf16"):
    """Triton signature of _forward_kernel: Gluon TMA descriptors are typed with their shared layout."""
    torch_dtype = _SIG_DTYPES[dtype]
    q_block, kv_block = [1, WG_M, head_dim], [1, block_n, head_dim]
    q_ty = f"tensordesc<{dtype}{q_block},{smem_layout(q_block, torch_dtype)!r}>"
    kv_ty = f"tensordesc<{dtype}{kv_block},{smem_layout(kv_block, torch_dtype)!r}>"
    sig = dict(q_desc=q_ty, k_desc=kv_ty, v_desc=kv_ty, o_desc=q_ty, lse_ptr="*fp32", alibi_ptr="*fp32",
               score_scale="fp32", softcap_in="fp32", softcap_out="fp32", alibi_scale="fp32")
    return {name: sig.get(name, "constexpr" if name.isupper() else "i32") for name in _forward_kernel.arg_names}


def compile_sm90(head_dim: int, config: Config, dtype: str = "bf16", has_left: bool = False,
                 has_right: bool = False, softcap: bool = False, alibi: bool = False):
    """_forward_kernel compiled for sm_90 with these switches (Triton's CompiledKernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    maxnreg, consumer_regs, producer_regs = register_budget(config.num_wg)
    if not persistent_launch(config, has_left, softcap, alibi):
        config = config._replace(persistent=False)  # what forward() launches for these switches
    constexprs = dict(BLOCK_N=config.block_n, HEAD_DIM=head_dim, NUM_STAGES=config.num_stages, HAS_LEFT=has_left,
                      HAS_RIGHT=has_right, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi, PINGPONG=bool(config.pingpong),
                      NUM_WG=config.num_wg, PERSISTENT=bool(config.persistent),
                      SEPARATE_O=separate_o(head_dim, config, _SIG_DTYPES[dtype].itemsize), TRIM=bool(config.trim),
                      CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs)
    sig = kernel_signature(head_dim, config.block_n, dtype)
    names = list(sig)
    # As a typical launch specialises them: torch's pointers 16-byte aligned, lse's last stride 1.
    attrs = {(names.index("lse_ptr"), ): [["tt.divisibility", 16]],
             (names.index("alibi_ptr"), ): [["tt.divisibility", 16]]}
    src = GluonASTSource(_forward_kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def offline_report(head_dim: int, config=None, dtype: str = "bf16", **flags):
    """compile_sm90 + ptxas_stats as a plain dict (what tests/test_gluon_compile.py checks):
    shared (bytes), regs, spill_stores, spill_loads, warnings."""
    if config is None:
        config = default_config(head_dim, flags.get("has_right", False) and not flags.get("has_left", False),
                                two_sided_window=flags.get("has_left", False) and flags.get("has_right", False),
                                softcap_or_alibi=flags.get("softcap", False) or flags.get("alibi", False))
    config = Config(*config)
    compiled = compile_sm90(head_dim, config, dtype, **flags)
    stats = ptxas_stats(compiled.asm["ptx"])
    return dict(shared=compiled.metadata.shared, regs=stats["regs"], spill_stores=stats["spill_stores"],
                spill_loads=stats["spill_loads"], warnings=stats["warnings"], ptxas_ok=stats["returncode"] == 0,
                config=list(config))
