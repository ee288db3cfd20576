"""The backward's dQ pass for Hopper (sm_90) in Gluon, shaped like the forward (kernels/gluon_forward.py).

The two-pass backward (gluon_backward.two_pass) takes dK, dV and softmax_d from the Gluon kernel without
its dQ work and dQ from a pass of its own; this is that pass. One CTA owns 64 * NUM_WG query rows of one
(batch, head) and walks their key blocks in a fixed order, so dQ is deterministic and never leaves
registers until its one store:

* producer (1 warp): TMA loads of each warpgroup's Q and dO rows (once) and of K_j and V_j into a
  NUM_STAGES-deep ring.
* consumers (NUM_WG warpgroups of 64 rows): at key block j, S_j = Q K_j^T, dP_j = dO V_j^T and
  dQ += dS_{j-1} K_{j-1} are issued back to back as asynchronous wgmma; P_j = exp2(S_j * scale * log2(e)
  - lse * log2(e)) runs under dP_j and the previous dQ GEMM, dS_j = P_j (dP_j - delta) under that dQ GEMM;
  dS_j stays in registers as the next dQ GEMM's A operand. The Triton dQ kernel (kernels/backward.py)
  waits for S before it issues dP and for dQ before the next S, so its tensor cores idle through the
  element-wise work (DEVELOPERS.md).

Barriers: ``q_ready[w]`` (producer -> consumer w: Q and dO rows of w have landed), ``k_ready / v_ready[s]``
(producer -> consumers), ``k_empty / v_empty[s]`` (consumers -> producer, count NUM_WG): V_j is released
once dP_j has retired, K_j once dQ's GEMM over it has.

Calls: what gluon_backward.supported accepts (dense bf16 / fp16, head_dim 64 / 128 / 256, GQA / MQA,
seqlen_q != seqlen_k bottom-right aligned, causal or not, no window / softcap / ALiBi / dropout), with
softmax_d already holding rowsum(dO * O) (the Gluon kernel's preprocess wrote it). Key ranges, the
diagonal and the ragged end as in the forward (gluon_forward._tile_range). dq is written through its
strides, rows past seqlen_q never.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pyflash.kernels.aot import ptxas_stats
from pyflash.kernels.gluon_forward import (LOG2E, PRODUCER_REGS, SM90_MAX_SHARED, WG_M, _IMPORT_ERROR, descriptor,
                                          register_budget, smem_layout)
from pyflash.kernels.launch import Launch, record

if _IMPORT_ERROR is None:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)

    from pyflash.kernels.gluon_forward import (_load_kv, _pingpong_pass, _pingpong_wait, _ring_barriers,
                                              _tile_range)


class Config(NamedTuple):
    """Key block size, K / V ring depth, consumer warpgroups (64 query rows each), and pingpong (two
    warpgroups): they take turns issuing their GEMMs of a key block, as the forward's do, so that one's
    element-wise work runs under the other's GEMMs (not measured yet, so off by default)."""

    block_n: int
    num_stages: int
    num_wg: int = 2
    pingpong: bool = False


def config_label(cfg: Config) -> str:
    return f"bn{cfg.block_n}-st{cfg.num_stages}-wg{cfg.num_wg}{'-pp' if cfg.pingpong else ''}"


def shared_bytes(head_dim: int, cfg: Config, element_size: int = 2) -> int:
    """Shared memory of a launch: Q and dO per warpgroup, the K / V ring, barriers."""
    tiles = 2 * cfg.num_wg * WG_M * head_dim + 2 * cfg.num_stages * cfg.block_n * head_dim
    return tiles * element_size + 8 * (2 * cfg.num_wg + 4 * cfg.num_stages)


def default_config(head_dim: int, causal: bool) -> Config:
    """Bounded by registers (dQ is 64 x head_dim fp32 a warpgroup, S and dP 64 x block_n each) and shared
    memory (Q and dO stay resident: 64 KB a warpgroup at d=256). d=128: the best of the 14 candidates timed
    (bf16 causal s=4096, H100: 0.615 ms, next 0.734; benchmarks/RESULTS.md, eleventh session). d=256 not
    ranked: this one took 1.22-1.35x the Triton dQ pass's time there, so the API uses the Triton pass. d=64: this
    one took 0.99-1.18x the Triton dQ pass's time (bf16 s=1024-16384, H100, thirteenth session), not used."""
    if head_dim == 256:
        return Config(32, 2)
    if head_dim == 128:
        return Config(64, 3)
    return Config(64, 4)


