"""FlashAttention-3-style backward for Hopper (sm_90) written in Gluon (prototype).

Three launches:

1. ``_preprocess_kernel`` (plain Triton): delta = rowsum(dO * O) and lse2 = log2(e) * lse, written to
   two (batch * heads, seqlen_pad) fp32 buffers, seqlen_pad a multiple of BLOCK_M. Padding rows get
   delta = 0, lse2 = +inf (so their P is exactly 0): the main kernel loads both without masks.
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

Causal (seqlen_q == seqlen_k): query blocks entirely above the diagonal are skipped (the loop starts
at the block holding the key block's first key). By default every causal step applies the mask
(query index >= key index; a no-op past the first BLOCK_N / BLOCK_M steps) in one loop body: the
query indices are read from shared memory (a third row of the lse2/delta TMA box) because an iota
would be hoisted out of the loop and hold 16-32 registers, which spilled. SPLIT_MASK (split_mask=True)
keeps separate masked and unmasked loops instead (cheaper per step, but two loop bodies spill at d=128). Ragged ends need no mask: TMA reads zeros past a sequence's end (a zero K row only
produces dS entries that meet that zero K row in dQ, and its dK, dV rows are never stored; padded
query rows have P = 0 through lse2 = +inf), and the dQ reduce is clipped at the sequence end.

Tensors are (batch, seqlen, heads, head_dim) contiguous; TMA descriptors are 3-D over the
(batch, seqlen, heads * head_dim) view. dK, dV are written from registers by pointer (once per CTA).
"""
from __future__ import annotations

import math
import os

import torch

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
MAXNREG = 168  # 65536 registers / (3 warpgroups * 128 threads), rounded down to a multiple of 8


def default_config(head_dim: int, causal: bool):
    """(block_m, num_stages): query rows per step and depth of the Q/dO ring."""
    if head_dim <= 64:
        return 64, 2
    return 64, 2


