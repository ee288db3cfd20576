"""FlashAttention-3-style forward for Hopper (sm_90) written in Gluon (prototype).

One CTA owns BLOCK_M = 128 query rows of one (batch, head) and runs three warp-specialized
partitions (``gl.warp_specialize``):

* producer (1 warp, few registers): TMA loads of the two 64-row Q halves (once) and of the K and V
  tiles into a NUM_STAGES-deep ring in shared memory.
* consumer 0 (the default partition, 4 warps = one warpgroup) and consumer 1 (a worker partition of
  4 warps): each owns 64 of the 128 query rows and runs the online softmax over the same key blocks
  with asynchronous wgmma, Q, K and V read straight from shared memory, P fed from registers.

Barriers (mbarriers in shared memory, one slot per ring stage):

* ``q_ready[w]``          producer -> consumer w: Q half w has landed (TMA transaction count).
* ``k_ready/v_ready[s]``  producer -> consumers: K_j / V_j has landed in stage s.
* ``k_empty/v_empty[s]``  consumers -> producer: both warpgroups are done reading stage s (count 2).
* ``turn[w]`` (PINGPONG)  consumer 1-w -> consumer w: "your turn to issue GEMMs". The warpgroups
  alternate their GEMM issue so that one warpgroup's softmax (MUFU exp2) runs while the other's
  GEMMs occupy the tensor cores (FlashAttention-3's ping-pong schedule).

Inside a consumer (FlashAttention-3's intra-warpgroup overlap): at key block j it issues
S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, waits for S_j only, runs the softmax of S_j while
the PV GEMM still runs, then waits for the PV GEMM, rescales O and releases K_j / V_{j-1}.

Scores stay in raw units; the softmax scale and log2(e) are folded into one FMA,
p = exp2(s * scale_log2 - m * scale_log2). Only the last key block (seqlen not a multiple of
BLOCK_N) and, for causal, the diagonal blocks go through the mask.

Tensors are (batch, seqlen, heads, head_dim) contiguous; TMA descriptors are 3-D over the
(batch, seqlen, heads * head_dim) view with boxes [1, rows, head_dim], so loads past a sequence's end
read zeros and the O store is clipped at the sequence end (never writes the next batch's rows).
The O tile is staged through the (then dead) Q buffer of its warpgroup.
"""
from __future__ import annotations

import math
import os

import torch

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
BLOCK_M = 128  # query rows per CTA
WG_M = 64  # query rows per consumer warpgroup
CONSUMER_REGS = 240  # setmaxnreg of consumer warpgroup 1 (consumer 0 gets what maxnreg leaves)
PRODUCER_REGS = 24
MAXNREG = 168  # 65536 registers / (3 warpgroups * 128 threads), rounded down to a multiple of 8


def default_config(head_dim: int, causal: bool):
    """(block_n, num_stages) for a head dim: the tiles FlashAttention-3 uses on H100, bounded by
    registers (S is 64 x BLOCK_N fp32 per warpgroup, O 64 x head_dim) and shared memory."""
    if head_dim <= 64:
        return 128, 3
    if head_dim <= 128:
        return 128, 2
    return 64, 2


