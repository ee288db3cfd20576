"""FlashAttention-3-style backward for Hopper (sm_90) written in Gluon (prototype).

Three launches:

1. ``_preprocess_kernel`` (plain Triton): delta = rowsum(dO * O) and lse2 = log2(e) * lse, written to
   two (batch * heads, seqlen_pad) fp32 buffers, seqlen_pad a multiple of BLOCK_M. Padding rows get
   delta = 0, lse2 = +inf (so their P is exactly 0): the main kernel loads both without masks. It also
   zeroes the fp32 dQ accumulator (no fill launch of its own).
2. ``_backward_kernel`` (Gluon, warp-specialized): one CTA per (key block of BLOCK_N = 128 keys,
   batch * head). dQ is accumulated in an fp32 (batch, seqlen, heads, head_dim) buffer by TMA
   reduce-add (``cp.reduce.async.bulk.tensor .add``).
3. ``_dq_convert_kernel`` (plain Triton): dq = softmax_scale * dq_accum in the output dtype.

Partitions of the main kernel (``gl.warp_specialize``):

* producer (1 warp, few registers): TMA loads of K and V (once: the CTA's 128 keys) and of the
  Q_i, dO_i tiles of every query block i that sees the key block, through a NUM_STAGES-deep ring.
* consumer 0 (default partition, 4 warps = one warpgroup) and consumer 1 (worker, 4 warps): consumer
  w owns keys [64 w, 64 w + 64) of the block and its dK, dV accumulators (64 x head_dim fp32 each) in
  registers. Per query block, with the keys-first ("transposed") orientation so that P and dS feed
  the dV / dK GEMMs straight from registers:

      S^T  = K_w Q^T          (wgmma SS, async)      dP^T = V_w dO^T   (wgmma SS, async)
      P^T  = exp2(S^T * scale * log2e - lse2)        (under the dP GEMM)
      dV_w += P^T dO          (wgmma RS, async)      dS^T = P^T * (dP^T - delta)
      dK_w += dS^T Q          (wgmma RS, async)      dS^T -> shared memory (this WG's 64 rows)
      dQ[:, half w] = dS K[:, half w]    (wgmma SS over all 128 keys: needs both WGs' dS^T rows)
      dQ half -> shared memory (fp32) -> TMA reduce-add into dq_accum (clipped at the sequence end)

  Both warpgroups split the dQ GEMM by head_dim columns, so each dQ tile is reduced into global
  memory once per CTA (not once per warpgroup) and each warpgroup holds only BLOCK_M x head_dim / 2
  fp32 of it.

Barriers (mbarriers in shared memory):

* ``kv_ready``               producer -> consumers: K and V have landed (transaction count).
* ``q_ready/do_ready[s]``    producer -> consumers: Q_i (with the lse2 / delta / query-index rows of
  block i, one [1, 4, BLOCK_M] fp32 TMA box) / dO_i of ring stage s have landed.
* ``stage_empty[s]``         consumers -> producer: both warpgroups are done with stage s (count 2).
* ``ds_ready[b]``            consumer <-> consumer: both halves of dS^T for the step are in shared
  memory buffer b (count 2; two buffers so that a warpgroup may write the next step's dS while the
  other still reads this one in its dQ GEMM; the barrier chain keeps them at most one step apart).
* The dQ staging buffer of a warpgroup is reused after ``tma.store_wait`` on its previous reduce.

What overlaps: the producer's TMA loads of the next stages with everything; within a warpgroup the
exp2 of P with the dP GEMM, and dS with the dV GEMM, and the dQ GEMM with the dK GEMM; the TMA
reduce of step i's dQ with step i+1; and the two warpgroups' GEMMs with each other's element-wise
work (they are not forced to alternate).

Features: GQA/MQA (one CTA per (key block, kv head): its steps run over the query blocks of every
query head of the group, dK/dV summed in registers), any seqlen_q / seqlen_k, causal bottom-right
aligned (query i sees keys j <= i + seqlen_k - seqlen_q). Query blocks that see none of the CTA's keys
are skipped (the loop starts at the block holding the first query that sees the first key). By default
every causal step applies the mask (a no-op past the diagonal) in one loop body; the query positions
are read from shared memory (a third row of the stats TMA box) because an iota would be hoisted out of
the loop and hold 16-32 registers. SPLIT_MASK keeps separate masked / unmasked loops (spills at
d=128). Ragged ends: TMA reads zeros past a sequence's end; padded query rows have P = 0 (lse +inf);
padded keys are masked (causal) or get a -inf bias (non-causal) so no P of theirs can overflow into dQ;
the dQ reduce is clipped at the sequence end; dK/dV rows past seqlen_k are not stored.

Variants (Config, selectable for tuning: tuning_candidates, scripts/gluon_backward_check.py --sweep):
acc_init (-lse/scale and -delta as the initial wgmma accumulators of S^T, dP^T: the stats registers
are live only before the GEMMs; no per-element subtraction), dq_bufs=2 (double-buffered dQ staging:
store_wait(1)), num_stages, lpt (causal: grid with key blocks slowest, heaviest blocks first),
dq_early (after the dS exchange the dQ GEMM is issued before the dK GEMM, and dK, which reads Q, runs
under the dQ store / reduce; the stage is released after dK), dq_own (no dS exchange: each warpgroup
writes its dS^T to its own shared buffer, takes dK from it (SS) and computes its own keys' contribution
to all of dQ, in parts of <= 64 columns, each reduced by its own TMA reduce-add: the warpgroups never
wait for each other, at the price of twice the reduce traffic; clean at d=64, one 4-byte spill at
d=128), wgs=3 (with dq_own: three consumer warpgroups, 192 keys per CTA, K / V as one 64-row box each;
spills at the 160 registers four warpgroups leave: not a tuning candidate).

Head dim 256 (split_d; dK and dV of 64 keys x 256 columns would need 256 registers a thread, and
128 keys of K and V 128 KB of shared memory): one CTA per 64 keys. Both consumer warpgroups compute
S^T and dP^T over all 64 keys (the same tiles, twice: 7 GEMM units a step instead of 5, but no
exchange of P or dS between them) and each owns one half of head_dim's columns: dV[:, half] += P^T dO[:,
half], dK[:, half] += dS^T Q[:, half] (dS^T from its own shared buffer), dQ[:, half] = dS K[:, half] in
parts of 64 columns through its own staging buffer. dO has one buffer (released by ``ds_ready[0]`` once
both warpgroups' dV GEMMs have read it, refilled under the rest of the step), Q two: 210 KB of shared
memory. K and V are taken from their buffers through an index the compiler cannot fold (an inline-asm
zero), so their wgmma descriptors are rebuilt each step rather than hoisted and spilled. Its cost at
s=4096 (H200, scripts/probe_backward256.py): 4.48 ms, of which the dQ reduce-adds (twice the traffic
per FLOP of the 128-key layout) take 1.16 ms and all of dQ 1.8 ms. Without dQ (two_pass_config), coop
(Config.coop, _coop_step; two_pass_config's at d=256) computes S^T in warpgroup 0 and dP^T in warpgroup 1
only, and hands P^T and dS^T across through the two dS buffers: 4 GEMM units a step instead of 6, for four
mbarrier hand-offs a step: 0.70-0.84x split_d's time (H100, bf16).

Persistent grid (Config.persistent, a tuning variant): one CTA per SM loops over key-block tiles
(_tile, _tile_info; _consumer_tile is one tile of a consumer warpgroup). A step's ring position is
ring + t (the CTA's steps of earlier tiles plus the step), so the Q / dO ring, the dS exchange barriers and
the dQ staging buffers run on across tiles; kv_empty (consumers -> producer) releases K / V, after the
producer has already loaded the next tile's first Q / dO stages. Measured slower than one tile per CTA
(H100: -4% non-causal, -31 to -35% causal at d=128 s=512 / 1024), so no default takes it.

rotate (non-causal, Config.rotate): key block j walks the query blocks from rot(j) = j * n_m // n_kblk
and wraps around, so that the CTAs running at once add into different dQ tiles (the deterministic
mode's order, below). At d=256 with acc_init it measured +15% (bf16); at d=128 no gain.

Tensors: q, k, v, dout TMA-readable (batch, seqlen, heads, head_dim) (3-D descriptors over the
(batch, seqlen, heads * head_dim) view); out, lse, dq, dk, dv, softmax_d through their strides.

Deterministic mode (DETERMINISTIC, backward(deterministic=True)): the TMA reduce-adds into a dQ tile
(query block, half) happen in a fixed order of key blocks, kept by one int32 counter per tile in global
memory: a warpgroup spins until the counter equals its rank (_turn_rank) and adds; at its next step,
the reduce having had that step's GEMMs to complete, it waits for the writes and increments the
counter (release). Measured 0.6x of the default (benchmarks/RESULTS.md), so kernels/backward.py keeps
deterministic calls on the Triton kernels; backward_gluon(..., deterministic=True) selects it. The order is the one in which the key blocks reach the
tile when they all run at once (causal: descending key block; non-causal: each CTA starts at its own
query block, rot(j) = j * n_m // n_kblk, and wraps around), so in the steady state nobody waits; with
more key blocks than SMs (not all resident: that order could wait for a CTA not yet launched) the order
is ascending key block, which waits only for CTAs launched earlier (deterministic_mode).

Entry points: supported() / backward() (the backend contract of kernels/backward.py), try_backward()
(recorded launches), backward_gluon() (scripts), compile_sm90() /
offline_report() (scripts/gluon_backward_compile.py, tests/test_gluon_backward_compile.py).
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from pyflash.kernels.aot import ptxas_stats
from pyflash.kernels.common import device_capability, multiprocessor_count
from pyflash.kernels.gluon_forward import smem_layout, tma_view3
from pyflash.kernels.launch import Plans, call_key, current_device, launch_into, replay_or_record

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None

try:  # Gluon ships with triton >= 3.5; nothing here may fail on a CPU-only machine.
    from triton._C.libtriton import ir as _ir
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language._core import builtin as _gl_builtin
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    if not hasattr(_ir, "DESCRIPTOR_REDUCE_KIND"):
        raise ImportError("this Triton has no TMA reduce")
    _IMPORT_ERROR = None
except Exception as error:  # noqa: BLE001 - any failure means "not available"
    _IMPORT_ERROR = error

# Importable and compilable (the interpreter cannot run Gluon); the kernel itself needs sm_90.
AVAILABLE = _IMPORT_ERROR is None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

LOG2E = math.log2(math.e)
WG_N = 64  # keys per consumer warpgroup
BLOCK_N = 2 * WG_N  # keys per CTA (two consumer warpgroups)
CONSUMER_REGS = 240  # setmaxnreg of the consumer worker warpgroup
PRODUCER_REGS = 24
DQ_MAX = 64  # dq_own: columns per dQ GEMM / reduce (head_dim // DQ_MAX of them, one after the other)
MAXNREG = 168  # 65536 registers / (3 warpgroups * 128 threads), rounded down to a multiple of 8


if _IMPORT_ERROR is None:

    @_gl_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """cp.reduce.async.bulk.tensor .add: global[coord box] += shared src (a bulk async group:
        tma.store_wait covers it). Triton 3.6 has the op but no Gluon wrapper for Hopper."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, batch, start_n, kv_col, KV_BOXES: gl.constexpr):
        """K and V of the CTA's key block (one barrier, transaction count)."""
        if KV_BOXES == 1:
            mbarrier.expect(kv_ready.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [batch, start_n, kv_col], kv_ready.index(0), k_smem)
            tma.async_copy_global_to_shared(v_desc, [batch, start_n, kv_col], kv_ready.index(0), v_smem)
        else:
            # One box of K and V per consumer warpgroup.
            rows: gl.constexpr = k_desc.block_type.shape[1]
            mbarrier.expect(kv_ready.index(0), KV_BOXES * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
            for i in gl.static_range(KV_BOXES):
                tma.async_copy_global_to_shared(k_desc, [batch, start_n + i * rows, kv_col], kv_ready.index(0),
                                                k_smem.index(i))
                tma.async_copy_global_to_shared(v_desc, [batch, start_n + i * rows, kv_col], kv_ready.index(0),
                                                v_smem.index(i))

    @gluon.jit
    def _load_step(g, t, q_desc, do_desc, st_desc, q_smem, do_smem, st_smem, q_ready, do_ready, stage_empty, do_free,
                   batch, head0, num_heads, m_lo, n_steps, rot, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                   NUM_STAGES: gl.constexpr, ROTATE: gl.constexpr, ONE_DO: gl.constexpr):
        """Q, dO and the stats rows of step t of the tile into ring position g (t without a persistent grid)."""
        stage = g % NUM_STAGES
        # Fresh mbarriers count as having completed the phase before phase 0.
        phase = ((g // NUM_STAGES) & 1) ^ 1
        head = head0 + t // n_steps
        m0 = (m_lo + _step_block(t, n_steps, rot, ROTATE)) * BLOCK_M
        col = head * HEAD_DIM
        mbarrier.wait(stage_empty.index(stage), phase)
        # Q_i with the stats rows of its queries: both are needed to form P.
        mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes + st_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [batch, m0, col], q_ready.index(stage), q_smem.index(stage))
        tma.async_copy_global_to_shared(st_desc, [batch * num_heads + head, 0, m0], q_ready.index(stage),
                                        st_smem.index(stage))
        if ONE_DO:
            # One dO buffer: dO_i goes in once both warpgroups' dV GEMMs of step i - 1 have read it
            # (do_free), under the rest of that step (dK, dQ).
            mbarrier.wait(do_free.index(0), (g & 1) ^ 1)
            mbarrier.expect(do_ready.index(0), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [batch, m0, col], do_ready.index(0), do_smem.index(0))
        else:
            mbarrier.expect(do_ready.index(stage), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [batch, m0, col], do_ready.index(stage), do_smem.index(stage))

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem, kv_ready,
                  q_ready, do_ready, stage_empty, do_free, batch, head0, num_heads, kv_col, start_n, m_lo, n_steps,
                  n_total, rot, kv_empty, seqlen_q, seqlen_k, num_heads_k, num_tiles, n_kblk,
                  BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                  KV_BOXES: gl.constexpr, ROTATE: gl.constexpr, ONE_DO: gl.constexpr, CAUSAL: gl.constexpr,
                  PERSISTENT: gl.constexpr, LPT: gl.constexpr):
        if PERSISTENT:
            # Per tile: the first NUM_STAGES steps' Q / dO as the previous tile's last steps free their stages,
            # then K / V once both consumers are done with the previous tile's (kv_empty), then the rest.
            BLOCK_N_: gl.constexpr = k_desc.block_type.shape[1] * KV_BOXES
            group = num_heads // num_heads_k
            ring = 0
            tile_iter = 0
            for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
                t_blk, t_start, t_batch, t_head_k, t_head0, t_kv_col, t_m_lo, t_steps, t_masked, t_rot = _tile(
                    tile, num_tiles, n_kblk, seqlen_q, seqlen_k, num_heads, num_heads_k, BLOCK_M, BLOCK_N_, HEAD_DIM,
                    CAUSAL, LPT)
                t_total = group * t_steps
                n_early = gl.minimum(t_total, NUM_STAGES)
                for t in range(0, n_early):
                    _load_step(ring + t, t, q_desc, do_desc, st_desc, q_smem, do_smem, st_smem, q_ready, do_ready,
                               stage_empty, do_free, t_batch, t_head0, num_heads, t_m_lo, t_steps, t_rot, BLOCK_M,
                               HEAD_DIM, NUM_STAGES, ROTATE, ONE_DO)
                mbarrier.wait(kv_empty.index(0), (tile_iter & 1) ^ 1)
                _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, t_batch, t_start, t_kv_col, KV_BOXES)
                for t in range(n_early, t_total):
                    _load_step(ring + t, t, q_desc, do_desc, st_desc, q_smem, do_smem, st_smem, q_ready, do_ready,
                               stage_empty, do_free, t_batch, t_head0, num_heads, t_m_lo, t_steps, t_rot, BLOCK_M,
                               HEAD_DIM, NUM_STAGES, ROTATE, ONE_DO)
                ring += t_total
                tile_iter += 1
        else:
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, batch, start_n, kv_col, KV_BOXES)
            # Steps run over the query heads of the kv head's group (GQA), each over its query blocks.
            for t in range(n_total):
                _load_step(t, t, q_desc, do_desc, st_desc, q_smem, do_smem, st_smem, q_ready, do_ready, stage_empty,
                           do_free, batch, head0, num_heads, m_lo, n_steps, rot, BLOCK_M, HEAD_DIM, NUM_STAGES, ROTATE,
                           ONE_DO)

    @gluon.jit
    def _tile(tile, num_tiles, n_kblk, seqlen_q, seqlen_k, num_heads, num_heads_k, BLOCK_M: gl.constexpr,
              BLOCK_N_: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, LPT: gl.constexpr):
        """Persistent grid: tile -> its key block n_blk of (batch, kv head) bhk, and _tile_info's scalars of
        it. LPT (causal): key blocks slowest, so that the heaviest (first) key block of every head comes
        before any second one; else the key blocks of a head next to each other (its Q / dO shared in L2)."""
        batch_heads_k = num_tiles // n_kblk
        if LPT:
            n_blk = tile // batch_heads_k
            bhk = tile - n_blk * batch_heads_k
        else:
            bhk = tile // n_kblk
            n_blk = tile - bhk * n_kblk
        start_n, batch, head_k, head0, kv_col, m_lo, n_steps, n_masked, rot = _tile_info(
            n_blk, bhk, seqlen_q, seqlen_k, num_heads, num_heads_k, BLOCK_M, BLOCK_N_, HEAD_DIM, CAUSAL)
        return n_blk, start_n, batch, head_k, head0, kv_col, m_lo, n_steps, n_masked, rot

    @gluon.jit
    def _tile_info(n_blk, bhk, seqlen_q, seqlen_k, num_heads, num_heads_k, BLOCK_M: gl.constexpr,
                   BLOCK_N_: gl.constexpr, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr):
        """The scalars of key block n_blk of (batch, kv head) bhk: (start_n, batch, head_k, head0 (its first
        query head), kv_col, m_lo, n_steps, n_masked, rot). Query blocks from m_lo on see the block (causal:
        bottom-right alignment, query i sees keys j <= i + seqlen_k - seqlen_q, so from the block holding the
        first query that sees the block's first key); the first n_masked of them cross the diagonal (those
        before the first query that sees the block's last key). rot: the first query block of ROTATE's walk."""
        start_n = n_blk * BLOCK_N_
        batch = bhk // num_heads_k
        head_k = bhk % num_heads_k
        head0 = head_k * (num_heads // num_heads_k)
        n_m = gl.cdiv(seqlen_q, BLOCK_M)
        if CAUSAL:
            diag = seqlen_k - seqlen_q
            m_lo = gl.minimum(gl.maximum(start_n - diag, 0) // BLOCK_M, n_m)
            n_steps = n_m - m_lo
            n_masked = gl.minimum(n_steps, gl.maximum(gl.cdiv(gl.maximum(start_n + BLOCK_N_ - 1 - diag, 0),
                                                              BLOCK_M) - m_lo, 0))
        else:
            m_lo = 0
            n_steps = n_m
            n_masked = 0
        rot = (n_blk * n_m) // gl.cdiv(seqlen_k, BLOCK_N_)
        return start_n, batch, head_k, head0, head_k * HEAD_DIM, m_lo, n_steps, n_masked, rot

    @gluon.jit
    def _step_block(t, n_steps, rot, ROTATE: gl.constexpr):
        """Which of the CTA's query blocks (from m_lo) step t of a head runs: in order, or (ROTATE) starting
        at block rot and wrapping around."""
        step = t % n_steps
        if ROTATE:
            step = (step + rot) % n_steps
        return step

    @gluon.jit
    def _turn_rank(m_idx, rank_a, rank_b, n_m, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   DETERMINISTIC: gl.constexpr):
        """Deterministic dQ: how many key blocks add their dQ into query block m_idx before this CTA's (key
        block j; rank_a, rank_b from _turn_params). DETERMINISTIC 1 (every key block of a head resident at
        once): in the order they reach the block, by descending key block from the last one that sees it
        (causal: key block j starts at query block m_lo(j), nondecreasing in j; non-causal: at block
        rot(j) = j * n_m // n_kblk, wrapping around), so nobody waits in the steady state.
        DETERMINISTIC 2 (more key blocks than SMs): ascending key block, so a CTA only ever waits for
        one launched before it."""
        if DETERMINISTIC == 2:
            rank = rank_b
        elif CAUSAL:
            # min(n_kblk - 1, last key block whose m_lo <= m_idx) - j, as min(a, (m_idx * BLOCK_M + b) // BLOCK_N).
            rank = gl.minimum(rank_a, (m_idx * BLOCK_M + rank_b) // BLOCK_N)
        else:
            # rank_a = n_kblk, rank_b = j: (min(n_kblk - 1, last key block with rot <= m_idx) - j) mod n_kblk.
            last = gl.minimum(rank_a - 1, (m_idx * rank_a + rank_a - 1) // n_m)
            rank = last - rank_b
            rank = gl.where(rank < 0, rank + rank_a, rank)
        return rank

    @gluon.jit
    def _turn_params(kblk, n_kblk, diag, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                     DETERMINISTIC: gl.constexpr):
        """The two per-CTA scalars _turn_rank needs (few live registers in the consumers' loop)."""
        if DETERMINISTIC == 2:
            rank_a = n_kblk
            rank_b = kblk
        elif CAUSAL:
            rank_a = n_kblk - 1 - kblk
            rank_b = BLOCK_M + diag - 1 - BLOCK_N * kblk
        else:
            rank_a = n_kblk
            rank_b = kblk
        return rank_a, rank_b

    @gluon.jit
    def _turn_counter(counters, t, m_lo, n_steps, n_m, rot, WG: gl.constexpr, ROTATE: gl.constexpr):
        """The counter of step t's dQ tile (query head of the group, query block, this warpgroup's half)."""
        return counters + ((t // n_steps) * n_m + m_lo + _step_block(t, n_steps, rot, ROTATE)) * 2 + WG

    @gluon.jit
    def _turn_wait(counter, rank):
        """Spin until the counter (global int32) reaches rank; then read it once more with acquire semantics,
        a proxy fence (generic -> async: the TMA reduce that follows is an async-proxy access) and a
        warpgroup barrier, so that whichever thread issues the reduce is ordered after the ones counted."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        ptrs = counter + gl.zeros([128], gl.int32, layout)
        seen = gl.min(gl.load(ptrs, volatile=True), axis=0)
        while seen < rank:
            seen = gl.min(gl.load(ptrs, volatile=True), axis=0)
        gl.atomic_add(ptrs, gl.zeros([128], gl.int32, layout), sem="acquire", scope="gpu")
        gl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r,l", [counter], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.thread_barrier()

    @gluon.jit
    def _turn_pass(counter):
        """Once this warpgroup's TMA reduce has completed (its writes, not only its reads of shared memory:
        tma.store_wait waits for the latter only), counter += 1 by one thread with release semantics."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        lanes = gl.arange(0, 128, layout=layout)
        gl.inline_asm_elementwise("cp.async.bulk.wait_group 0; fence.proxy.async.global; mov.u32 $0, 0;", "=r,l",
                                  [counter], dtype=gl.int32, is_pure=False, pack=1)
        gl.thread_barrier()
        gl.atomic_add(counter + lanes * 0, gl.full([128], 1, gl.int32, layout), mask=lanes == 0, sem="release",
                      scope="gpu")

    @gluon.jit
    def _dq_reduce(dq, dq_smem, index, dq_desc, batch, m0, col, PENDING: gl.constexpr, counter=None, rank=0,
                   prev_counter=None, has_prev=False, ORDERED: gl.constexpr = False):
        """dQ part: registers -> shared (after the reduce that last read that buffer: at most PENDING newer
        bulk groups of this warpgroup may still run) -> TMA reduce-add into global memory. ORDERED
        (deterministic): first the previous step's turn (prev_counter, when has_prev) is passed on, its
        reduce having had this step's GEMMs to complete (waiting for it right after issuing it stalled the
        warpgroup: 0.58x); then the reduce waits for its own turn on counter (rank). Nothing is held while
        waiting. The last step's turn is passed on after the loop (_consumer)."""
        tma.store_wait(PENDING)
        gl.thread_barrier()
        dq_buf = dq_smem.index(index)
        dq_buf.reshape([dq.shape[0], dq.shape[1]]).store(dq)
        fence_async_shared()
        gl.thread_barrier()
        if ORDERED:
            if has_prev:
                _turn_pass(prev_counter)
            _turn_wait(counter, rank)
        _tma_reduce_add(dq_desc, [batch, m0, col], dq_buf)

    @gluon.jit
    def _dq_part(ds_w, k_cols, dq_layout: gl.constexpr, dq_smem, index, dq_desc, batch, m0, col,
                 PENDING: gl.constexpr):
        """A further column part of dQ (the first runs under the dK GEMM): dS K[:, part] from this
        warpgroup's dS^T buffer, waited for, then _dq_reduce'd through staging buffer ``index``."""
        BLOCK_M: gl.constexpr = ds_w.shape[1]
        DQ_COLS: gl.constexpr = k_cols.shape[1]
        dq_tok = warpgroup_mma(ds_w.permute((1, 0)), k_cols, gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout),
                               use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
        _dq_reduce(dq, dq_smem, index, dq_desc, batch, m0, col, PENDING)

    @gluon.jit
    def _s_init(stats, key0, kbias, s_layout: gl.constexpr, BLOCK_M: gl.constexpr, WG_ROWS: gl.constexpr,
                MASKED: gl.constexpr, KEY_BIAS: gl.constexpr):
        """ACC_INIT: S^T's initial accumulator, -lse / scale per query (-inf where masked, the key bias
        added where KEY_BIAS)."""
        row_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        nlse = stats.slice(0, BLOCK_M).load(row_layout)
        if MASKED:
            queries = stats.slice(2 * BLOCK_M, BLOCK_M).load(row_layout)
            keys = (key0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))).to(gl.float32)
            s_init = gl.where(queries[None, :] >= keys[:, None], nlse[None, :], float("-inf"))
        elif KEY_BIAS:
            s_init = kbias[:, None] + nlse[None, :]
        else:
            s_init = gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout) + nlse[None, :]
        return s_init

    @gluon.jit
    def _probs_t(s, stats, key0, kbias, qk_scale, s_layout: gl.constexpr, BLOCK_M: gl.constexpr,
                 WG_ROWS: gl.constexpr, MASKED: gl.constexpr, KEY_BIAS: gl.constexpr):
        """Without ACC_INIT: P^T = exp2(S^T * scale * log2(e) - lse * log2(e)) (the key bias added where
        KEY_BIAS; 0 where masked)."""
        row_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        lse2 = stats.slice(0, BLOCK_M).load(row_layout)
        if KEY_BIAS:
            p = gl.exp2(s * qk_scale - (lse2[None, :] - kbias[:, None]))
        else:
            p = gl.exp2(s * qk_scale - lse2[None, :])
        if MASKED:
            # The query positions come from shared memory (the third stats row, as floats): an iota
            # here would be hoisted out of the loop by the compiler and hold 16-32 registers throughout.
            queries = stats.slice(2 * BLOCK_M, BLOCK_M).load(row_layout)
            keys = (key0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))).to(gl.float32)
            p = gl.where(queries[None, :] >= keys[:, None], p, 0.0)
        return p

    @gluon.jit
    def _step(t, ring, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem, dq_desc, q_ready, do_ready,
              stage_empty, ds_ready, key0, kbias, batch, head0, m_lo, n_steps, qk_scale, rot, counters, rank_a,
              rank_b, n_m, s_layout: gl.constexpr, dq_layout: gl.constexpr, op_layout: gl.constexpr,
              BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
              MASKED: gl.constexpr, KEY_BIAS: gl.constexpr, ACC_INIT: gl.constexpr, DQ_BUFS: gl.constexpr,
              DQ_OWN: gl.constexpr, DQ_EARLY: gl.constexpr, CAUSAL: gl.constexpr, DETERMINISTIC: gl.constexpr,
              SPLIT_D: gl.constexpr, ROTATE: gl.constexpr, NO_DQ: gl.constexpr):
        """One query block (step t of the tile): dV, dK += ..., dQ partial reduced into global memory (not with
        NO_DQ). ring: steps of earlier tiles of this CTA (persistent grid; else 0): the ring stages, barrier
        phases and staging buffers run on across tiles (index g = ring + t), the coordinates come from t."""
        HALF: gl.constexpr = HEAD_DIM // 2
        if SPLIT_D:
            # k_w, v_w are the [1, rows, HEAD_DIM] K / V buffers, indexed here by a zero the compiler cannot
            # see through: otherwise it hoists every wgmma descriptor of these loop-invariant tiles (16
            # k-steps each at d=256, 64 bits apiece) out of the loop and spills them.
            zero = gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [t], dtype=gl.int32, is_pure=False, pack=1)
            k_w = k_w.index(zero)
            v_w = v_w.index(zero)
            k_half = k_w.slice(WG * HALF, HALF, dim=1)
        WG_ROWS: gl.constexpr = k_w.shape[0]
        # Columns of dQ per GEMM / reduce: its half (dS shared by the warpgroups) or, DQ_OWN (this
        # warpgroup's own keys' contribution to all of dQ), at most 64 (DQ_PARTS GEMMs one after the other);
        # SPLIT_D: this warpgroup's half of head_dim, in parts of at most 64.
        DQ_COLS: gl.constexpr = dq_desc.block_type.shape[2]  # the host's dq_box_cols
        DQ_PARTS: gl.constexpr = (HALF // DQ_COLS) if SPLIT_D else (HEAD_DIM // DQ_COLS if DQ_OWN else 1)
        dtype: gl.constexpr = q_smem.dtype
        g = t + ring
        stage = g % NUM_STAGES
        phase = (g // NUM_STAGES) & 1
        # SPLIT_D with dQ keeps one dO buffer (the producer refills it once both warpgroups' dV GEMMs are
        # done); without dQ the shared memory of dQ's staging holds a dO ring like Q's.
        ONE_DO: gl.constexpr = SPLIT_D and not NO_DQ
        do_stage = 0 if ONE_DO else stage
        do_phase = (g & 1) if ONE_DO else phase
        m_idx = m_lo + _step_block(t, n_steps, rot, ROTATE)
        m0 = m_idx * BLOCK_M
        dq_col = (head0 + t // n_steps) * HEAD_DIM + (0 if DQ_OWN else WG * HALF)
        q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        do = do_smem.index(do_stage).reshape([BLOCK_M, HEAD_DIM])
        if SPLIT_D:
            # B operands of the dK / dV GEMMs: this warpgroup's columns of Q and dO.
            q_b = q.slice(WG * HALF, HALF, dim=1)
            do_b = do.slice(WG * HALF, HALF, dim=1)
        else:
            q_b = q
            do_b = do
        # The [1, 4, BLOCK_M] TMA box (no swizzle; row 3 unused: boxes are powers of 2) read as 4 * BLOCK_M
        # contiguous floats: rows (lse term, delta term, query position).
        stats = st_smem.index(stage)._reinterpret(gl.float32, [4 * BLOCK_M],
                                                  gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        row_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

        mbarrier.wait(q_ready.index(stage), phase)
        if ACC_INIT:
            # The row statistics enter through the wgmma accumulators (use_acc): S^T starts at
            # -lse / scale (-inf where masked), dP^T at -delta. Their registers are live only here,
            # before the GEMMs, instead of across the element-wise work at the register peak.
            s_init = _s_init(stats, key0, kbias, s_layout, BLOCK_M, WG_ROWS, MASKED, KEY_BIAS)
            s_tok = warpgroup_mma(k_w, q.permute((1, 0)), s_init, use_acc=True, is_async=True)
            ndelta = stats.slice(BLOCK_M, BLOCK_M).load(row_layout)
            dp_init = gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout) + ndelta[None, :]
            mbarrier.wait(do_ready.index(do_stage), do_phase)
            dp_tok = warpgroup_mma(v_w, do.permute((1, 0)), dp_init, use_acc=True, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            p = gl.exp2(s * qk_scale)
        else:
            s_tok = warpgroup_mma(k_w, q.permute((1, 0)), gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout),
                                  use_acc=False, is_async=True)
            mbarrier.wait(do_ready.index(do_stage), do_phase)
            dp_tok = warpgroup_mma(v_w, do.permute((1, 0)), gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout),
                                   use_acc=False, is_async=True)
            # wgmma groups retire in order: one outstanding means S^T is done, dP^T may still run.
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            p = _probs_t(s, stats, key0, kbias, qk_scale, s_layout, BLOCK_M, WG_ROWS, MASKED, KEY_BIAS)
        p = p.to(dtype)  # dS below uses the rounded P too, as PyTorch's softmax backward does: fewer registers
        p_op = gl.convert_layout(p, op_layout)
        dv_tok = warpgroup_mma(p_op, do_b, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=(dp_tok, ))
        if ACC_INIT:
            ds = (p.to(gl.float32) * dp).to(dtype)
        else:
            delta = stats.slice(BLOCK_M, BLOCK_M).load(row_layout)
            ds = (p.to(gl.float32) * (dp - delta[None, :])).to(dtype)
        if SPLIT_D and NO_DQ:
            # dK, dV only (dQ comes from another pass): dS^T through this warpgroup's own buffer for dK (SS).
            ds_w = ds_smem.index(WG + zero)
            ds_w.store(ds)
            fence_async_shared()
            gl.thread_barrier()
            dk_tok = warpgroup_mma(ds_w, q_b, dk, is_async=True)
            dv, dk, p_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op))
            mbarrier.arrive(stage_empty.index(stage))
        elif SPLIT_D:
            # Both warpgroups hold the same dS^T (the CTA's keys): each writes it to its own buffer (no
            # exchange), takes dK from there (SS) and computes its half of dQ's columns, in DQ_PARTS parts
            # through DQ_BUFS staging buffers of its own.
            ds_w = ds_smem.index(WG + zero)
            ds_w.store(ds)
            fence_async_shared()
            gl.thread_barrier()
            dq_tok = warpgroup_mma(ds_w.permute((1, 0)), k_half.slice(0, DQ_COLS, dim=1),
                                   gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout), use_acc=False,
                                   is_async=True)
            dk_tok = warpgroup_mma(ds_w, q_b, dk, is_async=True)
            dv, dq, p_op = warpgroup_mma_wait(1, deps=(dv_tok, dq_tok, p_op))
            # dP^T and dV, the only readers of dO, are done: the producer may refill its buffer.
            mbarrier.arrive(ds_ready.index(0))
            _dq_reduce(dq, dq_smem, WG * DQ_BUFS + (g * DQ_PARTS) % DQ_BUFS, dq_desc, batch, m0, dq_col,
                       DQ_BUFS - 1)
            dk = warpgroup_mma_wait(0, deps=(dk_tok, ))
            mbarrier.arrive(stage_empty.index(stage))
            for part in gl.static_range(1, DQ_PARTS):
                _dq_part(ds_w, k_half.slice(part * DQ_COLS, DQ_COLS, dim=1), dq_layout, dq_smem,
                         WG * DQ_BUFS + (g * DQ_PARTS + part) % DQ_BUFS, dq_desc, batch, m0, dq_col + part * DQ_COLS,
                         DQ_BUFS - 1)
        elif NO_DQ:
            # dK, dV only (dQ comes from another pass): dS^T stays in registers as dK's A operand; no
            # exchange between the warpgroups.
            ds_op = gl.convert_layout(ds, op_layout)
            dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
            dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
            mbarrier.arrive(stage_empty.index(stage))
        elif DQ_OWN:
            # dQ += dS_w K_w over this warpgroup's own keys only (full head_dim, its own TMA reduce): no
            # exchange with the other warpgroups. dS^T -> this warpgroup's own dS buffer (the previous
            # step's dQ / dK GEMMs, which read it, were waited for before the barriers of its dQ store).
            # dK takes dS^T from there too (SS): no register copy of dS^T is live across the GEMMs.
            ds_w = ds_smem.index(WG)
            ds_w.store(ds)
            fence_async_shared()
            gl.thread_barrier()
            base = WG * DQ_PARTS * DQ_BUFS + (g % DQ_BUFS) * DQ_PARTS
            dq_tok = warpgroup_mma(ds_w.permute((1, 0)), k_w.slice(0, DQ_COLS, dim=1),
                                   gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout), use_acc=False,
                                   is_async=True)
            dk_tok = warpgroup_mma(ds_w, q, dk, is_async=True)
            # dV and dQ (part 0) done; dK still runs under the dQ store.
            dv, dq, p_op = warpgroup_mma_wait(1, deps=(dv_tok, dq_tok, p_op))
            _dq_reduce(dq, dq_smem, base, dq_desc, batch, m0, dq_col, DQ_PARTS * DQ_BUFS - 1)
            dk = warpgroup_mma_wait(0, deps=(dk_tok, ))
            mbarrier.arrive(stage_empty.index(stage))
            # The other column parts of dQ, one at a time (fewer live registers than one wide GEMM).
            for part in gl.static_range(1, DQ_PARTS):
                _dq_part(ds_w, k_w.slice(part * DQ_COLS, DQ_COLS, dim=1), dq_layout, dq_smem, base + part, dq_desc,
                         batch, m0, dq_col + part * DQ_COLS, DQ_PARTS * DQ_BUFS - 1)
        elif DQ_EARLY:
            # The dS exchange first, then dQ before dK: dK (reads Q) runs under the dQ store below.
            buf = g % 2
            ds_buf = ds_smem.index(buf)
            ds_buf.slice(WG * WG_ROWS, WG_ROWS, dim=0).store(ds)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(buf))
            ds_op = gl.convert_layout(ds, op_layout)
            mbarrier.wait(ds_ready.index(buf), (g // 2) & 1)
            dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_half,
                                   gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout), use_acc=False, is_async=True)
            dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
            dv, dq, p_op = warpgroup_mma_wait(1, deps=(dv_tok, dq_tok, p_op))
        else:
            ds_op = gl.convert_layout(ds, op_layout)
            dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)

            # dS^T rows of this warpgroup into the shared buffer; then dQ over both warpgroups' keys.
            buf = g % 2
            ds_buf = ds_smem.index(buf)
            ds_buf.slice(WG * WG_ROWS, WG_ROWS, dim=0).store(ds)
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(buf))
            mbarrier.wait(ds_ready.index(buf), (g // 2) & 1)
            dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_half,
                                   gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout), use_acc=False, is_async=True)
            dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
            mbarrier.arrive(stage_empty.index(stage))

        if not DQ_OWN and not SPLIT_D and not NO_DQ:
            # dQ half: registers -> shared (after the reduce that last read that buffer) -> TMA reduce-add;
            # deterministic: in a fixed order of key blocks per (query block, half), counters[head, m, WG].
            if DETERMINISTIC != 0:
                rank = _turn_rank(m_idx, rank_a, rank_b, n_m, BLOCK_M, 2 * k_w.shape[0], CAUSAL, DETERMINISTIC)
                counter = _turn_counter(counters, t, m_lo, n_steps, n_m, rot, WG, ROTATE)
                prev = _turn_counter(counters, gl.maximum(t - 1, 0), m_lo, n_steps, n_m, rot, WG, ROTATE)
                _dq_reduce(dq, dq_smem, WG * DQ_BUFS + g % DQ_BUFS, dq_desc, batch, m0, dq_col, DQ_BUFS - 1, counter,
                           rank, prev, t > 0, True)
            else:
                _dq_reduce(dq, dq_smem, WG * DQ_BUFS + g % DQ_BUFS, dq_desc, batch, m0, dq_col, DQ_BUFS - 1)
            if DQ_EARLY:
                dk, ds_op = warpgroup_mma_wait(0, deps=(dk_tok, ds_op))
                mbarrier.arrive(stage_empty.index(stage))
        return dk, dv

    @gluon.jit
    def _trim_steps(start_n, diag, m_lo, n_steps, BLOCK_M: gl.constexpr, WG_ROWS: gl.constexpr):
        """TRIM (causal): how many of a key block's query blocks, from m_lo on, see none of warpgroup 1's keys
        (the block's second 64): those before the block holding the first query that sees key start_n + 64."""
        m_first = gl.maximum(start_n + WG_ROWS - diag, 0) // BLOCK_M
        return gl.minimum(gl.maximum(m_first - m_lo, 0), n_steps)

    @gluon.jit
    def _trim_skip_step(t, ring, k_half, ds_smem, dq_smem, dq_desc, q_ready, stage_empty, ds_ready, batch, head0,
                        m_lo, n_steps, s_layout: gl.constexpr, dq_layout: gl.constexpr, BLOCK_M: gl.constexpr,
                        HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr, DQ_BUFS: gl.constexpr,
                        NO_DQ: gl.constexpr):
        """TRIM, warpgroup 1 at a query block that sees none of its keys (_trim_steps): no S^T, dP^T, dV or dK
        GEMM. The stage is released once loaded (an arrive before the load could count towards the stage's
        previous use). With dQ (shared dS): zeros as its dS^T rows (warpgroup 0's dQ GEMM, unchanged, reads all
        128), and its half of dQ's columns over warpgroup 0's 64 keys alone."""
        WG_ROWS: gl.constexpr = 64
        DQ_COLS: gl.constexpr = dq_desc.block_type.shape[2]
        g = t + ring
        stage = g % NUM_STAGES
        mbarrier.wait(q_ready.index(stage), (g // NUM_STAGES) & 1)
        mbarrier.arrive(stage_empty.index(stage))
        if not NO_DQ:
            buf = g % 2
            ds_buf = ds_smem.index(buf)
            ds_buf.slice(WG * WG_ROWS, WG_ROWS, dim=0).store(gl.zeros([WG_ROWS, BLOCK_M], ds_smem.dtype, s_layout))
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(buf))
            mbarrier.wait(ds_ready.index(buf), (g // 2) & 1)
            dq_tok = warpgroup_mma(ds_buf.slice(0, WG_ROWS, dim=0).permute((1, 0)), k_half.slice(0, WG_ROWS, dim=0),
                                   gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout), use_acc=False, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
            m0 = (m_lo + t % n_steps) * BLOCK_M
            dq_col = (head0 + t // n_steps) * HEAD_DIM + WG * (HEAD_DIM // 2)
            _dq_reduce(dq, dq_smem, WG * DQ_BUFS + g % DQ_BUFS, dq_desc, batch, m0, dq_col, DQ_BUFS - 1)

    @gluon.jit
    def _coop_issue(t, k_w, v_w, q_smem, do_smem, st_smem, q_ready, do_ready, key0, kbias,
                    s_layout: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                    WG: gl.constexpr, MASKED: gl.constexpr, KEY_BIAS: gl.constexpr, ACC_INIT: gl.constexpr):
        """Config.coop: warpgroup WG's first GEMM of step t, issued (asynchronous; its token): S^T = K Q^T
        in warpgroup 0, dP^T = V dO^T in warpgroup 1 (ACC_INIT: from -lse / scale and -delta)."""
        WG_ROWS: gl.constexpr = k_w.shape[1]
        zero = gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [t], dtype=gl.int32, is_pure=False, pack=1)
        stage = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        stats = st_smem.index(stage)._reinterpret(gl.float32, [4 * BLOCK_M],
                                                  gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        init = gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout)
        mbarrier.wait(q_ready.index(stage), phase)  # Q and the row statistics
        if WG == 0:
            if ACC_INIT:
                init = _s_init(stats, key0, kbias, s_layout, BLOCK_M, WG_ROWS, MASKED, KEY_BIAS)
            q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            tok = warpgroup_mma(k_w.index(zero), q.permute((1, 0)), init, use_acc=ACC_INIT, is_async=True)
        else:
            if ACC_INIT:
                init = init + stats.slice(BLOCK_M, BLOCK_M).load(gl.SliceLayout(0, s_layout))[None, :]
            mbarrier.wait(do_ready.index(stage), phase)
            do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
            tok = warpgroup_mma(v_w.index(zero), do.permute((1, 0)), init, use_acc=ACC_INIT, is_async=True)
        return tok

    @gluon.jit
    def _coop_step(t, dk, dv, first, k_w, v_w, q_smem, do_smem, st_smem, ds_smem, q_ready, do_ready, stage_empty,
                   xchg, key0, kbias, qk_scale, s_layout: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                   NUM_STAGES: gl.constexpr, WG: gl.constexpr, MASKED: gl.constexpr, KEY_BIAS: gl.constexpr,
                   ACC_INIT: gl.constexpr, PREFETCH: gl.constexpr):
        """One query block of split_d without dQ (Config.coop), given this warpgroup's finished first GEMM
        (_coop_issue: S^T in warpgroup 0, dP^T in warpgroup 1, each computed once): warpgroup 0 makes
        P^T, warpgroup 1 dS^T = P^T (dP^T - delta); P^T crosses through ds_smem[0] and dS^T through
        ds_smem[1], and each warpgroup takes its half of dV's and dK's columns from there (SS wgmma). The
        arithmetic is split_d's (P rounded before dS, the same GEMMs): the same bits. PREFETCH (coop=2):
        the first GEMM of step t + 1 is issued before this step's dV / dK GEMMs, so that it runs under the
        other warpgroup's element-wise work; returned finished (else ``first`` comes back).
        xchg (one arrive each, one phase a step): [0] P^T written (0 -> 1), [1] dS^T written (1 -> 0),
        [2] P^T free again (1 -> 0: its read of P^T and its dV GEMM are done), [3] dS^T free again (0 -> 1:
        its dK GEMM is done); fresh barriers pass the first "free" waits (parity 1)."""
        HALF: gl.constexpr = HEAD_DIM // 2
        WG_ROWS: gl.constexpr = k_w.shape[1]
        dtype: gl.constexpr = q_smem.dtype
        # Buffers indexed by a zero the compiler cannot see through (as in _step: no hoisted descriptors).
        zero = gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [t], dtype=gl.int32, is_pure=False, pack=1)
        p_buf = ds_smem.index(zero)
        ds_buf = ds_smem.index(1 + zero)
        stage = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        xphase = t & 1
        q_b = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM]).slice(WG * HALF, HALF, dim=1)
        do_b = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM]).slice(WG * HALF, HALF, dim=1)
        stats = st_smem.index(stage)._reinterpret(gl.float32, [4 * BLOCK_M],
                                                  gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        if WG == 0:
            if ACC_INIT:
                p = gl.exp2(first * qk_scale)
            else:
                p = _probs_t(first, stats, key0, kbias, qk_scale, s_layout, BLOCK_M, WG_ROWS, MASKED, KEY_BIAS)
            mbarrier.wait(xchg.index(2), xphase ^ 1)
            p_buf.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(xchg.index(0))
        else:
            mbarrier.wait(xchg.index(0), xphase)
            p = p_buf.load(s_layout)
            if ACC_INIT:
                ds = (p.to(gl.float32) * first).to(dtype)
            else:
                delta = stats.slice(BLOCK_M, BLOCK_M).load(gl.SliceLayout(0, s_layout))
                ds = (p.to(gl.float32) * (first - delta[None, :])).to(dtype)
            mbarrier.wait(xchg.index(3), xphase ^ 1)
            ds_buf.store(ds)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(xchg.index(1))
        if PREFETCH:
            nxt_tok = _coop_issue(t + 1, k_w, v_w, q_smem, do_smem, st_smem, q_ready, do_ready, key0, kbias, s_layout,
                                  BLOCK_M, HEAD_DIM, NUM_STAGES, WG, MASKED, KEY_BIAS, ACC_INIT)
        mbarrier.wait(do_ready.index(stage), phase)
        dv_tok = warpgroup_mma(p_buf, do_b, dv, is_async=True)
        if WG == 0:
            mbarrier.wait(xchg.index(1), xphase)
        dk_tok = warpgroup_mma(ds_buf, q_b, dk, is_async=True)
        if PREFETCH:
            nxt, dv, dk = warpgroup_mma_wait(0, deps=(nxt_tok, dv_tok, dk_tok))
        else:
            dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
            nxt = first
        mbarrier.arrive(xchg.index(3 if WG == 0 else 2))
        mbarrier.arrive(stage_empty.index(stage))
        return dk, dv, nxt

    @gluon.jit
    def _consumer(q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready, do_ready,
                  stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                  stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                  start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, kblk, n_kblk, n_m, diag,
                  kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles,
                  BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                  CAUSAL: gl.constexpr, SPLIT_MASK: gl.constexpr, ACC_INIT: gl.constexpr, DQ_BUFS: gl.constexpr,
                  NUM_WG: gl.constexpr, DQ_OWN: gl.constexpr, DQ_EARLY: gl.constexpr, DETERMINISTIC: gl.constexpr,
                  SPLIT_D: gl.constexpr, ROTATE: gl.constexpr, NO_DQ: gl.constexpr, COOP: gl.constexpr,
                  PERSISTENT: gl.constexpr, LPT: gl.constexpr, TRIM: gl.constexpr):
        """A consumer warpgroup: its key block's steps and dK / dV (_consumer_tile); PERSISTENT: those of
        every tile of this CTA (_tile), the ring running on across tiles."""
        if PERSISTENT:
            BLOCK_N_: gl.constexpr = 64 if SPLIT_D else NUM_WG * 64
            ring = 0
            tile_iter = 0
            for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
                t_blk, t_start, t_batch, t_head_k, t_head0, t_kv_col, t_m_lo, t_steps, t_masked, t_rot = _tile(
                    tile, num_tiles, n_kblk, seqlen_q, seqlen_k, num_heads, num_heads_k, BLOCK_M, BLOCK_N_, HEAD_DIM,
                    CAUSAL, LPT)
                _consumer_tile(q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                               do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                               stride_dvb, stride_dvn, stride_dvh, t_batch, t_head_k, t_head0, group, seqlen_k,
                               t_start, t_m_lo, t_steps, t_masked, qk_scale, softmax_scale, t_rot, counters, t_blk,
                               n_kblk, n_m, diag, ring, tile_iter & 1, kv_empty, BLOCK_M, HEAD_DIM, NUM_STAGES, WG,
                               CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY, DETERMINISTIC,
                               SPLIT_D, ROTATE, NO_DQ, COOP, True, TRIM)
                ring += group * t_steps
                tile_iter += 1
        else:
            _consumer_tile(q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                           do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                           stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                           start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, kblk, n_kblk,
                           n_m, diag, 0, 0, kv_empty, BLOCK_M, HEAD_DIM, NUM_STAGES, WG, CAUSAL, SPLIT_MASK, ACC_INIT,
                           DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY, DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, False,
                           TRIM)
        tma.store_wait(0)

    @gluon.jit
    def _consumer_tile(q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                       do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                       stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                       start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, kblk, n_kblk, n_m,
                       diag, ring, kv_phase, kv_empty, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr, WG: gl.constexpr, CAUSAL: gl.constexpr, SPLIT_MASK: gl.constexpr,
                       ACC_INIT: gl.constexpr, DQ_BUFS: gl.constexpr, NUM_WG: gl.constexpr, DQ_OWN: gl.constexpr,
                       DQ_EARLY: gl.constexpr, DETERMINISTIC: gl.constexpr, SPLIT_D: gl.constexpr,
                       ROTATE: gl.constexpr, NO_DQ: gl.constexpr, COOP: gl.constexpr, PERSISTENT: gl.constexpr,
                       TRIM: gl.constexpr):
        """One key block (tile) of a consumer warpgroup: its steps (ring positions from ring on; kv_ready's
        phase kv_phase), then dK / dV stored. PERSISTENT: K and V are released (kv_empty) once its last step
        is done, so that the producer loads the next tile's under this tile's epilogue."""
        WG_ROWS: gl.constexpr = 64
        BLOCK_N_: gl.constexpr = WG_ROWS if SPLIT_D else NUM_WG * WG_ROWS
        HALF: gl.constexpr = HEAD_DIM // 2
        DQ_COLS: gl.constexpr = dq_desc.block_type.shape[2]  # the host's dq_box_cols
        # Columns of this warpgroup's dK / dV: all of head_dim, or (SPLIT_D) its half.
        DKV_COLS: gl.constexpr = HALF if SPLIT_D else HEAD_DIM
        dtype: gl.constexpr = q_smem.dtype
        # wgmma accumulators: warps stacked along M (4 warps x 16 rows), instruction N = tile N.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, DKV_COLS, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, DQ_COLS, 16])
        # P^T, dS^T as the register A operand of the dV / dK wgmma.
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        key0 = start_n if SPLIT_D else start_n + WG * WG_ROWS  # first key of this warpgroup
        # Keys past seqlen_k read as zero rows: without causal masking (which hides them) their P is
        # forced to 0 by a -inf bias, so that no overflowing P (scores far below lse) can reach dQ.
        keys_w = key0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))
        kbias = gl.where(keys_w < seqlen_k, 0.0, float("-inf"))

        if SPLIT_D:
            # Both warpgroups: all WG_ROWS keys of the CTA (_step takes the tiles from the buffers and its
            # half of the columns for dQ).
            k_2d = k_smem.reshape([WG_ROWS, HEAD_DIM])
            v_2d = v_smem.reshape([WG_ROWS, HEAD_DIM])
            k_w = k_2d._reinterpret(dtype, [1, WG_ROWS, HEAD_DIM], k_2d.layout)
            v_w = v_2d._reinterpret(dtype, [1, WG_ROWS, HEAD_DIM], v_2d.layout)
            k_half = k_w
        elif NUM_WG == 3:
            k_w = k_smem.index(WG).reshape([WG_ROWS, HEAD_DIM])
            v_w = v_smem.index(WG).reshape([WG_ROWS, HEAD_DIM])
            k_half = k_w  # unused (DQ_OWN)
        else:
            k_full = k_smem.reshape([BLOCK_N_, HEAD_DIM])
            k_w = k_full.slice(WG * WG_ROWS, WG_ROWS, dim=0)
            v_w = v_smem.reshape([BLOCK_N_, HEAD_DIM]).slice(WG * WG_ROWS, WG_ROWS, dim=0)
            k_half = k_full.slice(0 if DQ_OWN else WG * HALF, HALF, dim=1)  # unused with DQ_OWN

        rank_a, rank_b = _turn_params(kblk, n_kblk, diag, BLOCK_M, BLOCK_N_, CAUSAL, DETERMINISTIC)
        dk = gl.zeros([WG_ROWS, DKV_COLS], gl.float32, kv_layout)
        dv = gl.zeros([WG_ROWS, DKV_COLS], gl.float32, kv_layout)
        mbarrier.wait(kv_ready.index(0), kv_phase)
        if SPLIT_MASK:
            # Diagonal steps through the mask, the rest without it (two copies of the loop body).
            for g in range(group):
                for t in range(g * n_steps, g * n_steps + n_masked):
                    dk, dv = _step(t, ring, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem,
                                   dq_desc, q_ready, do_ready, stage_empty, ds_ready, key0, kbias, batch, head0, m_lo,
                                   n_steps,
                                   qk_scale, rot, counters, rank_a, rank_b, n_m, s_layout, dq_layout, op_layout,
                                   BLOCK_M, HEAD_DIM, NUM_STAGES, WG, True, False, ACC_INIT, DQ_BUFS, DQ_OWN, DQ_EARLY,
                                   CAUSAL, DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ)
                for t in range(g * n_steps + n_masked, (g + 1) * n_steps):
                    dk, dv = _step(t, ring, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem,
                                   dq_desc, q_ready, do_ready, stage_empty, ds_ready, key0, kbias, batch, head0, m_lo,
                                   n_steps,
                                   qk_scale, rot, counters, rank_a, rank_b, n_m, s_layout, dq_layout, op_layout,
                                   BLOCK_M, HEAD_DIM, NUM_STAGES, WG, False, False, ACC_INIT, DQ_BUFS, DQ_OWN, DQ_EARLY,
                                   CAUSAL, DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ)
        elif COOP == 1:
            for t in range(0, group * n_steps):
                first = warpgroup_mma_wait(0, deps=(_coop_issue(ring + t, k_w, v_w, q_smem, do_smem, st_smem, q_ready,
                                                                do_ready, key0, kbias, s_layout, BLOCK_M, HEAD_DIM,
                                                                NUM_STAGES, WG, CAUSAL, not CAUSAL, ACC_INIT), ))
                dk, dv, first = _coop_step(ring + t, dk, dv, first, k_w, v_w, q_smem, do_smem, st_smem, ds_smem,
                                           q_ready, do_ready, stage_empty, ds_ready, key0, kbias, qk_scale, s_layout,
                                           BLOCK_M, HEAD_DIM, NUM_STAGES, WG, CAUSAL, not CAUSAL, ACC_INIT, False)
        elif COOP == 2:
            # Every step issues the next one's first GEMM; the last does not (group * n_steps >= 1: every
            # key block has a query block that sees it, seqlen_q > 0 here).
            n_total = group * n_steps
            first = warpgroup_mma_wait(0, deps=(_coop_issue(ring, k_w, v_w, q_smem, do_smem, st_smem, q_ready,
                                                            do_ready, key0, kbias, s_layout, BLOCK_M, HEAD_DIM,
                                                            NUM_STAGES, WG, CAUSAL, not CAUSAL, ACC_INIT), ))
            for t in range(0, n_total - 1):
                dk, dv, first = _coop_step(ring + t, dk, dv, first, k_w, v_w, q_smem, do_smem, st_smem, ds_smem,
                                           q_ready, do_ready, stage_empty, ds_ready, key0, kbias, qk_scale, s_layout,
                                           BLOCK_M, HEAD_DIM, NUM_STAGES, WG, CAUSAL, not CAUSAL, ACC_INIT, True)
            dk, dv, first = _coop_step(ring + n_total - 1, dk, dv, first, k_w, v_w, q_smem, do_smem, st_smem, ds_smem,
                                       q_ready, do_ready, stage_empty, ds_ready, key0, kbias, qk_scale, s_layout,
                                       BLOCK_M, HEAD_DIM, NUM_STAGES, WG, CAUSAL, not CAUSAL, ACC_INIT, False)
        elif TRIM and WG == 1:
            # Causal, two warpgroups sharing dS (or without dQ): the first n_skip query blocks of each head see
            # none of warpgroup 1's keys: it computes nothing there (_trim_skip_step). Warpgroup 0's loop is the
            # plain one below. One loop with a branch (two loops a head spill at d=128, as SPLIT_MASK does).
            # (At most one such block a head: warpgroup 1's first key is 64 past warpgroup 0's, BLOCK_M >= 64.)
            skip_t = gl.where(_trim_steps(start_n, diag, m_lo, n_steps, BLOCK_M, WG_ROWS) > 0, 0, group * n_steps)
            for t in range(0, group * n_steps):
                if t == skip_t:
                    skip_t += n_steps
                    _trim_skip_step(t, ring, k_half, ds_smem, dq_smem, dq_desc, q_ready, stage_empty, ds_ready, batch,
                                    head0, m_lo, n_steps, s_layout, dq_layout, BLOCK_M, HEAD_DIM, NUM_STAGES, WG,
                                    DQ_BUFS, NO_DQ)
                else:
                    dk, dv = _step(t, ring, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem,
                                   dq_desc, q_ready, do_ready, stage_empty, ds_ready, key0, kbias, batch, head0, m_lo,
                                   n_steps, qk_scale, rot, counters, rank_a, rank_b, n_m, s_layout, dq_layout,
                                   op_layout, BLOCK_M, HEAD_DIM, NUM_STAGES, WG, True, False, ACC_INIT, DQ_BUFS,
                                   DQ_OWN, DQ_EARLY, CAUSAL, DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ)
        else:
            # One loop body; under causal every step applies the mask (a no-op past the diagonal).
            for t in range(0, group * n_steps):
                dk, dv = _step(t, ring, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem, dq_desc,
                               q_ready, do_ready, stage_empty, ds_ready, key0, kbias, batch, head0, m_lo, n_steps,
                               qk_scale, rot, counters, rank_a, rank_b, n_m, s_layout, dq_layout, op_layout,
                               BLOCK_M, HEAD_DIM, NUM_STAGES, WG, CAUSAL, not CAUSAL, ACC_INIT, DQ_BUFS, DQ_OWN,
                               DQ_EARLY, CAUSAL, DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ)
        if PERSISTENT:
            # Every GEMM of this warpgroup that reads K or V has been waited for (_step).
            mbarrier.arrive(kv_empty.index(0))

        # Epilogue: dK (times the softmax scale), dV from registers through their strides, rows past the end dropped.
        rows = key0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, kv_layout))
        dcols = (WG * HALF if SPLIT_D else 0) + gl.arange(0, DKV_COLS, layout=gl.SliceLayout(0, kv_layout))
        mask = (rows < seqlen_k)[:, None] & (dcols < HEAD_DIM)[None, :]
        rows64 = rows.to(gl.int64)[:, None]
        dk_offs = batch.to(gl.int64) * stride_dkb + head_k.to(gl.int64) * stride_dkh + rows64 * stride_dkn
        dv_offs = batch.to(gl.int64) * stride_dvb + head_k.to(gl.int64) * stride_dvh + rows64 * stride_dvn
        gl.store(dk_ptr + dk_offs + dcols[None, :], (dk * softmax_scale).to(dtype), mask=mask)
        gl.store(dv_ptr + dv_offs + dcols[None, :], dv.to(dtype), mask=mask)
        if DETERMINISTIC != 0 and not DQ_OWN and not SPLIT_D:
            # The last step's turn (_dq_reduce passes each earlier one on at the next step).
            if group * n_steps > 0:
                _turn_pass(_turn_counter(counters, group * n_steps - 1, m_lo, n_steps, n_m, rot, WG, ROTATE))

    @gluon.jit
    def _backward_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, st_desc, dk_ptr, dv_ptr, counters_ptr,
                         stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                         seqlen_q, seqlen_k, num_heads, num_heads_k, qk_scale, softmax_scale,
                         BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                         CAUSAL: gl.constexpr, SPLIT_MASK: gl.constexpr, ACC_INIT: gl.constexpr,
                         DQ_BUFS: gl.constexpr, LPT: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         PRODUCER_REGS: gl.constexpr, NUM_WG: gl.constexpr, DQ_OWN: gl.constexpr,
                         DQ_EARLY: gl.constexpr, DETERMINISTIC: gl.constexpr = 0, SPLIT_D: gl.constexpr = False,
                         ROTATE: gl.constexpr = False, NO_DQ: gl.constexpr = False, COOP: gl.constexpr = 0,
                         PERSISTENT: gl.constexpr = False, TRIM: gl.constexpr = False, num_tiles=0):
        # NUM_WG == 3: K and V arrive as one 64-row TMA box per warpgroup (192 is no power of 2).
        KV_SPLIT: gl.constexpr = NUM_WG == 3
        WG_N_: gl.constexpr = 64
        BLOCK_N_: gl.constexpr = k_desc.block_type.shape[1] * (NUM_WG if KV_SPLIT else 1)
        if LPT:
            # Key blocks slowest: every (batch, kv head)'s first key block (under causal the
            # heaviest) is launched before any second one.
            n_blk = gl.program_id(1)
            bhk = gl.program_id(0)
        else:
            n_blk = gl.program_id(0)
            bhk = gl.program_id(1)
        start_n, batch, head_k, head0, kv_col, m_lo, n_steps, n_masked, rot = _tile_info(
            n_blk, bhk, seqlen_q, seqlen_k, num_heads, num_heads_k, BLOCK_M, BLOCK_N_, HEAD_DIM, CAUSAL)
        group = num_heads // num_heads_k
        n_m = gl.cdiv(seqlen_q, BLOCK_M)
        n_total = group * n_steps
        # ROTATE (non-causal): key block j starts at query block rot(j) and wraps around, so that the
        # CTAs running at once reduce into different dQ tiles (and, deterministic, in a fixed order).
        # Deterministic dQ (see _turn_rank): one int32 counter per (batch * head, query block, warpgroup).
        n_kblk = gl.cdiv(seqlen_k, BLOCK_N_)
        diag_k = seqlen_k - seqlen_q
        counters = counters_ptr + (batch * num_heads + head0).to(gl.int64) * n_m * 2

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
        # SPLIT_D (head_dim 256) with dQ: one dO buffer (shared memory), refilled under each step's dK / dQ GEMMs.
        ONE_DO: gl.constexpr = SPLIT_D and not NO_DQ
        do_smem = gl.allocate_shared_memory(dtype, [1 if ONE_DO else NUM_STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        if KV_SPLIT:
            k_smem = gl.allocate_shared_memory(dtype, [NUM_WG] + k_desc.block_type.shape, k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, [NUM_WG] + v_desc.block_type.shape, v_desc.layout)
        else:
            k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
            v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        st_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + st_desc.block_type.shape, st_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N_, BLOCK_M], dtype)
        if DQ_OWN or SPLIT_D:
            # Each warpgroup reads back only its own dS^T rows, after its own barrier: one buffer each.
            ds_own_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_N_, BLOCK_M], dtype)
            ds_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_N_, BLOCK_M], ds_own_layout)
        elif NO_DQ:
            ds_smem = gl.allocate_shared_memory(dtype, [1, 16, BLOCK_M], ds_layout)  # unused: dS stays in registers
        else:
            ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N_, BLOCK_M], ds_layout)
        # DQ_OWN: a staging buffer per dQ part and warpgroup (DQ_BUFS deep); SPLIT_D: DQ_BUFS per warpgroup,
        # its parts taking turns.
        DQ_PARTS: gl.constexpr = HEAD_DIM // dq_desc.block_type.shape[2] if DQ_OWN else 1
        dq_smem = gl.allocate_shared_memory(gl.float32, [1 if NO_DQ else NUM_WG * DQ_PARTS * DQ_BUFS]
                                            + dq_desc.block_type.shape, dq_desc.layout)
        kv_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        stage_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        # COOP: four one-arrive barriers of the P^T / dS^T exchange (_coop_step).
        ds_ready = gl.allocate_shared_memory(gl.int64, [4 if COOP else 2, 1], mbarrier.MBarrierLayout())
        if PERSISTENT:
            # Consumers -> producer: both are done with the tile's K and V.
            kv_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
            mbarrier.init(kv_empty.index(0), count=NUM_WG)
        else:
            kv_empty = kv_ready  # never used
        mbarrier.init(kv_ready.index(0), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(stage_empty.index(i), count=NUM_WG)  # one arrive per consumer warpgroup
        for i in gl.static_range(4 if COOP else 2):
            # Shared dS: both halves written; SPLIT_D: ds_ready[0] is the dO buffer's "free" barrier.
            mbarrier.init(ds_ready.index(i), count=1 if COOP else 2)
        fence_async_shared()

        # Each partition's arguments spelled out: one tuple built here and concatenated per warpgroup
        # (head + (WG, ) + tail) failed to compile inside _consumer (triton 3.6).
        if NUM_WG == 3:
            gl.warp_specialize([
                (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                             do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                             stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                             start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, n_blk, n_kblk,
                             n_m, diag_k, kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles, BLOCK_M, HEAD_DIM,
                             NUM_STAGES, 0, CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY,
                             DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, PERSISTENT, LPT, TRIM)),
                (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                             do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                             stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                             start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, n_blk, n_kblk,
                             n_m, diag_k, kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles, BLOCK_M, HEAD_DIM,
                             NUM_STAGES, 1, CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY,
                             DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, PERSISTENT, LPT, TRIM)),
                (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                             do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                             stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                             start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, n_blk, n_kblk,
                             n_m, diag_k, kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles, BLOCK_M, HEAD_DIM,
                             NUM_STAGES, 2, CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY,
                             DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, PERSISTENT, LPT, TRIM)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem,
                             kv_ready, q_ready, do_ready, stage_empty, ds_ready, batch, head0, num_heads, kv_col,
                             start_n, m_lo, n_steps, n_total, rot, kv_empty, seqlen_q, seqlen_k, num_heads_k,
                             num_tiles, n_kblk, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_WG if KV_SPLIT else 1, ROTATE,
                             ONE_DO, CAUSAL, PERSISTENT, LPT)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
        elif NUM_WG == 1:
            gl.warp_specialize([
                (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                             do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                             stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                             start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, n_blk, n_kblk,
                             n_m, diag_k, kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles, BLOCK_M, HEAD_DIM,
                             NUM_STAGES, 0, CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY,
                             DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, PERSISTENT, LPT, TRIM)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem,
                             kv_ready, q_ready, do_ready, stage_empty, ds_ready, batch, head0, num_heads, kv_col,
                             start_n, m_lo, n_steps, n_total, rot, kv_empty, seqlen_q, seqlen_k, num_heads_k,
                             num_tiles, n_kblk, BLOCK_M, HEAD_DIM, NUM_STAGES, 1, ROTATE,
                             ONE_DO, CAUSAL, PERSISTENT, LPT)),
            ], [1], [PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                             do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                             stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                             start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, n_blk, n_kblk,
                             n_m, diag_k, kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles, BLOCK_M, HEAD_DIM,
                             NUM_STAGES, 0, CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY,
                             DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, PERSISTENT, LPT, TRIM)),
                (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                             do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, stride_dkb, stride_dkn, stride_dkh,
                             stride_dvb, stride_dvn, stride_dvh, batch, head_k, head0, group, seqlen_k,
                             start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale, rot, counters, n_blk, n_kblk,
                             n_m, diag_k, kv_empty, seqlen_q, num_heads, num_heads_k, num_tiles, BLOCK_M, HEAD_DIM,
                             NUM_STAGES, 1, CAUSAL, SPLIT_MASK, ACC_INIT, DQ_BUFS, NUM_WG, DQ_OWN, DQ_EARLY,
                             DETERMINISTIC, SPLIT_D, ROTATE, NO_DQ, COOP, PERSISTENT, LPT, TRIM)),
                (_producer, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem,
                             kv_ready, q_ready, do_ready, stage_empty, ds_ready, batch, head0, num_heads, kv_col,
                             start_n, m_lo, n_steps, n_total, rot, kv_empty, seqlen_q, seqlen_k, num_heads_k,
                             num_tiles, n_kblk, BLOCK_M, HEAD_DIM, NUM_STAGES, NUM_WG if KV_SPLIT else 1, ROTATE,
                             ONE_DO, CAUSAL, PERSISTENT, LPT)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