def tuning_candidates(head_dim: int):
    """{label: Config} that fit shared memory (each worth compiling offline first: no spills)."""
    cands = {}
    # 128-key blocks spill at d=128 (S, dP and dS beside a 64-column dQ: 44 B with one warpgroup at 240
    # registers, 788 B with two at 168): d=64 only.
    for block_n in (32, 64, 128) if head_dim <= 64 else (32, 64):
        for stages in (2, 3, 4):
            for num_wg, pingpong in ((1, False), (2, False), (2, True)):
                cfg = Config(block_n, stages, num_wg, pingpong)
                if shared_bytes(head_dim, cfg) + 2048 <= SM90_MAX_SHARED:
                    cands[config_label(cfg)] = cfg
    return cands


def _register_budget(num_wg: int):
    """(maxnreg, consumer setmaxnreg, producer setmaxnreg): as the forward's (gluon_forward.register_budget);
    one consumer warpgroup (the default partition, no setmaxnreg of its own) keeps 240."""
    if num_wg == 1:
        return 240, 240, PRODUCER_REGS
    return register_budget(num_wg)


if _IMPORT_ERROR is None:

    @gluon.jit
    def _dq_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, k_empty,
                     v_ready, v_empty, batch, q_col, kv_col, start_m, lo_blk, n_blocks,
                     BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, WG_ROWS: gl.constexpr, NUM_WG: gl.constexpr):
        for w in gl.static_range(NUM_WG):
            mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [batch, start_m + w * WG_ROWS, q_col], q_ready.index(w),
                                            q_smem.index(w))
            tma.async_copy_global_to_shared(do_desc, [batch, start_m + w * WG_ROWS, q_col], q_ready.index(w),
                                            do_smem.index(w))
        for t in range(n_blocks):
            row = (lo_blk + t) * BLOCK_N
            _load_kv(k_desc, k_smem, k_ready, k_empty, batch, row, kv_col, t, NUM_STAGES)
            _load_kv(v_desc, v_smem, v_ready, v_empty, batch, row, kv_col, t, NUM_STAGES)

    @gluon.jit
    def _probs(s, lse2, col_offs, col_base, row_hi, score_scale, MASKED: gl.constexpr):
        """P = exp2(s * score_scale - lse2); MASKED: keys at or past row_hi get P = 0."""
        if MASKED:
            s = gl.where((col_base + col_offs)[None, :] < row_hi[:, None], s, float("-inf"))
        return gl.exp2(s * score_scale - lse2[:, None])

    @gluon.jit
    def _dq_step(t, dq, ds, turn_count, q, do, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn, lse2, delta,
                 col_offs, lo_blk, row_hi, score_scale,
                 s_layout: gl.constexpr, ds_layout: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                 NUM_STAGES: gl.constexpr, MASKED: gl.constexpr, WG: gl.constexpr, NUM_WG: gl.constexpr,
                 PINGPONG: gl.constexpr):
        """Key block t >= 1: S_t, dP_t and dQ += dS_{t-1} K_{t-1} in flight together (PINGPONG: issued in
        this warpgroup's turn); returns dQ, dS_t and the turn count."""
        WG_ROWS: gl.constexpr = q.shape[0]
        stage = t % NUM_STAGES
        prev = (t - 1) % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.wait(v_ready.index(stage), phase)
        k_t = k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM])
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_t.permute((1, 0)), gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                               gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        dq_tok = warpgroup_mma(ds, k_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        # wgmma groups retire in order: two outstanding means S_t is done.
        s = warpgroup_mma_wait(2, deps=(s_tok, ))
        p = _probs(s, lse2, col_offs, (lo_blk + t) * BLOCK_N, row_hi, score_scale, MASKED)
        dp = warpgroup_mma_wait(1, deps=(dp_tok, ))
        mbarrier.arrive(v_empty.index(stage))
        ds_new = p * (dp - delta[:, None])
        dq, ds = warpgroup_mma_wait(0, deps=(dq_tok, ds))
        mbarrier.arrive(k_empty.index(prev))
        return dq, gl.convert_layout(ds_new.to(q.dtype), ds_layout), turn_count

    @gluon.jit
    def _dq_consumer(q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turn,
                     dq_ptr, stride_qb, stride_qm, stride_qh, lse_ptr, d_ptr, stride_lb, stride_lh, stride_lm,
                     stride_db, stride_dh, stride_dm, batch, head, start_m, seqlen_q, seqlen_k,
                     lo_blk, n_mid, n_blocks, score_scale, scale,
                     BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, WG: gl.constexpr,
                     WG_ROWS: gl.constexpr, CAUSAL: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, HEAD_DIM, 16])
        # dS as the register A operand of the dQ wgmma (k_width 2: two 16-bit values per 32-bit register).
        ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows = start_m + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=row_layout)
        col_offs = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        in_rows = rows < seqlen_q
        # Rows past seqlen_q: lse +inf (P = 0, so dS = 0); they are never stored.
        lse = gl.load(lse_ptr + batch.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh
                      + rows.to(gl.int64) * stride_lm, mask=in_rows, other=float("inf"))
        delta = gl.load(d_ptr + batch.to(gl.int64) * stride_db + head.to(gl.int64) * stride_dh
                        + rows.to(gl.int64) * stride_dm, mask=in_rows, other=0.0)
        # A row that sees no key has lse +inf (the forward's convention); -inf is taken the same way (P = 0).
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        if CAUSAL:
            # Bottom-right alignment: query i sees keys [0, i + sk - sq].
            row_hi = gl.minimum(rows + (seqlen_k - seqlen_q) + 1, seqlen_k)
        else:
            row_hi = gl.full([WG_ROWS], 0, gl.int32, row_layout) + seqlen_k

        q = q_smem.index(WG).reshape([WG_ROWS, HEAD_DIM])
        do = do_smem.index(WG).reshape([WG_ROWS, HEAD_DIM])
        mbarrier.wait(q_ready.index(WG), 0)

        # Block 0 on its own, through the mask (the diagonal, the ragged end, or rows that see no key).
        mbarrier.wait(k_ready.index(0), 0)
        mbarrier.wait(v_ready.index(0), 0)
        turn_count = _pingpong_wait(turn, 0, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                               gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        p = _probs(s, lse2, col_offs, lo_blk * BLOCK_N, row_hi, score_scale, True)
        dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
        mbarrier.arrive(v_empty.index(0))
        ds = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), ds_layout)
        dq = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, dq_layout)

        # Blocks [1, n_mid): every row sees them whole; [n_mid, n_blocks): diagonal / ragged end.
        for t in range(1, n_mid):
            dq, ds, turn_count = _dq_step(t, dq, ds, turn_count, q, do, k_smem, v_smem, k_ready, k_empty, v_ready,
                                          v_empty, turn, lse2, delta, col_offs, lo_blk, row_hi, score_scale,
                                          s_layout, ds_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, False, WG, NUM_WG,
                                          PINGPONG)
        for t in range(gl.maximum(n_mid, 1), n_blocks):
            dq, ds, turn_count = _dq_step(t, dq, ds, turn_count, q, do, k_smem, v_smem, k_ready, k_empty, v_ready,
                                          v_empty, turn, lse2, delta, col_offs, lo_blk, row_hi, score_scale,
                                          s_layout, ds_layout, BLOCK_N, HEAD_DIM, NUM_STAGES, True, WG, NUM_WG,
                                          PINGPONG)
        last = (n_blocks - 1) % NUM_STAGES
        turn_count = _pingpong_wait(turn, turn_count, WG, PINGPONG)
        dq_tok = warpgroup_mma(ds, k_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), dq, is_async=True)
        _pingpong_pass(turn, WG, PINGPONG, NUM_WG)
        dq, ds = warpgroup_mma_wait(0, deps=(dq_tok, ds))
        mbarrier.arrive(k_empty.index(last))

        # Epilogue: dQ * scale through dq's strides (rows past seqlen_q not written).
        dq_rows = start_m + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, dq_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, dq_layout))
        ptrs = (dq_ptr + batch.to(gl.int64) * stride_qb + head.to(gl.int64) * stride_qh
                + dq_rows.to(gl.int64)[:, None] * stride_qm + cols[None, :])
        gl.store(ptrs, (dq * scale).to(dtype), mask=(dq_rows < seqlen_q)[:, None])

    @gluon.jit
    def _dq_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, d_ptr,
                   stride_qb, stride_qm, stride_qh, stride_lb, stride_lh, stride_lm, stride_db, stride_dh, stride_dm,
                   seqlen_q, seqlen_k, num_heads, head_group, score_scale, scale,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_WG: gl.constexpr,
                   CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   PRODUCER_REGS: gl.constexpr):
        """Grid (query tiles, batch * heads), one tile of 64 * NUM_WG rows per CTA, the last (under causal
        masking the heaviest) tiles first."""
        WG_ROWS: gl.constexpr = q_desc.block_type.shape[1]
        TILE_M: gl.constexpr = NUM_WG * WG_ROWS
        start_m = (gl.num_programs(0) - 1 - gl.program_id(0)) * TILE_M
        batch = gl.program_id(1) // num_heads
        head = gl.program_id(1) % num_heads
        q_col = head * HEAD_DIM
        kv_col = (head // head_group) * HEAD_DIM
        lo_blk, n_left, n_mid, n_blocks = _tile_range(start_m, seqlen_q, seqlen_k, 0, 0, BLOCK_N, TILE_M,
                                                      False, CAUSAL)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, [NUM_WG] + q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [NUM_WG] + do_desc.block_type.shape, do_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NUM_WG):
            mbarrier.init(q_ready.index(w), count=1)
            mbarrier.init(turn.index(w), count=1)
        k_ready, k_empty, v_ready, v_empty = _ring_barriers(NUM_STAGES, NUM_WG)
        if PINGPONG:
            mbarrier.arrive(turn.index(0))  # consumer 0 issues first
        fence_async_shared()

        # (Gluon wants the partitions' argument tuples spelled out.)
        if NUM_WG == 2:
            gl.warp_specialize([
                (_dq_consumer, (q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turn,
                                dq_ptr, stride_qb, stride_qm, stride_qh, lse_ptr, d_ptr, stride_lb, stride_lh,
                                stride_lm, stride_db, stride_dh, stride_dm, batch, head, start_m, seqlen_q, seqlen_k,
                                lo_blk, n_mid, n_blocks, score_scale, scale,
                                BLOCK_N, HEAD_DIM, NUM_STAGES, 0, WG_ROWS, CAUSAL, NUM_WG, PINGPONG)),
                (_dq_consumer, (q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turn,
                                dq_ptr, stride_qb, stride_qm, stride_qh, lse_ptr, d_ptr, stride_lb, stride_lh,
                                stride_lm, stride_db, stride_dh, stride_dm, batch, head, start_m, seqlen_q, seqlen_k,
                                lo_blk, n_mid, n_blocks, score_scale, scale,
                                BLOCK_N, HEAD_DIM, NUM_STAGES, 1, WG_ROWS, CAUSAL, NUM_WG, PINGPONG)),
                (_dq_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, k_ready,
                                k_empty, v_ready, v_empty, batch, q_col, kv_col, start_m, lo_blk, n_blocks,
                                BLOCK_N, NUM_STAGES, WG_ROWS, NUM_WG)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_dq_consumer, (q_smem, do_smem, k_smem, v_smem, q_ready, k_ready, k_empty, v_ready, v_empty, turn,
                                dq_ptr, stride_qb, stride_qm, stride_qh, lse_ptr, d_ptr, stride_lb, stride_lh,
                                stride_lm, stride_db, stride_dh, stride_dm, batch, head, start_m, seqlen_q, seqlen_k,
                                lo_blk, n_mid, n_blocks, score_scale, scale,
                                BLOCK_N, HEAD_DIM, NUM_STAGES, 0, WG_ROWS, CAUSAL, NUM_WG, PINGPONG)),
                (_dq_producer, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready, k_ready,
                                k_empty, v_ready, v_empty, batch, q_col, kv_col, start_m, lo_blk, n_blocks,
                                BLOCK_N, NUM_STAGES, WG_ROWS, NUM_WG)),
            ], [1], [PRODUCER_REGS])


