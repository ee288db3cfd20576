"""Tuning tables for the Triton kernels: data only, looked up by the kernel modules.

FORWARD maps (capability major, dtype bytes, block_d, causal) to
(block_m, block_n, num_warps, num_stages). Capability major 9 is Hopper, 8 Ampere/Ada, and 0 the
CPU interpreter (small blocks so that small test shapes still span several blocks). block_d is the
head dim rounded up to a power of two (at least 16, the smallest tl.dot size).
Hopper rows come from scripts/tune_forward.py (benchmarks/RESULTS.md); Ampere rows follow Triton's
fused-attention tutorial and are untuned.
"""

FORWARD = {
    # Interpreter: every shape the same; several blocks per sequence, block_m != block_n, yet few
    # programs (its cost is per operation, not per element).
    **{(0, nbytes, block_d, causal): (64, 32, 4, 1)
       for nbytes in (2, 4) for block_d in (16, 32, 64, 128, 256) for causal in (False, True)},
    # Ampere / Ada, fp16 and bf16.
    (8, 2, 16, False): (128, 64, 4, 3),
    (8, 2, 16, True): (128, 64, 4, 3),
    (8, 2, 32, False): (128, 64, 4, 3),
    (8, 2, 32, True): (128, 64, 4, 3),
    (8, 2, 64, False): (128, 64, 4, 3),
    (8, 2, 64, True): (128, 64, 4, 3),
    (8, 2, 128, False): (128, 64, 8, 2),
    (8, 2, 128, True): (128, 64, 8, 2),
    (8, 2, 256, False): (64, 32, 4, 2),
    (8, 2, 256, True): (64, 32, 4, 2),
    # Hopper, fp16 and bf16.
    (9, 2, 16, False): (128, 128, 4, 3),
    (9, 2, 16, True): (128, 128, 4, 3),
    (9, 2, 32, False): (128, 128, 4, 3),
    (9, 2, 32, True): (128, 128, 4, 3),
    (9, 2, 64, False): (128, 128, 4, 3),
    (9, 2, 64, True): (128, 128, 4, 3),
    (9, 2, 128, False): (128, 64, 4, 2),
    (9, 2, 128, True): (128, 64, 4, 2),
    (9, 2, 256, False): (128, 64, 8, 2),
    (9, 2, 256, True): (128, 64, 8, 2),
    # fp32 (exact ieee dots, a CPU user's dtype): tiles four times the bytes, so smaller.
    **{(major, 4, block_d, causal): (64, 32, 4, 2)
       for major in (8, 9) for block_d in (16, 32, 64, 128) for causal in (False, True)},
    **{(major, 4, 256, causal): (32, 32, 4, 2) for major in (8, 9) for causal in (False, True)},
}
# With dropout, Philox's rounds on every score need the registers of 8 warps (4 warps spill kilobytes).
FORWARD_DROPOUT_MIN_WARPS = 8



# BACKWARD maps (capability major, dtype bytes, block_d, causal), keyed as FORWARD, to
# ((block_m, block_n, num_warps, num_stages) of the dK/dV kernel, the same of the dQ kernel, atomic_dq[, tma]).
# dK/dV programs own block_n keys and step over block_m query rows; dQ programs the reverse.
# atomic_dq: when not deterministic, dQ comes from fp32 atomics inside the dK/dV kernel instead.
# tma (default True; Hopper only): the loops read Q/dO (dK/dV kernel) and K/V (dQ kernel) through TMA.
BACKWARD = {
    # Interpreter: several blocks per sequence, block_m != block_n, the deterministic dQ kernel.
    **{(0, nbytes, block_d, causal): ((16, 32, 4, 1), (32, 16, 4, 1), False)
       for nbytes in (2, 4) for block_d in (16, 32, 64, 128, 256) for causal in (False, True)},
    # Ampere / Ada, fp16 and bf16: untuned, within Ampere's 164 KB of shared memory.
    **{(8, 2, block_d, causal): ((64, 128, 8, 2), (128, 64, 8, 2), False)
       for block_d in (16, 32, 64, 128) for causal in (False, True)},
    **{(8, 2, 256, causal): ((64, 64, 8, 2), (64, 64, 4, 2), False) for causal in (False, True)},
    # Hopper, fp16 and bf16: scripts/tune_backward.py on H100, seqlen 4096 (benchmarks/RESULTS.md).
    # Atomic dQ was slower than the dQ kernel at every head dim measured.
    **{(9, 2, block_d, causal): ((64, 64, 4, 3), (128, 64, 4, 3), False)
       for block_d in (16, 32, 64) for causal in (False, True)},
    # d=128 keeps pointer loads (tma False): through TMA these tiles measured 320 vs 401 TFLOP/s
    # non-causal, 305 vs 311 causal; d=64 and d=256 gained 4-9% (benchmarks/RESULTS.md).
    (9, 2, 128, False): ((64, 128, 8, 3), (128, 128, 8, 2), False, False),
    (9, 2, 128, True): ((64, 128, 8, 3), (128, 32, 4, 3), False, False),
    **{(9, 2, 256, causal): ((64, 64, 8, 2), (64, 64, 4, 2), False) for causal in (False, True)},
    # fp32 (exact ieee dots): tiles four times the bytes, so smaller.
    **{(major, 4, block_d, causal): ((32, 64, 4, 2), (64, 32, 4, 2), False)
       for major in (8, 9) for block_d in (16, 32, 64, 128) for causal in (False, True)},
    **{(major, 4, 256, causal): ((16, 32, 4, 2), (32, 16, 4, 2), False)
       for major in (8, 9) for causal in (False, True)},
}
# BACKWARD_DROPOUT: rows like BACKWARD's for calls with dropout (a key missing here takes BACKWARD's row). With
# the mask tile's registers BACKWARD's Hopper tiles spill at d=128 (benchmark specialisation, sm_90: dK/dV
# 296 / 432 B non-causal / causal, the causal dQ tile 496 B), where (64, 64, 8, 2) or (64, 32, 4, 3) dK/dV and
# (128, 64, 8, 2) dQ spill 0-88 B (scripts/tune_backward.py --resources --dropout 0.1; benchmarks/RESULTS.md,
# fifteenth session); scripts/tune_backward.py --dropout 0.1 --sweep times them. Empty until measured on a GPU.
BACKWARD_DROPOUT = {}