if triton is not None:

    @triton.jit
    def _preprocess_kernel(out, dout, lse, softmax_d, stats, dq_accum, seqlen_q, num_heads, stats_len, diag, lse_mul,
                           delta_mul, stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                           stride_lb, stride_lh, stride_lm, stride_sb, stride_sh, stride_sm,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ZERO_DQ: tl.constexpr):
        """softmax_d = delta = rowsum(O * dO) (fp32, through its strides) and the (b * h, 4, stats_len)
        fp32 rows the main kernel reads per query block: [0] lse_mul * lse, [1] delta_mul * delta,
        [2] the query's position among the keys (row + seqlen_k - seqlen_q, as a float: exact below
        2**24), which the causal mask compares; row 3 unused. Padding rows get lse = +inf, delta = 0.
        ZERO_DQ: the rows' part of the fp32 dQ accumulator ((b, sq, h, d) contiguous) is zeroed too, for the
        main kernel's reduce-adds (no fill launch of its own)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        batch = bh // num_heads
        head = bh % num_heads
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, HEAD_DIM)
        valid = rows < seqlen_q
        rows64 = rows.to(tl.int64)
        o_ptrs = out + batch.to(tl.int64) * stride_ob + head * stride_oh + rows64[:, None] * stride_om + cols[None, :]
        do_ptrs = (dout + batch.to(tl.int64) * stride_dob + head * stride_doh + rows64[:, None] * stride_dom
                   + cols[None, :])
        o = tl.load(o_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(do_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        delta = tl.sum(o * do, axis=1)
        lse_val = tl.load(lse + batch.to(tl.int64) * stride_lb + head * stride_lh + rows64 * stride_lm, mask=valid,
                          other=float("inf"))
        tl.store(softmax_d + batch.to(tl.int64) * stride_sb + head * stride_sh + rows64 * stride_sm, delta,
                 mask=valid)
        base = stats + bh.to(tl.int64) * 4 * stats_len + rows
        tl.store(base, lse_val * lse_mul)
        tl.store(base + stats_len, delta * delta_mul)
        tl.store(base + 2 * stats_len, (rows + diag).to(tl.float32))
        if ZERO_DQ:
            accum = dq_accum + ((batch.to(tl.int64) * seqlen_q + rows64) * num_heads + head)[:, None] * HEAD_DIM
            tl.store(accum + cols[None, :], tl.zeros([BLOCK, HEAD_DIM], tl.float32), mask=valid[:, None])

    @triton.jit
    def _dq_convert_kernel(dq_accum, dq, seqlen_q, num_heads, scale, stride_qb, stride_qm, stride_qh,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """dq (any strides) = scale * dq_accum ((b, sq, h, d) contiguous fp32)."""
        bh = tl.program_id(1)
        batch = bh // num_heads
        head = bh % num_heads
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, HEAD_DIM)
        mask = (rows < seqlen_q)[:, None]
        rows64 = rows.to(tl.int64)
        src = dq_accum + ((batch.to(tl.int64) * seqlen_q + rows64) * num_heads + head)[:, None] * HEAD_DIM + cols[None, :]
        dst = dq + batch.to(tl.int64) * stride_qb + head * stride_qh + rows64[:, None] * stride_qm + cols[None, :]
        acc = tl.load(src, mask=mask, other=0.0)
        tl.store(dst, (acc * scale).to(dq.dtype.element_ty), mask=mask)


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SUPPORTED_HEAD_DIMS = (64, 128, 256)
# Calls at these head dims run split_d's dK / dV / softmax_d kernel (with_dq=False) and then the Triton
# dQ kernel alone (kernels/backward.backward(dq_only=True)): two_pass(). split_d has no deterministic
# mode, and the pair adds dQ in a fixed order; under causal masking the pair also measured faster than
# split_d with its dQ reduce-adds (2.37 vs 2.55 ms, bf16 s=4096, H200; benchmarks/RESULTS.md).
TWO_PASS_HEAD_DIMS = (256,)
TWO_PASS_CAUSAL = True
# Non-causal calls too since the first pass takes coop (two_pass_config): at s=1024 / 4096 / 16384 its 0.611 /
# 2.047 / 7.104 ms plus the Triton dQ pass's 0.488 / 1.583 / 6.675 against one-pass split_d's 1.217 / 4.288 /
# 15.242 ms (bf16, H100, 2026-12-07; benchmarks/RESULTS.md, eleventh and twelfth sessions).
TWO_PASS_NONCAUSAL = True
# Deterministic calls also take the two passes at these head dims: at d=128 the pair (the plain layout
# with_dq=False, then the Triton dQ kernel) measured faster than the Triton kernels' deterministic
# backward on 10 of 12 rows (bf16 / fp16, s=1024-16384, H200, 2026-12-04; e.g. bf16 s=4096 3.34 vs 3.56 ms,
# causal 2.05 vs 2.24; causal s=16384 7.92 vs 7.66, 3% slower: benchmarks/RESULTS.md, eighth session).
DETERMINISTIC_TWO_PASS_HEAD_DIMS = (128, 256)
# Two-pass calls at these head dims take dQ from the Gluon dQ kernel (kernels/gluon_dq.py, shaped like the
# forward: S, dP and the previous dQ GEMM in flight together) instead of the Triton dQ kernel. At d=128 it
# measured 0.68-0.79x the Triton dQ kernel's time, at d=256 1.03-1.35x (bf16 s=1024-16384, H100, 2026-12-07,
# scripts/gluon_dq_check.py; benchmarks/RESULTS.md, eleventh session). PYFLASH_GLUON_DQ=1: every two-pass
# head dim, 0: none.
# Longest key sequence at which a non-deterministic call takes the two passes too, per (head_dim, causal): short
# rows, where the one pass's zero fill and convert of the fp32 dQ accumulator are a large part of a call. Empty:
# the two passes measured 0.96x the one pass's time at d=128 causal s=1024 and 1.03x non-causal (H100, eleventh
# session), one row each; scripts/short_rows_device_call.sh times s=512-2048 (benchmarks/RESULTS.md).
TWO_PASS_MAX_SEQLEN_K = {}
# Whether causal calls below d=256 take Config.trim (warpgroup 1 idle at the query blocks that see none of its
# keys), in the one pass and in the two passes' first: PYFLASH_TRIM=bwd (or fwd,bwd, or 1: both kernels) sets it.
# Off until timed on a GPU (scripts/trim_device_call.sh bwd; benchmarks/RESULTS.md, fifteenth session).
TRIM_CAUSAL = bool({"bwd", "1"} & set(os.environ.get("PYFLASH_TRIM", "").split(",")))
GLUON_DQ_HEAD_DIMS = (128, 256)
GLUON_DQ = {"1": GLUON_DQ_HEAD_DIMS, "0": ()}.get(os.environ.get("PYFLASH_GLUON_DQ", ""), (128,))
MAX_GRID_Y = 65535
SM90_MAX_SHARED = 232448  # bytes of shared memory a block may use on H100
ROW_BLOCK = 64  # rows per program of the preprocess / convert kernels


class Config(NamedTuple):
    """A launch configuration of the main kernel.

    block_m: query rows per step (64; 128 spills at d=64 and d=128, even with acc_init);
    num_stages: depth of the Q/dO ring; split_mask (causal): separate masked and unmasked loops;
    acc_init: -lse / scale and -delta enter as the initial wgmma accumulators of S^T and dP^T (fewer
    live registers, no per-element subtractions); dq_bufs: dQ staging buffers per warpgroup (2: the
    previous TMA reduce gets a whole step to finish reading its buffer); lpt (causal): grid ordered so
    that every head's first (heaviest) key block is launched before any second one;
    dq_own: each consumer warpgroup computes dQ over its own 64 keys (full head_dim: dS^T never leaves
    the warpgroup, no dS exchange between warpgroups, one TMA reduce per warpgroup and step instead of
    one half-width reduce each); dq_early (shared dS only): the dQ GEMM before the dK GEMM, so that dK
    runs under the dQ store; wgs: consumer warpgroups of 64 keys each (3 needs dq_own: 192 keys per CTA;
    1 needs dq_own: 64 keys per CTA and two CTAs an SM, launch_shape);
    split_d (head_dim 256): 64 keys per CTA, both warpgroups compute S^T and dP^T over all of them and each
    owns half of head_dim's columns of dK, dV and dQ (dK / dV of 64 keys x 256 columns would not fit one
    warpgroup's registers), one dO buffer; rotate (non-causal): each key block walks the query blocks from
    its own starting block (rot(j) = j * n_m // n_kblk), so that the CTAs running at once add into
    different dQ tiles instead of all into the same one (the deterministic mode always rotates);
    with_dq=False (split_d, or the plain shared-dS layout): dK, dV and softmax_d only, dq left alone, for
    a caller that takes dQ from a pass of its own (kernels/backward.backward(dq_only=True), the Triton dQ
    kernel); split_d's dO then has a ring of num_stages buffers like Q (in the shared memory dQ's staging
    no longer needs), and the plain layout keeps dS^T in registers (no dS buffer, no exchange);
    coop (split_d, with_dq=False, no split_mask): warpgroup 0 computes S^T and P^T, warpgroup 1 dP^T and
    dS^T, each once instead of both in both warpgroups (4 GEMM units a step instead of 6), P^T and dS^T
    crossing through the two dS buffers (_coop_step); coop=2: each step issues the next step's S^T / dP^T
    before its dV / dK GEMMs (coop=1 measured 0.70-0.84x split_d's time on an H100, coop=2 slower than coop=1:
    two_pass_config takes coop=1 at d=256);
    persistent (wgs=2; not split_mask or deterministic; at d=256 clean without dQ only): a
    grid of one CTA per SM, each looping over key-block tiles (_tile: with lpt, causal, every head's
    first key block before any second one), the Q / dO ring and its barriers running on across tiles: the
    next tile's first Q / dO load under this tile's last steps, its K / V under this tile's dK / dV epilogue
    (aimed at short sequences, where a CTA's prologue and epilogue are a large part of its time; measured
    slower on an H100, benchmarks/RESULTS.md, twelfth session);
    trim (causal, two warpgroups sharing dS or without dQ; ignored by deterministic calls): at the query blocks
    that see none of warpgroup 1's keys (the first of each key block's walk under square causal masking),
    warpgroup 1 runs no GEMM (_trim_skip_step) and dQ is taken over warpgroup 0's keys alone."""

    block_m: int = 64
    num_stages: int = 2
    split_mask: bool = False
    acc_init: bool = False
    dq_bufs: int = 1
    lpt: bool = False
    dq_own: bool = False
    dq_early: bool = False
    wgs: int = 2
    split_d: bool = False
    rotate: bool = False
    with_dq: bool = True
    coop: int = 0
    persistent: bool = False
    trim: bool = False