if _IMPORT_ERROR is None:

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty,
                  batch, q_col, kv_col, start_m, n_blocks,
                  BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, WG_ROWS: gl.constexpr):
        # Q: one load per consumer warpgroup so that each can start as soon as its half is in.
        for w in gl.static_range(2):
            mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [batch, start_m + w * WG_ROWS, q_col], q_ready.index(w),
                                            q_smem.index(w))
        for j in range(n_blocks):
            stage = j % NUM_STAGES
            # Fresh mbarriers count as having completed the phase before phase 0: the first pass
            # through the ring waits on parity 1 and goes straight through.
            phase = ((j // NUM_STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(stage), phase)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [batch, j * BLOCK_N, kv_col], k_ready.index(stage),
                                            k_smem.index(stage))
            mbarrier.wait(v_empty.index(stage), phase)
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [batch, j * BLOCK_N, kv_col], v_ready.index(stage),
                                            v_smem.index(stage))

    @gluon.jit
    def _softmax(s, m_i, l_i, rows, cols, seqlen, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
        """Online-softmax step on the raw scores s (WG_M, BLOCK_N): returns p (fp32), alpha, m, l."""
        if MASKED:
            visible = cols[None, :] < seqlen
            if CAUSAL:
                # seqlen_q == seqlen_k: bottom-right and top-left alignment coincide.
                visible = visible & (cols[None, :] <= rows[:, None])
            s = gl.where(visible, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_scaled = m_new * qk_scale
        if MASKED:
            # A row with no visible key yet keeps m = -inf: subtract 0 so p and alpha are 0, not NaN.
            m_scaled = gl.where(m_new == float("-inf"), 0.0, m_scaled)
        p = gl.exp2(s * qk_scale - m_scaled[:, None])
        alpha = gl.exp2(m_i * qk_scale - m_scaled)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _pingpong_wait(turn, count, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.wait(turn.index(WG), count & 1)
        return count + 1

    @gluon.jit
    def _pingpong_pass(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))

    @gluon.jit
    def _attend(j, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn,
                rows, col_offs, seqlen, qk_scale,
                s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                WG: gl.constexpr, PINGPONG: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
        """Key block j >= 1: S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together, softmax of
        S_j under the PV GEMM, then O rescaled by alpha_j."""
        WG_ROWS: gl.constexpr = q.shape[0]
        stage = j % NUM_STAGES
        prev = (j - 1) % NUM_STAGES
        mbarrier.wait(k_ready.index(stage), (j // NUM_STAGES) & 1)
        k_t = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        v_prev = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_t, gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                              is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_STAGES) & 1)
        o_tok = warpgroup_mma(p, v_prev, o, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG)
        # wgmma groups retire in order: one outstanding means S_j is done, PV may still run.
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(stage))
        p_new, alpha, m_i, l_i = _softmax(s, m_i, l_i, rows, j * BLOCK_N + col_offs, seqlen, qk_scale, MASKED, CAUSAL)
        o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(prev))
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = gl.convert_layout(p_new.to(q.dtype), p_layout)
        return o, p, m_i, l_i, turn_count

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, o_desc, q_ready, k_ready, k_empty, v_ready, v_empty, turn, lse_ptr,
                  batch, head, num_heads, q_col, start_m, seqlen, n_blocks, n_full, qk_scale, softmax_scale,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                  WG_ROWS: gl.constexpr, PINGPONG: gl.constexpr, CAUSAL: gl.constexpr):
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

        q = q_smem.index(WG).reshape([WG_ROWS, HEAD_DIM])
        mbarrier.wait(q_ready.index(WG), 0)

        # Block 0 on its own (always through the mask: it may be the diagonal or the ragged end).
        m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([WG_ROWS], gl.float32, row_layout)
        turn_count = 0
        mbarrier.wait(k_ready.index(0), 0)
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0))
        p32, alpha, m_i, l_i = _softmax(s, m_i, l_i, rows, col_offs, seqlen, qk_scale, True, CAUSAL)
        p = gl.convert_layout(p32.to(dtype), p_layout)
        o = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, o_layout)

        # Blocks every row sees whole, then the masked tail (diagonal for causal, ragged end).
        for j in range(1, n_full):
            o, p, m_i, l_i, turn_count = _attend(j, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty,
                                                 v_ready, v_empty, turn, rows, col_offs, seqlen, qk_scale, s_layout,
                                                 o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, PINGPONG,
                                                 False, CAUSAL)
        for j in range(gl.maximum(n_full, 1), n_blocks):
            o, p, m_i, l_i, turn_count = _attend(j, o, p, m_i, l_i, turn_count, q, k_smem, v_smem, k_ready, k_empty,
                                                 v_ready, v_empty, turn, rows, col_offs, seqlen, qk_scale, s_layout,
                                                 o_layout, p_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, WG, PINGPONG,
                                                 True, CAUSAL)

        # Last PV GEMM.
        last = (n_blocks - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // NUM_STAGES) & 1)
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        o_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG)
        o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(last))

        # Epilogue: O / l through this warpgroup's (now dead) Q buffer and a TMA store; lse by pointer.
        l_safe = gl.where(l_i > 0.0, l_i, 1.0)
        o = o * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
        lse = gl.where(l_i > 0.0, m_i * softmax_scale + gl.log(l_safe), float("inf"))
        lse_rows = lse_ptr + (batch * num_heads + head).to(gl.int64) * seqlen + rows
        gl.store(lse_rows, lse, mask=rows < seqlen)
        q_smem.index(WG).reshape([WG_ROWS, HEAD_DIM]).store(o.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [batch, start_m + WG * WG_ROWS, q_col], q_smem.index(WG))
        tma.store_wait(0)

    @gluon.jit
    def _forward_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, seqlen, num_heads, qk_scale, softmax_scale,
                        BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                        CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr):
        WG_ROWS: gl.constexpr = q_desc.block_type.shape[1]
        TILE_M: gl.constexpr = 2 * WG_ROWS
        # Reverse order: under causal masking the last query tiles see the most keys; start them first.
        start_m = (gl.num_programs(0) - 1 - gl.program_id(0)) * TILE_M
        batch = gl.program_id(1) // num_heads
        head = gl.program_id(1) % num_heads
        col = head * HEAD_DIM
        if CAUSAL:
            hi = gl.minimum(seqlen, start_m + TILE_M)
            n_full = gl.minimum((start_m + 1) // BLOCK_N, seqlen // BLOCK_N)
        else:
            hi = seqlen
            n_full = seqlen // BLOCK_N
        n_blocks = gl.cdiv(hi, BLOCK_N)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(q_ready.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # one arrive per consumer warpgroup
            mbarrier.init(v_empty.index(i), count=2)
        if PINGPONG:
            mbarrier.arrive(turn.index(0))  # consumer 0 issues first
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, o_desc, q_ready, k_ready, k_empty, v_ready, v_empty, turn, lse_ptr,
                         batch, head, num_heads, col, start_m, seqlen, n_blocks, n_full, qk_scale, softmax_scale,
                         BLOCK_N, HEAD_DIM, NUM_STAGES, 0, WG_ROWS, PINGPONG, CAUSAL)),
            (_consumer, (q_smem, k_smem, v_smem, o_desc, q_ready, k_ready, k_empty, v_ready, v_empty, turn, lse_ptr,
                         batch, head, num_heads, col, start_m, seqlen, n_blocks, n_full, qk_scale, softmax_scale,
                         BLOCK_N, HEAD_DIM, NUM_STAGES, 1, WG_ROWS, PINGPONG, CAUSAL)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty,
                         batch, col, col, start_m, n_blocks, BLOCK_N, NUM_STAGES, WG_ROWS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def smem_layout(block_shape, torch_dtype):
    """The NVMMA shared layout (128-byte swizzle where it fits) of a TMA box of block_shape."""
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), getattr(gl, _GL_DTYPES[torch_dtype]))