if _IMPORT_ERROR is None:

    @_gl_builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """cp.reduce.async.bulk.tensor .add: global[coord box] += shared src (a bulk async group:
        tma.store_wait covers it). Triton 3.6 has the op but no Gluon wrapper for Hopper."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)

    @gluon.jit
    def _producer(q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem, kv_ready,
                  q_ready, do_ready, stage_empty, batch, bh, col, start_n, m_lo, n_steps,
                  BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr):
        mbarrier.expect(kv_ready.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, start_n, col], kv_ready.index(0), k_smem)
        tma.async_copy_global_to_shared(v_desc, [batch, start_n, col], kv_ready.index(0), v_smem)
        for t in range(n_steps):
            stage = t % NUM_STAGES
            # Fresh mbarriers count as having completed the phase before phase 0.
            phase = ((t // NUM_STAGES) & 1) ^ 1
            m0 = (m_lo + t) * BLOCK_M
            mbarrier.wait(stage_empty.index(stage), phase)
            # Q_i with the (lse2, delta) pair of its rows: both are needed to form P.
            mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes + st_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [batch, m0, col], q_ready.index(stage), q_smem.index(stage))
            tma.async_copy_global_to_shared(st_desc, [bh, 0, m0], q_ready.index(stage), st_smem.index(stage))
            mbarrier.expect(do_ready.index(stage), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [batch, m0, col], do_ready.index(stage), do_smem.index(stage))

    @gluon.jit
    def _step(t, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem, dq_desc, q_ready, do_ready,
              stage_empty, ds_ready, key0, batch, dq_col, m_lo, qk_scale,
              s_layout: gl.constexpr, dq_layout: gl.constexpr, op_layout: gl.constexpr,
              BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
              MASKED: gl.constexpr):
        """One query block: dV, dK += ..., dQ partial reduced into global memory."""
        WG_ROWS: gl.constexpr = k_w.shape[0]
        HALF: gl.constexpr = HEAD_DIM // 2
        dtype: gl.constexpr = q_smem.dtype
        stage = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        m0 = (m_lo + t) * BLOCK_M
        q = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        do = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])

        mbarrier.wait(q_ready.index(stage), phase)
        s_tok = warpgroup_mma(k_w, q.permute((1, 0)), gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(stage), phase)
        dp_tok = warpgroup_mma(v_w, do.permute((1, 0)), gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout),
                               use_acc=False, is_async=True)
        # wgmma groups retire in order: one outstanding means S^T is done, dP^T may still run.
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        # The [1, 4, BLOCK_M] TMA box (no swizzle; row 3 unused: boxes are powers of 2) read as 4 * BLOCK_M contiguous floats.
        stats = st_smem.index(stage)._reinterpret(gl.float32, [4 * BLOCK_M],
                                                  gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        row_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        lse2 = stats.slice(0, BLOCK_M).load(row_layout)
        p = gl.exp2(s * qk_scale - lse2[None, :])
        if MASKED:
            # The query indices come from shared memory (the third stats row, as floats): an iota here
            # would be hoisted out of the loop by the compiler and hold 16-32 registers throughout.
            queries = stats.slice(2 * BLOCK_M, BLOCK_M).load(row_layout)
            keys = (key0 + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))).to(gl.float32)
            p = gl.where(queries[None, :] >= keys[:, None], p, 0.0)
        p = p.to(dtype)  # dS below uses the rounded P too, as PyTorch's softmax backward does: fewer registers
        p_op = gl.convert_layout(p, op_layout)
        dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
        dp = warpgroup_mma_wait(1, deps=(dp_tok, ))
        delta = stats.slice(BLOCK_M, BLOCK_M).load(row_layout)
        ds = (p.to(gl.float32) * (dp - delta[None, :])).to(dtype)
        ds_op = gl.convert_layout(ds, op_layout)
        dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)

        # dS^T rows of this warpgroup into the shared buffer; then dQ over both warpgroups' keys.
        buf = t % 2
        ds_buf = ds_smem.index(buf)
        ds_buf.slice(WG * WG_ROWS, WG_ROWS, dim=0).store(ds)
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(buf))
        mbarrier.wait(ds_ready.index(buf), (t // 2) & 1)
        dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_half, gl.zeros([BLOCK_M, HALF], gl.float32, dq_layout),
                               use_acc=False, is_async=True)
        dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
        mbarrier.arrive(stage_empty.index(stage))

        # dQ half: registers -> shared (after the previous reduce has read it) -> TMA reduce-add.
        tma.store_wait(0)
        gl.thread_barrier()
        dq_buf = dq_smem.index(WG)
        dq_buf.reshape([BLOCK_M, HALF]).store(dq)
        fence_async_shared()
        gl.thread_barrier()
        _tma_reduce_add(dq_desc, [batch, m0, dq_col], dq_buf)
        return dk, dv

    @gluon.jit
    def _consumer(q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready, do_ready,
                  stage_empty, ds_ready, dk_ptr, dv_ptr, batch, head, num_heads, seqlen,
                  col, start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale,
                  BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                  CAUSAL: gl.constexpr, SPLIT_MASK: gl.constexpr):
        BLOCK_N_: gl.constexpr = 2 * 64
        WG_ROWS: gl.constexpr = 64
        HALF: gl.constexpr = HEAD_DIM // 2
        dtype: gl.constexpr = q_smem.dtype
        # wgmma accumulators: warps stacked along M (4 warps x 16 rows), instruction N = tile N.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, HALF, 16])
        # P^T, dS^T as the register A operand of the dV / dK wgmma.
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        key0 = start_n + WG * WG_ROWS  # first key of this warpgroup

        k_full = k_smem.reshape([BLOCK_N_, HEAD_DIM])
        k_w = k_full.slice(WG * WG_ROWS, WG_ROWS, dim=0)
        v_w = v_smem.reshape([BLOCK_N_, HEAD_DIM]).slice(WG * WG_ROWS, WG_ROWS, dim=0)
        k_half = k_full.slice(WG * HALF, HALF, dim=1)
        dq_col = col + WG * HALF

        dk = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, kv_layout)
        dv = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, kv_layout)
        mbarrier.wait(kv_ready.index(0), 0)
        if SPLIT_MASK:
            # Diagonal steps through the mask, the rest without it (two copies of the loop body).
            for t in range(0, n_masked):
                dk, dv = _step(t, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem, dq_desc,
                               q_ready, do_ready, stage_empty, ds_ready, key0, batch, dq_col, m_lo,
                               qk_scale, s_layout, dq_layout, op_layout, BLOCK_M, HEAD_DIM, NUM_STAGES, WG, True)
            for t in range(n_masked, n_steps):
                dk, dv = _step(t, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem, dq_desc,
                               q_ready, do_ready, stage_empty, ds_ready, key0, batch, dq_col, m_lo,
                               qk_scale, s_layout, dq_layout, op_layout, BLOCK_M, HEAD_DIM, NUM_STAGES, WG, False)
        else:
            # One loop body; under causal every step applies the mask (a no-op past the diagonal).
            for t in range(0, n_steps):
                dk, dv = _step(t, dk, dv, k_w, v_w, k_half, q_smem, do_smem, st_smem, ds_smem, dq_smem, dq_desc,
                               q_ready, do_ready, stage_empty, ds_ready, key0, batch, dq_col, m_lo,
                               qk_scale, s_layout, dq_layout, op_layout, BLOCK_M, HEAD_DIM, NUM_STAGES, WG, CAUSAL)

        # Epilogue: dK (times the softmax scale), dV from registers by pointer, rows past the end dropped.
        rows = start_n + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, kv_layout))
        dcols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
        offs = (batch * seqlen + rows).to(gl.int64)[:, None] * (num_heads * HEAD_DIM) + (col + dcols)[None, :]
        mask = (rows < seqlen)[:, None] & (dcols < HEAD_DIM)[None, :]
        gl.store(dk_ptr + offs, (dk * softmax_scale).to(dtype), mask=mask)
        gl.store(dv_ptr + offs, dv.to(dtype), mask=mask)
        tma.store_wait(0)

    @gluon.jit
    def _backward_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, st_desc, dk_ptr, dv_ptr, seqlen,
                         num_heads, qk_scale, softmax_scale,
                         BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                         CAUSAL: gl.constexpr, SPLIT_MASK: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         PRODUCER_REGS: gl.constexpr):
        BLOCK_N_: gl.constexpr = k_desc.block_type.shape[1]
        HALF: gl.constexpr = HEAD_DIM // 2
        start_n = gl.program_id(0) * BLOCK_N_
        batch = gl.program_id(1) // num_heads
        head = gl.program_id(1) % num_heads
        col = head * HEAD_DIM
        n_m = gl.cdiv(seqlen, BLOCK_M)
        if CAUSAL:
            # Query blocks from the one holding this key block's first key; the first
            # BLOCK_N / BLOCK_M of them cross the diagonal.
            m_lo = start_n // BLOCK_M
            n_steps = n_m - m_lo
            n_masked = gl.minimum(n_steps, gl.cdiv(start_n + BLOCK_N_ - 1 - m_lo * BLOCK_M, BLOCK_M))
        else:
            m_lo = 0
            n_steps = n_m
            n_masked = 0

        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
        st_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + st_desc.block_type.shape, st_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N_, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N_, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
        kv_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        stage_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_ready.index(0), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(stage_empty.index(i), count=2)  # one arrive per consumer warpgroup
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                         do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, batch, head, num_heads, seqlen,
                         col, start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale,
                         BLOCK_M, HEAD_DIM, NUM_STAGES, 0, CAUSAL, SPLIT_MASK)),
            (_consumer, (q_smem, do_smem, k_smem, v_smem, st_smem, ds_smem, dq_smem, dq_desc, kv_ready, q_ready,
                         do_ready, stage_empty, ds_ready, dk_ptr, dv_ptr, batch, head, num_heads, seqlen,
                         col, start_n, m_lo, n_steps, n_masked, qk_scale, softmax_scale,
                         BLOCK_M, HEAD_DIM, NUM_STAGES, 1, CAUSAL, SPLIT_MASK)),
            (_producer, (q_desc, do_desc, k_desc, v_desc, st_desc, q_smem, do_smem, k_smem, v_smem, st_smem,
                         kv_ready, q_ready, do_ready, stage_empty, batch, gl.program_id(1), col, start_n, m_lo,
                         n_steps, BLOCK_M, NUM_STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


if triton is not None:

    @triton.jit
    def _preprocess_kernel(out, dout, lse, stats, seqlen, num_heads, stats_len,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """stats[bh, 0] = lse2 = log2(e) * lse, stats[bh, 1] = delta = rowsum(O * dO) in a
        (b * h, 4, stats_len) fp32 buffer (row 3 unused); padding rows get lse2 = +inf, delta = 0. stats[bh, 2] holds
        the row index itself (as a float: exact below 2**24), which the causal mask compares."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        batch = bh // num_heads
        head = bh % num_heads
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, HEAD_DIM)
        valid = rows < seqlen
        offs = ((batch * seqlen + rows).to(tl.int64) * num_heads + head)[:, None] * HEAD_DIM + cols[None, :]
        o = tl.load(out + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        do = tl.load(dout + offs, mask=valid[:, None], other=0.0).to(tl.float32)
        base = stats + bh.to(tl.int64) * 4 * stats_len + rows
        lse_val = tl.load(lse + bh.to(tl.int64) * seqlen + rows, mask=valid, other=float("inf"))
        tl.store(base, lse_val * 1.4426950408889634)
        tl.store(base + stats_len, tl.sum(o * do, axis=1))
        tl.store(base + 2 * stats_len, rows.to(tl.float32))

    @triton.jit
    def _dq_convert_kernel(dq_accum, dq, numel, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.load(dq_accum + offs, mask=mask, other=0.0)
        tl.store(dq + offs, (acc * scale).to(dq.dtype.element_ty), mask=mask)


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def smem_layout(block_shape, torch_dtype):
    """The NVMMA shared layout (128-byte swizzle where it fits) of a TMA box of block_shape."""
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), getattr(gl, _GL_DTYPES[torch_dtype]))