def kv_box_rows(cfg: Config) -> int:
    """Rows of the K / V TMA boxes: the whole key block, or one box per warpgroup (wgs=3: 192 is no power of 2;
    wgs=1 and split_d: 64 keys a CTA)."""
    return WG_N if int(cfg.wgs) != 2 or cfg.split_d else BLOCK_N


def dq_box_cols(cfg: Config, head_dim: int) -> int:
    """Columns of a dQ TMA reduce: half of head_dim (shared dS), or at most 64 (dq_own: head_dim // 64 parts)."""
    if cfg.split_d:
        return min(head_dim // 2, DQ_MAX)
    return min(head_dim, DQ_MAX) if cfg.dq_own else head_dim // 2


def launch_shape(cfg: Config):
    """(keys per CTA, maxnreg of the kernel, setmaxnreg of the consumer worker warpgroups) of a Config:
    wgs consumer warpgroups of WG_N keys each plus the producer's warpgroup share 64K registers."""
    wgs = int(cfg.wgs)
    if not cfg.with_dq and not cfg.split_d and (wgs != 2 or cfg.dq_own or cfg.dq_early):
        raise ValueError(f"unsupported Config {cfg}: with_dq=False needs split_d or the plain layout (wgs=2, "
                         "no dq_own, no dq_early)")
    if cfg.coop and (not cfg.split_d or cfg.with_dq or cfg.split_mask):
        raise ValueError(f"unsupported Config {cfg}: coop needs split_d, with_dq=False and no split_mask")
    if cfg.persistent and (cfg.split_mask or wgs != 2):
        raise ValueError(f"unsupported Config {cfg}: persistent needs wgs=2, no split_mask")
    if cfg.trim and (wgs != 2 or cfg.split_d or cfg.dq_own or cfg.dq_early or cfg.split_mask or cfg.coop):
        raise ValueError(f"unsupported Config {cfg}: trim needs wgs=2 sharing dS (no dq_own, dq_early, split_d), "
                         "no split_mask, no coop")
    if cfg.split_d:
        if wgs != 2 or cfg.dq_own or cfg.dq_early:
            raise ValueError(f"unsupported Config {cfg}: split_d needs wgs=2, no dq_own, no dq_early")
        return WG_N, MAXNREG, CONSUMER_REGS  # both warpgroups on the same 64 keys
    if wgs == 2:
        return BLOCK_N, MAXNREG, CONSUMER_REGS
    if wgs == 1 and cfg.dq_own:
        # 2 warpgroups (the consumer, the producer's) at 128 registers each: two CTAs an SM by registers, as
        # the Triton dK / dV kernel's 4-warp programs at d=64 run. The producer gives back all but 24; the
        # consumer (the default partition, no setmaxnreg of its own) gets what is left, 256 - 24 = 232.
        return WG_N, 128, 2 * 128 - PRODUCER_REGS
    if wgs == 3 and cfg.dq_own:
        # 4 warpgroups: 128 registers each at launch; the producer gives back all but 24, the consumers
        # get 160 (setmaxnreg; the default partition gets what is left, 512 - 24 - 2 * 160 = 168).
        return 3 * WG_N, 128, 160  # K / V boxes of WG_N rows (kv_box_rows)
    raise ValueError(f"unsupported Config {cfg}: wgs must be 2, or 1 or 3 with dq_own")


def default_config(head_dim: int, causal: bool, fp16: bool = False) -> Config:
    """Ranked on an H100 by scripts/gluon_backward_check.py --sweep (benchmarks/RESULTS.md): without a
    mask the stats as accumulator start values (acc_init) measured 507 vs 468-480 TFLOP/s at d=128
    s=4096; under causal masking no variant beat the plain one (403-418)."""
    if head_dim == 256:
        # split_d, two Q stages and one dO buffer (210 KB of shared memory; a third Q stage would not fit).
        # On an H200 (scripts/probe_backward256.py, benchmarks/RESULTS.md), non-causal: bf16 best with
        # acc_init and rotate (342-352 vs 305-328 TFLOP/s at s=4096; either alone lost), fp16 with rotate
        # alone (323 / 336 vs 318 / 317 at s=4096 / 16384; acc_init lost there). Causal: acc_init and lpt
        # within noise of the plain config (+3% / -4% by seqlen).
        if not causal:
            return Config(64, 2, acc_init=not fp16, split_d=True, rotate=True)
        return Config(64, 2, split_d=True)
    if not causal:
        return Config(64, 2, acc_init=True)
    return Config(64, 2, trim=TRIM_CAUSAL)


def tuning_candidates(head_dim: int, causal: bool):
    """{label: Config} worth timing against default_config (scripts/gluon_backward_check.py --sweep);
    each compiles within Hopper's shared memory without spills (scripts/gluon_backward_compile.py --sweep),
    but the persistent ones at d=128 (68-96 B) and the trimmed ones at d=128 bf16 (8-36 B:
    tests/test_gluon_backward_compile.py)."""
    if head_dim == 256:
        # split_d only (the other layouts do not fit registers / shared memory at d=256).
        cands = {"sd": Config(split_d=True), "acc-sd": Config(acc_init=True, split_d=True)}
        if causal:
            cands.update({"sd-lpt": Config(split_d=True, lpt=True), "acc-sd-lpt": Config(acc_init=True, split_d=True,
                                                                                         lpt=True)})
        else:
            cands.update({"sd-rot": Config(split_d=True, rotate=True)})
        return cands
    cands = {"acc": Config(acc_init=True), "acc-dq2": Config(acc_init=True, dq_bufs=2),
             "dqe": Config(dq_early=True), "acc-dqe": Config(acc_init=True, dq_early=True)}
    if head_dim <= 64:
        # dq_own at d=128 spills one register (the shared-memory base) at 240 registers: not listed.
        cands.update({"own": Config(dq_own=True), "acc-own": Config(acc_init=True, dq_own=True),
                      "own-st3": Config(num_stages=3, dq_own=True),
                      "acc-own-st3": Config(num_stages=3, acc_init=True, dq_own=True)})
        cands.update({"st3": Config(num_stages=3), "acc-st3": Config(num_stages=3, acc_init=True),
                      "acc-st3-dq2": Config(num_stages=3, acc_init=True, dq_bufs=2)})
        # One consumer warpgroup of 64 keys and two CTAs an SM (launch_shape), as the Triton dK / dV kernel's
        # 4-warp programs, which took 0.79-0.87x the time of this kernel's two-warpgroup first pass at d=64
        # (bf16, H100, thirteenth session in benchmarks/RESULTS.md). Not yet run on a GPU.
        cands.update({"own-wg1": Config(dq_own=True, wgs=1), "acc-own-wg1": Config(acc_init=True, dq_own=True, wgs=1),
                      "own-wg1-st3": Config(num_stages=3, dq_own=True, wgs=1),
                      "acc-own-wg1-st3": Config(num_stages=3, acc_init=True, dq_own=True, wgs=1),
                      "acc-own-wg1-dq2": Config(acc_init=True, dq_bufs=2, dq_own=True, wgs=1)})
    if not causal:
        # rotate: the key blocks of a head reduce-add into different dQ tiles at a time (d=256's default); at
        # d=128 acc-rot measured within the default's run-to-run spread (bf16 s=1024 / 4096, H100, thirteenth
        # session in benchmarks/RESULTS.md).
        cands.update({"rot": Config(rotate=True), "acc-rot": Config(acc_init=True, rotate=True)})
    if causal:
        cands.update({"lpt": Config(lpt=True), "acc-lpt": Config(acc_init=True, lpt=True),
                      "acc-dq2-lpt": Config(acc_init=True, dq_bufs=2, lpt=True)})
        if head_dim <= 64:
            cands.update({"split": Config(split_mask=True), "acc-split": Config(acc_init=True, split_mask=True)})
        # Warpgroup 1 idle at the query blocks that see none of its keys (not yet run on a GPU; at d=128 bf16
        # 24-36 B of warpgroup 1's loop values spill: tests/test_gluon_backward_compile.py).
        cands.update({"trim": Config(trim=True), "acc-trim": Config(acc_init=True, trim=True)})
    # The persistent grid (aimed at short sequences); under causal masking heaviest key blocks first (lpt),
    # measured 0.65-0.70x of the default at d=128 s=512 / 1024 (H100), or (-nolpt) a head's key blocks next
    # to each other, sharing its Q / dO in L2 (lpt runs one key block of 132 different heads at once).
    cands.update({"ps": Config(persistent=True, lpt=causal), "acc-ps": Config(acc_init=True, persistent=True,
                                                                              lpt=causal)})
    if causal:
        cands.update({"ps-nolpt": Config(persistent=True), "acc-ps-nolpt": Config(acc_init=True, persistent=True)})
    return cands


def descriptor(t3, block):
    """Host TMA descriptor over a contiguous 3-D tensor with the given box."""
    return TensorDescriptor(t3, list(t3.shape), list(t3.stride()), list(block), smem_layout(block, t3.dtype))


def _descriptor4(t, rows, head_dim):
    shape, strides = tma_view3(t)
    block = [1, rows, head_dim]
    return TensorDescriptor(t, shape, strides, block, smem_layout(block, t.dtype))


def _is_causal(params) -> bool:
    return params.window_left < 0 and params.window_right == 0


def supported(dout, q, k, v, out, softmax_lse, dq, dk, dv, params, seqlens, deterministic) -> bool:
    """Whether backward() handles this call exactly (the backend contract of kernels/backward.py):
    dense bf16/fp16 on an sm_90 GPU, head_dim 64 / 128 / 256, MHA or GQA/MQA, any seqlen_q / seqlen_k,
    non-causal or causal (bottom-right aligned); no dropout, softcap, ALiBi or other windows;
    deterministic or not (backward's DETERMINISTIC mode; at head_dim 256 two passes, two_pass()). q, k, v, dout
    TMA-readable (heads packed at head_dim, 16-byte aligned strides); out, lse, dq, dk, dv, softmax_d
    through their strides."""
    try:
        if not AVAILABLE or seqlens.is_varlen or seqlens.seqused_k is not None:
            return False
        if params.dropout_p != 0 or params.softcap or params.alibi_slopes is not None:
            return False
        if not (params.window_left < 0 and params.window_right in (-1, 0)):
            return False
        if not (params.softmax_scale > 0 and math.isfinite(params.softmax_scale)):
            return False
        if not (isinstance(q, torch.Tensor) and q.is_cuda and q.dim() == 4):
            return False
        if device_capability(q.device)[0] != 9:
            return False
        tensors = (dout, q, k, v, out, dq, dk, dv)
        if q.dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != q.dtype for t in tensors):
            return False
        if any(t.device != q.device for t in (*tensors, softmax_lse)) or any(t.dim() != 4 for t in tensors):
            return False
        batch, seqlen_q, heads, head_dim = q.shape
        _, seqlen_k, heads_k, _ = k.shape
        if not (out.shape == dout.shape == dq.shape == q.shape and v.shape == dk.shape == dv.shape == k.shape):
            return False
        if head_dim not in SUPPORTED_HEAD_DIMS or k.shape[0] != batch or k.shape[3] != head_dim:
            return False
        if heads_k == 0 or heads % heads_k:
            return False
        if seqlens.batch_size != batch or seqlens.max_seqlen_q != seqlen_q or seqlens.max_seqlen_k != seqlen_k:
            return False
        if softmax_lse.dtype != torch.float32 or tuple(softmax_lse.shape) != (batch, heads, seqlen_q):
            return False
        if any(t.stride(3) != 1 for t in tensors if t.shape[3] > 1):
            return False
        if q.numel() == 0 or k.numel() == 0:
            return True  # backward() fills these without the main kernel
        if batch * heads_k > MAX_GRID_Y or max(seqlen_q, seqlen_k) >= 1 << 24:
            return False
        return all(tma_view3(t) is not None for t in (q, k, v, dout))
    except Exception:  # noqa: BLE001 - anything unexpected: let the Triton kernels handle it
        return False