def descriptor(t3, rows: int, head_dim: int):
    """Host TMA descriptor over a (batch, seqlen, heads * head_dim) view with box [1, rows, head_dim]."""
    block = [1, rows, head_dim]
    return TensorDescriptor(t3, list(t3.shape), list(t3.stride()), block, smem_layout(block, t3.dtype))


def forward_gluon(q, k, v, softmax_scale=None, causal=False, *, block_n=None, num_stages=None, pingpong=True,
                  out=None, lse=None):
    """Attention forward on Hopper: q, k, v (batch, seqlen, heads, head_dim) contiguous bf16/fp16,
    same shapes. Returns (out (b, s, h, d) in q's dtype, lse (b, h, s) fp32, natural log).

    block_n / num_stages / pingpong override default_config (tuning); out / lse: preallocated
    contiguous outputs to fill (tests poison them to catch rows the kernel never writes)."""
    if not AVAILABLE:
        raise RuntimeError(f"Gluon is not available here (import error {_IMPORT_ERROR!r} or TRITON_INTERPRET=1)")
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        raise RuntimeError("the Gluon forward needs a Hopper (sm_90) GPU")
    if q.dtype not in _GL_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype of bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, seqlen, heads, head_dim) of one shape: "
                         f"{tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}")
    batch, seqlen, num_heads, head_dim = q.shape
    if head_dim not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256, got {head_dim}")
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    d_block_n, d_stages = default_config(head_dim, causal)
    block_n = block_n or d_block_n
    num_stages = num_stages or d_stages

    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((batch, num_heads, seqlen), dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    if lse.shape != (batch, num_heads, seqlen) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {(batch, num_heads, seqlen)}")
    if q.numel() == 0:
        return out, lse
    views = [t.view(batch, seqlen, num_heads * head_dim) for t in (q, k, v, out)]
    q_desc = descriptor(views[0], WG_M, head_dim)
    k_desc = descriptor(views[1], block_n, head_dim)
    v_desc = descriptor(views[2], block_n, head_dim)
    o_desc = descriptor(views[3], WG_M, head_dim)
    if batch * num_heads > 65535:
        raise ValueError("batch * heads must be at most 65535 (the grid's y dimension)")
    grid = (triton.cdiv(seqlen, BLOCK_M), batch * num_heads)
    _forward_kernel[grid](q_desc, k_desc, v_desc, o_desc, lse, seqlen, num_heads, softmax_scale * LOG2E,
                          softmax_scale, BLOCK_N=block_n, HEAD_DIM=head_dim, NUM_STAGES=num_stages,
                          CAUSAL=bool(causal), PINGPONG=bool(pingpong), CONSUMER_REGS=CONSUMER_REGS,
                          PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG)
    return out, lse