def descriptor(t3, block):
    """Host TMA descriptor over a (batch, seqlen, heads * head_dim) view with the given box."""
    return TensorDescriptor(t3, list(t3.shape), list(t3.stride()), list(block), smem_layout(block, t3.dtype))


def backward_gluon(dout, q, k, v, out, lse, softmax_scale=None, causal=False, *, dq=None, dk=None, dv=None,
                   block_m=None, num_stages=None, split_mask=False, dq_accum=None):
    """Attention backward on Hopper: dout, q, k, v, out (batch, seqlen, heads, head_dim) contiguous
    bf16/fp16 of one shape (MHA, seqlen_q == seqlen_k), lse (batch, heads, seqlen) fp32 natural log.
    Returns (dq, dk, dv) in q's dtype (filled in place when given: contiguous, q's shape and dtype).

    block_m / num_stages override default_config (tuning); split_mask (causal): separate masked and
    unmasked loops (fewer ALU ops per step, but it spills at d=128: see scripts/gluon_backward_compile.py);
    dq_accum: a preallocated fp32 buffer of q's shape (zeroed here)."""
    if not AVAILABLE:
        raise RuntimeError(f"Gluon is not available here (import error {_IMPORT_ERROR!r} or TRITON_INTERPRET=1)")
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        raise RuntimeError("the Gluon backward needs a Hopper (sm_90) GPU")
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype == dout.dtype
                                                                == out.dtype):
        raise ValueError("q, k, v, out, dout must share a dtype of bf16/fp16")
    if q.dim() != 4 or not (q.shape == k.shape == v.shape == out.shape == dout.shape):
        raise ValueError(f"q, k, v, out, dout must be (batch, seqlen, heads, head_dim) of one shape: "
                         f"{tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)} {tuple(out.shape)} {tuple(dout.shape)}")
    batch, seqlen, num_heads, head_dim = q.shape
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
    if block_m is not None and block_m not in (64, 128):
        raise ValueError(f"block_m must be 64 or 128, got {block_m}")
    if lse.shape != (batch, num_heads, seqlen) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 of shape {(batch, num_heads, seqlen)}")
    q, k, v, out, dout, lse = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v, out, dout, lse))
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    d_block_m, d_stages = default_config(head_dim, causal)
    block_m = block_m or d_block_m
    num_stages = num_stages or d_stages
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        if t is not None and (t.shape != q.shape or t.dtype != q.dtype or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if q.numel() == 0:
        return dq, dk, dv
    if batch * num_heads > 65535:
        raise ValueError("batch * heads must be at most 65535 (the grid's y dimension)")

    stats_len = triton.cdiv(seqlen, block_m) * block_m
    stats = torch.empty((batch * num_heads, 4, stats_len), dtype=torch.float32, device=q.device)
    _preprocess_kernel[(stats_len // 64, batch * num_heads)](
        out, dout, lse, stats, seqlen, num_heads, stats_len, HEAD_DIM=head_dim, BLOCK=64, num_warps=4)
    if dq_accum is None:
        dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_accum.zero_()

    views = [t.view(batch, seqlen, num_heads * head_dim) for t in (q, dout, k, v, dq_accum)]
    q_desc = descriptor(views[0], [1, block_m, head_dim])
    do_desc = descriptor(views[1], [1, block_m, head_dim])
    k_desc = descriptor(views[2], [1, BLOCK_N, head_dim])
    v_desc = descriptor(views[3], [1, BLOCK_N, head_dim])
    dq_desc = descriptor(views[4], [1, block_m, head_dim // 2])
    st_desc = descriptor(stats, [1, 4, block_m])
    grid = (triton.cdiv(seqlen, BLOCK_N), batch * num_heads)
    _backward_kernel[grid](q_desc, do_desc, k_desc, v_desc, dq_desc, st_desc, dk, dv, seqlen, num_heads,
                           softmax_scale * LOG2E, softmax_scale, BLOCK_M=block_m, HEAD_DIM=head_dim,
                           NUM_STAGES=num_stages, CAUSAL=bool(causal), SPLIT_MASK=bool(split_mask and causal), CONSUMER_REGS=CONSUMER_REGS,
                           PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG)
    numel = dq.numel()
    _dq_convert_kernel[(triton.cdiv(numel, 4096), )](dq_accum, dq, numel, softmax_scale, BLOCK=4096, num_warps=8)
    return dq, dk, dv