def _kernel_constexprs(cfg: Config, head_dim: int, causal: bool, deterministic: int, consumer_regs: int) -> dict:
    """The main kernel's constexpr arguments for cfg but PERSISTENT (backward() launches them, compile_sm90()
    compiles them); deterministic: the DETERMINISTIC mode (0 off)."""
    dq_own = bool(cfg.dq_own)
    return dict(BLOCK_M=cfg.block_m, HEAD_DIM=head_dim, NUM_STAGES=cfg.num_stages, CAUSAL=bool(causal),
                SPLIT_MASK=bool(cfg.split_mask and causal), ACC_INIT=bool(cfg.acc_init), DQ_BUFS=int(cfg.dq_bufs),
                LPT=bool(cfg.lpt and causal), CONSUMER_REGS=consumer_regs, PRODUCER_REGS=PRODUCER_REGS,
                NUM_WG=int(cfg.wgs), DQ_OWN=dq_own, DQ_EARLY=bool(cfg.dq_early and not dq_own),
                DETERMINISTIC=int(deterministic), SPLIT_D=bool(cfg.split_d),
                ROTATE=bool((cfg.rotate or deterministic == 1) and not causal), NO_DQ=not cfg.with_dq,
                COOP=int(cfg.coop), TRIM=bool(cfg.trim and causal and not deterministic))