def dq_pass(dout, q, k, v, softmax_lse, softmax_d, dq, params, config: Config = None):
    """dq for a call gluon_backward.supported accepts (seqlen_q, seqlen_k > 0), softmax_d already holding
    rowsum(dO * O). Returns the launch as a launch.Launch over a call's tensors by name (q, dout, k, v as
    TMA descriptors; dq, softmax_lse, softmax_d), None where it was not recorded."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_k = k.shape[1], k.shape[2]
    causal = params.window_left < 0 and params.window_right == 0
    cfg = Config(*(config or default_config(head_dim, causal)))
    maxnreg, consumer_regs, producer_regs = _register_budget(cfg.num_wg)
    scale = float(params.softmax_scale)
    descs = dict(q=descriptor(q, WG_M, head_dim), dout=descriptor(dout, WG_M, head_dim),
                 k=descriptor(k, cfg.block_n, head_dim), v=descriptor(v, cfg.block_n, head_dim))
    grid = (triton.cdiv(seqlen_q, WG_M * cfg.num_wg), batch * num_heads)
    args = (*descs.values(), dq, softmax_lse, softmax_d, dq.stride(0), dq.stride(1), dq.stride(2),
            *softmax_lse.stride(), *softmax_d.stride(), seqlen_q, seqlen_k, num_heads, num_heads // num_heads_k,
            scale * LOG2E, scale)
    constexprs = dict(BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, NUM_STAGES=cfg.num_stages, NUM_WG=cfg.num_wg,
                      CAUSAL=causal, PINGPONG=bool(cfg.pingpong and cfg.num_wg == 2), CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, num_warps=4,
                      maxnreg=maxnreg)
    sources = (*(("desc", name, tuple(d.shape), tuple(d.strides)) for name, d in descs.items()), "dq", "softmax_lse",
               "softmax_d")
    recorded = record(_dq_kernel, grid, args, constexprs, slots=range(7))
    return None if recorded is None else Launch(recorded, sources)


_SIG_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kernel_signature(head_dim: int, block_n: int, dtype: str = "bf16"):
    """Triton signature of _dq_kernel: Gluon TMA descriptors are typed with their shared layout."""
    torch_dtype = _SIG_DTYPES[dtype]
    q_block, kv_block = [1, WG_M, head_dim], [1, block_n, head_dim]
    q_ty = f"tensordesc<{dtype}{q_block},{smem_layout(q_block, torch_dtype)!r}>"
    kv_ty = f"tensordesc<{dtype}{kv_block},{smem_layout(kv_block, torch_dtype)!r}>"
    sig = dict(q_desc=q_ty, do_desc=q_ty, k_desc=kv_ty, v_desc=kv_ty, dq_ptr=f"*{dtype}", lse_ptr="*fp32",
               d_ptr="*fp32", score_scale="fp32", scale="fp32")
    return {name: sig.get(name, "constexpr" if name.isupper() else "i32") for name in _dq_kernel.arg_names}


def compile_sm90(head_dim: int, config: Config, dtype: str = "bf16", causal: bool = False):
    """_dq_kernel compiled for sm_90 (Triton's CompiledKernel), no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    config = Config(*config)
    maxnreg, consumer_regs, producer_regs = _register_budget(config.num_wg)
    constexprs = dict(BLOCK_N=config.block_n, HEAD_DIM=head_dim, NUM_STAGES=config.num_stages, NUM_WG=config.num_wg,
                      CAUSAL=causal, PINGPONG=bool(config.pingpong and config.num_wg == 2), CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs)
    sig = kernel_signature(head_dim, config.block_n, dtype)
    names = list(sig)
    # As a typical launch specialises them: torch's pointers 16-byte aligned, the last strides 1.
    attrs = {(names.index(name), ): [["tt.divisibility", 16]] for name in ("dq_ptr", "lse_ptr", "d_ptr")}
    src = GluonASTSource(_dq_kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def offline_report(head_dim: int, config=None, dtype: str = "bf16", causal: bool = False):
    """compile_sm90 + ptxas_stats as a plain dict: shared (bytes), regs, spill_stores, spill_loads."""
    config = Config(*(config or default_config(head_dim, causal)))
    compiled = compile_sm90(head_dim, config, dtype, causal)
    stats = ptxas_stats(compiled.asm["ptx"])
    return dict(shared=compiled.metadata.shared, regs=stats["regs"], spill_stores=stats["spill_stores"],
                spill_loads=stats["spill_loads"], warnings=stats["warnings"], ptxas_ok=stats["returncode"] == 0,
                config=list(config))