def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, config: Config = None,
             dq_accum=None, deterministic: bool = False, gluon_dq: bool = False):
    """Fill dq, dk, dv (b, s, h(k), d) and softmax_d (b, h, sq) for a call supported() accepts.

    config: a Config instead of default_config (tuning, tests; with_dq=False leaves dq alone); dq_accum: a
    preallocated fp32 (b, sq, h, d) contiguous buffer (zeroed by the preprocess kernel); deterministic: dQ added in a fixed
    order of key blocks (deterministic_mode); gluon_dq (with a with_dq=False config): dq from the Gluon dQ
    kernel (gluon_dq.dq_pass) after the main kernel. Returns the launches as a _Plan (None where the main
    kernel did not run or a launch was not recorded)."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    if batch == 0 or num_heads == 0:
        return None
    causal = _is_causal(params)
    cfg = Config(*(config or default_config(head_dim, causal, q.dtype == torch.float16)))
    scale = float(params.softmax_scale)
    launches = []  # the launches as launch.Launch over a call's tensors by name (_Plan)
    with_dq = bool(cfg.with_dq)
    if not with_dq:
        # Never read or written (NO_DQ): a one-box stand-in for the dQ accumulator's descriptor.
        dq_accum = torch.empty((1, cfg.block_m, 1, dq_box_cols(cfg, head_dim)), dtype=torch.float32, device=q.device)
    elif dq_accum is None:
        # Zeroed by the preprocess kernel (ZERO_DQ).
        dq_accum = torch.empty((batch, seqlen_q, num_heads, head_dim), dtype=torch.float32, device=q.device)
    if seqlen_q > 0:
        stats_len = triton.cdiv(seqlen_q, cfg.block_m) * cfg.block_m
        stats = torch.empty((batch * num_heads, 4, stats_len), dtype=torch.float32, device=q.device)
        lse_mul, delta_mul = (-1.0 / scale, -1.0) if cfg.acc_init else (LOG2E, 1.0)
        launch_into(launches, _preprocess_kernel, (stats_len // ROW_BLOCK, batch * num_heads), (
            out, dout, softmax_lse, softmax_d, stats, dq_accum, seqlen_q, num_heads, stats_len, seqlen_k - seqlen_q,
            lse_mul, delta_mul, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), *softmax_lse.stride(), *softmax_d.stride()), dict(HEAD_DIM=head_dim, BLOCK=ROW_BLOCK,
            ZERO_DQ=with_dq, num_warps=4), dict(enumerate(("out", "dout", "softmax_lse", "softmax_d", "stats",
                                                           "dq_accum"))))
    if seqlen_q == 0 or seqlen_k == 0:
        # No query or no key: dK = dV = 0, and dQ = 0 (every row sees no key).
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return None
    block_n, maxnreg, consumer_regs = launch_shape(cfg)
    dq_own = bool(cfg.dq_own)
    n_blocks = triton.cdiv(seqlen_k, block_n)
    mode = deterministic_mode(n_blocks, q.device) if deterministic else 0
    if mode and (dq_own or cfg.split_d or cfg.lpt or cfg.persistent or int(cfg.wgs) != 2):
        raise ValueError(f"the deterministic backward needs two warpgroups sharing dS, no lpt: {cfg}")
    n_m = triton.cdiv(seqlen_q, cfg.block_m)
    counters = torch.zeros((batch * num_heads, n_m, 2), dtype=torch.int32, device=q.device) if mode else stats
    descs = dict(q=_descriptor4(q, cfg.block_m, head_dim), dout=_descriptor4(dout, cfg.block_m, head_dim),
                 k=_descriptor4(k, kv_box_rows(cfg), head_dim), v=_descriptor4(v, kv_box_rows(cfg), head_dim),
                 dq_accum=descriptor(dq_accum.view(dq_accum.shape[0], dq_accum.shape[1], -1),
                                     [1, cfg.block_m, dq_box_cols(cfg, head_dim)]),
                 stats=descriptor(stats, [1, 4, cfg.block_m]))
    lpt = bool(cfg.lpt and causal)
    num_tiles = n_blocks * batch * num_heads_k
    if cfg.persistent:
        grid = (min(num_tiles, multiprocessor_count(q.device)), )
    else:
        grid = (batch * num_heads_k, n_blocks) if lpt else (n_blocks, batch * num_heads_k)
    launch_into(launches, _backward_kernel, grid, (
        *descs.values(), dk, dv, counters, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
        dv.stride(2), seqlen_q, seqlen_k, num_heads, num_heads_k, scale * LOG2E, scale), dict(
        **_kernel_constexprs(cfg, head_dim, causal, mode, consumer_regs),
        **(dict(PERSISTENT=True, num_tiles=num_tiles) if cfg.persistent else {}), num_warps=4, maxnreg=maxnreg),
        dict(enumerate((*(("desc", name, d.shape, d.strides) for name, d in descs.items()), "dk", "dv", "counters"))))
    if with_dq:
        launch_into(launches, _dq_convert_kernel, (triton.cdiv(seqlen_q, ROW_BLOCK), batch * num_heads), (
            dq_accum, dq, seqlen_q, num_heads, scale, dq.stride(0), dq.stride(1), dq.stride(2)),
            dict(HEAD_DIM=head_dim, BLOCK=ROW_BLOCK, num_warps=4), {0: "dq_accum", 1: "dq"})
    elif gluon_dq:
        from pyflash.kernels import gluon_dq as dq_kernel

        launches.append(dq_kernel.dq_pass(dout, q, k, v, softmax_lse, softmax_d, dq, params))
    if None in launches:
        return None
    return _Plan(tuple(launches), tuple(stats.shape), tuple(dq_accum.shape), tuple(counters.shape) if mode else None)


def deterministic_mode(n_key_blocks: int, device) -> int:
    """The deterministic dQ order (_turn_rank): 1 where every key block of a head can be resident at once
    (no more than one per SM), so that the order in which they reach a query block costs no waiting;
    else 2 (ascending key block: waits only for CTAs launched earlier, slower)."""
    return 1 if n_key_blocks <= multiprocessor_count(device) else 2


class _Plan(NamedTuple):
    """The recorded launches of one backward() call (launch.Launch: preprocess, main, dQ convert) and the
    shapes of the buffers each call gets afresh: stats, the fp32 dQ accumulator (the preprocess kernel zeroes
    it) and the deterministic counters (zeroed; without them the kernel's counters argument is stats, never
    read)."""

    launches: tuple
    stats_shape: tuple
    accum_shape: tuple
    counters_shape: tuple  # None unless deterministic

    def __call__(self, named) -> None:
        device = named["q"].device
        named["stats"] = stats = torch.empty(self.stats_shape, dtype=torch.float32, device=device)
        named["dq_accum"] = torch.empty(self.accum_shape, dtype=torch.float32, device=device)
        named["counters"] = stats if self.counters_shape is None else torch.zeros(
            self.counters_shape, dtype=torch.int32, device=device)
        for launch in self.launches:
            launch(named)


_PLANS = Plans()  # launch.call_key -> _Plan, or None for calls supported() rejects


def two_pass(head_dim: int, causal: bool, deterministic: bool, seqlen_k: int = None) -> bool:
    """Whether try_backward takes dQ from a pass of its own: deterministic calls at TWO_PASS_HEAD_DIMS and
    DETERMINISTIC_TWO_PASS_HEAD_DIMS, and at TWO_PASS_HEAD_DIMS causal ones while TWO_PASS_CAUSAL, the others while
    TWO_PASS_NONCAUSAL; and any call with at most TWO_PASS_MAX_SEQLEN_K[(head_dim, causal)] keys (seqlen_k None:
    unknown, not short)."""
    if deterministic:
        return head_dim in TWO_PASS_HEAD_DIMS or head_dim in DETERMINISTIC_TWO_PASS_HEAD_DIMS
    limit = TWO_PASS_MAX_SEQLEN_K.get((head_dim, bool(causal)))
    if limit is not None and seqlen_k is not None and seqlen_k <= limit:
        return True
    return head_dim in TWO_PASS_HEAD_DIMS and (TWO_PASS_CAUSAL if causal else TWO_PASS_NONCAUSAL)


def two_pass_config(head_dim: int, causal: bool) -> Config:
    """The layout without dQ for two_pass() calls. d=256: split_d; acc_init measured 5-8% faster than the
    plain layout there (bf16, H200, scripts/probe_backward256.py: causal s=4096 2.37 vs 2.55 ms, s=16384
    8.42 vs 9.04; non-causal 4.15 vs 4.43), lpt and a second stream for the dQ pass no better
    (benchmarks/RESULTS.md). Other head dims: the plain layout (128 keys a CTA, dS^T in registers), acc_init
    by analogy (d=128: deterministic calls, DETERMINISTIC_TWO_PASS_HEAD_DIMS). d=256 with coop (S^T and dP^T
    once each): 0.70-0.84x split_d's time (bf16 s=512-16384, causal and not, H100, benchmarks/RESULTS.md,
    twelfth session; coop=2 and the persistent grid lost to it)."""
    if head_dim > 128:
        return Config(64, 2, acc_init=True, split_d=True, rotate=not causal, with_dq=False, coop=1)
    return Config(64, 2, acc_init=True, rotate=not causal, with_dq=False, trim=causal and TRIM_CAUSAL)


def try_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, deterministic) -> bool:
    """backward() where supported() accepts the call (True), else nothing (False); the kernels/backward.py
    entry. A call like an earlier one (launch.call_key) skips supported() and Triton's launch path: its
    recorded launches are replayed with this call's tensors (launch.replay_or_record). Where two_pass(),
    the kernel leaves dq alone (with_dq=False) and the Triton dQ kernel fills it (recorded the same way), or
    at a head dim in GLUON_DQ the Gluon dQ kernel (part of the plan)."""
    if not AVAILABLE or seqlens.is_varlen or params.dropout_p != 0:
        return False
    named = dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, dq=dq, dk=dk, dv=dv, softmax_d=softmax_d)
    key = call_key(named.values(), params, seqlens, deterministic, current_device() if q.is_cuda else None,
                   TWO_PASS_HEAD_DIMS, TWO_PASS_CAUSAL, TWO_PASS_NONCAUSAL, DETERMINISTIC_TWO_PASS_HEAD_DIMS, GLUON_DQ,
                   tuple(sorted(TWO_PASS_MAX_SEQLEN_K.items())), TRIM_CAUSAL)
    causal = _is_causal(params)
    split_dq = two_pass(q.shape[-1], causal, deterministic, k.shape[1])
    config = two_pass_config(q.shape[-1], causal) if split_dq else None
    gluon_dq = split_dq and q.shape[-1] in GLUON_DQ
    ran = replay_or_record(
        _PLANS, key, named,
        lambda: supported(dout, q, k, v, out, softmax_lse, dq, dk, dv, params, seqlens, deterministic),
        lambda: backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, config,
                         deterministic=deterministic and not split_dq, gluon_dq=gluon_dq))
    if ran and split_dq and not gluon_dq:
        from pyflash.kernels.backward import backward as triton_backward  # imports this module

        triton_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, True,
                        kernel="triton", dq_only=True, delta_ready=True)
    return ran


def backward_gluon(dout, q, k, v, out, lse, softmax_scale=None, causal=False, *, dq=None, dk=None, dv=None,
                   softmax_d=None, config=None, dq_accum=None, deterministic=False, **overrides):
    """Convenience entry (scripts, tests): dout, q, out (b, sq, h, d), k, v (b, sk, hk, d) bf16/fp16 on
    an sm_90 GPU, lse (b, h, sq) fp32 natural log. Returns (dq, dk, dv) (filled in place when given).
    config (a Config) or keyword overrides of default_config's fields (block_m=, num_stages=,
    split_mask=, acc_init=, dq_bufs=, lpt=, dq_own=, dq_early=, wgs=) pick the variant; deterministic:
    dQ added in a fixed order (bitwise repeatable)."""
    from pyflash.params import AttentionParams, Seqlens

    if not AVAILABLE:
        raise RuntimeError(f"Gluon is not available here (import error {_IMPORT_ERROR!r} or TRITON_INTERPRET=1)")
    batch, seqlen_q, num_heads, head_dim = q.shape
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    params = AttentionParams(softmax_scale, -1, 0 if causal else -1)
    seqlens = Seqlens(batch, seqlen_q, k.shape[1])
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if softmax_d is None:
        softmax_d = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=q.device)
    if not supported(dout, q, k, v, out, lse, dq, dk, dv, params, seqlens, False):
        raise ValueError("this call is not supported by the Gluon backward (see supported())")
    overrides = {name: value for name, value in overrides.items() if value is not None}
    cfg = Config(*(config or default_config(head_dim, causal, q.dtype == torch.float16)))._replace(**overrides)
    backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, cfg, dq_accum=dq_accum,
             deterministic=deterministic)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# Offline compilation for sm_90 (no GPU needed): scripts/gluon_backward_compile.py,
# tests/test_gluon_backward_compile.py. Needs a process where TRITON_INTERPRET is off.
# ------------------------------------------------------------------------------------------------

_SIG_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _desc_type(dtype: str, block):
    return f"tensordesc<{dtype}{list(block)},{smem_layout(block, _SIG_DTYPES[dtype])!r}>"


def kernel_signature(head_dim: int, block_m: int, dtype: str = "bf16", block_n: int = BLOCK_N, dq_cols: int = None):
    """Triton signature of _backward_kernel: Gluon TMA descriptors are typed with their shared layout."""
    qd = _desc_type(dtype, [1, block_m, head_dim])
    kvd = _desc_type(dtype, [1, block_n, head_dim])
    dq_cols = head_dim // 2 if dq_cols is None else dq_cols
    sig = dict(q_desc=qd, do_desc=qd, k_desc=kvd, v_desc=kvd, dq_desc=_desc_type("fp32", [1, block_m, dq_cols]),
               st_desc=_desc_type("fp32", [1, 4, block_m]), dk_ptr=f"*{dtype}", dv_ptr=f"*{dtype}", counters_ptr="*i32",
               qk_scale="fp32", softmax_scale="fp32")
    return {name: sig.get(name, "constexpr" if name.isupper() else "i32") for name in _backward_kernel.arg_names}


def compile_sm90(head_dim: int, causal: bool, config: Config = None, dtype: str = "bf16", deterministic: int = 0):
    """_backward_kernel compiled for sm_90 (Triton's CompiledKernel), as a typical launch specialises it."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = Config(*(config or default_config(head_dim, causal, dtype == "fp16")))
    block_n, maxnreg, consumer_regs = launch_shape(cfg)
    constexprs = dict(_kernel_constexprs(cfg, head_dim, causal, deterministic, consumer_regs),
                      PERSISTENT=bool(cfg.persistent))
    sig = kernel_signature(head_dim, cfg.block_m, dtype, kv_box_rows(cfg), dq_box_cols(cfg, head_dim))
    names = list(sig)
    attrs = {(names.index(n), ): [["tt.divisibility", 16]]
             for n in ("dk_ptr", "dv_ptr", "stride_dkb", "stride_dkn", "stride_dvb", "stride_dvn")}
    src = GluonASTSource(_backward_kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def offline_report(head_dim: int, causal: bool, config=None, dtype: str = "bf16", deterministic: int = 0):
    """compile_sm90 + ptxas_stats as a plain dict: shared (bytes), regs, spill_stores, spill_loads, warnings.
    deterministic: the kernel's DETERMINISTIC mode (0 off, 1 / 2: deterministic_mode)."""
    cfg = Config(*(config or default_config(head_dim, causal, dtype == "fp16")))
    compiled = compile_sm90(head_dim, causal, cfg, dtype, deterministic)
    stats = ptxas_stats(compiled.asm["ptx"])
    return dict(shared=compiled.metadata.shared, regs=stats["regs"], spill_stores=stats["spill_stores"],
                spill_loads=stats["spill_loads"], stack=stats["stack"], warnings=stats["warnings"],
                ptxas_ok=stats["returncode"] == 0, config=list(cfg), ptx=compiled.asm["ptx"])
