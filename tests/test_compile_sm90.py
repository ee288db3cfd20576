"""Every Triton kernel compiled for Hopper (sm_90) on this CPU-only machine, with the launch
configs the tuning tables pick for a GPU of generation 9: catches what the interpreter cannot
(lowering type errors, ops without a GPU lowering, shared memory past Hopper's 227 KB).

Each kernel with every feature switch off (the fast path) at head dims 64, 128, 256, and with every
switch on at 128 and 96 (BLOCK_D 128); bf16, plus fp16 and fp32 cases. The compiles run in a child
process without TRITON_INTERPRET (aot.Sm90Compiler): under the interpreter nothing is compilable.
The heaviest kernels are also compiled for sm_86 (99 KB of shared memory a block): some config of
common.smaller_configs, the fallback kernels/common.launch_fitting walks, must fit there.
"""
import contextlib
from unittest import mock

import pytest
import torch
import triton.language as tl

from pyflash.kernels import aot, backward, decode, forward

DTYPES = {"bf16": (2, tl.bfloat16), "fp16": (2, tl.float16), "fp32": (4, tl.float32)}
FAST_HEAD_DIMS = (64, 128, 256)
ALL_ON_HEAD_DIMS = (128, 96)
SWITCHES = ("IS_VARLEN", "HAS_SEQUSED_K", "HAS_LEFT", "HAS_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT")


class _HopperQ:
    """What forward_config / backward_config read of q: on a GPU, its element size."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype):
        self.nbytes = DTYPES[dtype][0]

    def element_size(self):
        return self.nbytes


@contextlib.contextmanager
def _on_gpu(capability):
    """The config functions as they run on a device of this compute capability outside the interpreter."""
    with contextlib.ExitStack() as stack:
        for module in (forward, backward, decode):
            stack.enter_context(mock.patch.object(module, "INTERPRET", False))
        for module in (forward, backward):
            stack.enter_context(mock.patch.object(module, "device_capability", lambda device: capability))
        yield


def _precision(dtype):
    return "ieee" if dtype == "fp32" else "tf32"


def _switches(all_on, dropout):
    """Every switch all_on, except HAS_DROPOUT when dropout is given (dropout alone: the non-causal configs)."""
    switches = dict.fromkeys(SWITCHES, all_on)
    if dropout is not None:
        switches["HAS_DROPOUT"] = dropout
    return switches


def _forward_case(dtype, head_dim, all_on, tma=False, dropout=None, ws=False, capability=(9, 0)):
    """ws: the warp-specialized variant (TMA, one loop; never with dropout or return_softmax)."""
    block_d = forward._block_d(head_dim)
    switches = _switches(all_on, False if ws else dropout)
    with _on_gpu(capability):
        block_m, block_n, warps, stages, _ = forward.forward_config(_HopperQ(dtype), head_dim, causal=all_on,
                                                                    dropout=switches["HAS_DROPOUT"])
    if ws:
        # Triton 3.6 partitions only a kernel of 4 warps (it adds two consumer warp groups).
        block_m, block_n, warps, stages = 128, 64, 4, 2
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      **switches, RETURN_SOFTMAX=all_on and not ws, USE_TMA=tma or ws, UPCAST=False,
                      DOT_PRECISION=_precision(dtype), ONE_PASS=ws, ONE_PASS_MASKED=all_on, WARP_SPECIALIZE=ws)
    tma = tma or ws
    options = dict(num_warps=warps, num_stages=stages, dtype=dtype)
    if tma:
        # forward() takes TMA only when the head dim is its own BLOCK_D; descriptors over (rows, h * d).
        assert block_d == head_dim
        options["arg_types"] = dict(q=f"tensordesc<{dtype}[{block_m}, {block_d}]>",
                                    k=f"tensordesc<{dtype}[{block_n}, {block_d}]>",
                                    v=f"tensordesc<{dtype}[{block_n}, {block_d}]>")
    return "pyflash.kernels.forward", "_forward_kernel", constexprs, options


def _backward_case(kernel, dtype, head_dim, all_on, atomic_dq=False, dropout=None, capability=(9, 0), tma=False,
                   dq_tma=False):
    """tma: the loops read through descriptors (Q, dO in the dK/dV kernel; K, V in the dQ kernel); dq_tma (with
    atomic_dq): dS K added by TMA reduce through a descriptor over the fp32 accumulator (DQ_TMA)."""
    block_d = backward._block_d(head_dim)
    if kernel in ("_delta_kernel", "_dq_from_accumulator_kernel"):  # launched with Triton's default warps, stages
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=backward.ROW_BLOCK, BLOCK_D=block_d, IS_VARLEN=all_on)
        if kernel == "_delta_kernel":
            constexprs["ZERO_DQ"] = all_on  # atomic dQ's accumulator zeroed too
        return "pyflash.kernels.backward", kernel, constexprs, dict(dtype=dtype)
    with _on_gpu(capability):
        config = backward.backward_config(_HopperQ(dtype), head_dim, causal=all_on)
    block_m, block_n, warps, stages = config.dkdv if kernel == "_dkdv_kernel" else config.dq
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      **_switches(all_on, dropout), MMA_DTYPE=DTYPES[dtype][1], DOT_PRECISION=_precision(dtype))
    options = dict(num_warps=warps, num_stages=stages, dtype=dtype)
    if kernel == "_dq_kernel":
        constexprs["FUSED_DELTA"] = backward.FUSE_DELTA  # as backward() launches it (no atomic dQ then)
    if kernel == "_dkdv_kernel":
        constexprs["ATOMIC_DQ"] = atomic_dq
        if not atomic_dq:  # backward() then hands dq itself to the (unused) accumulator argument
            options["arg_types"] = dict(dq_accum=f"*{dtype}")
        elif dq_tma:
            constexprs["DQ_TMA"] = True
            options["arg_types"] = dict(dq_accum=f"tensordesc<fp32[{block_m}, {block_d}]>")
    if tma:
        assert block_d == head_dim
        constexprs["USE_TMA"] = True
        rows = block_m if kernel == "_dkdv_kernel" else block_n
        names = ("q", "dout") if kernel == "_dkdv_kernel" else ("k", "v")
        options.setdefault("arg_types", {}).update({name: f"tensordesc<{dtype}[{rows}, {block_d}]>" for name in names})
    return "pyflash.kernels.backward", kernel, constexprs, options


def _decode_case(dtype, head_dim, all_on, capability=(9, 0), tma=False):
    with _on_gpu(capability):
        block_d, block_n, warps, stages = decode._config(head_dim, 4 if dtype == "fp32" else 2)
    # Off: one query token, MHA (block_m 16, one split, no pages). On: a GQA tile of 64 rows over
    # 256-row pages, split into MAX_SPLITS parts merged in the same launch.
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64 if all_on else 16, BLOCK_N=block_n,
                      PAGE_SIZE=256 if all_on else 1, PAGED=all_on, HAS_LEFT=all_on, HAS_RIGHT=all_on,
                      HAS_SOFTCAP=all_on, HAS_ALIBI=all_on, IS_SPLIT=all_on,
                      HAS_LEFTPAD=all_on, HAS_BATCH_ROWS=all_on, UPCAST=dtype == "fp32",
                      DOT_PRECISION=_precision(dtype), MERGE_M=64 if all_on else 16,
                      PREFETCH=decode.PREFETCH_ROWS if all_on else 0, PREFETCH_LINES=max(1, block_d // 64),
                      MERGE_CHUNK=decode.merge_chunk(decode.MAX_SPLITS if all_on else 1, 64, block_d))
    options = dict(num_warps=warps, num_stages=stages, dtype=dtype)
    if tma:  # K/V through descriptors (the "on" case: paged, pages of whole blocks, no left padding)
        constexprs.update(USE_TMA=True, HAS_LEFTPAD=False)
        if all_on:
            options["num_stages"] += decode.PAGED_TMA_EXTRA_STAGES  # as decode() launches a paged TMA loop
        options["arg_types"] = {name: f"tensordesc<{dtype}[{block_n}, {block_d}]>" for name in ("K", "V")}
    return "pyflash.kernels.decode", "_decode_kernel", constexprs, options


# Found by this test; strict, so that a fix shows up as XPASS (then drop the entry).
KNOWN_FAILURES = {
    # Latent: configs.BACKWARD never enables atomic dQ on Hopper; with its d=256 dK/dV config
    # (64, 64, 8 warps, 2 stages) atomic dQ needs 263168 B. 1 stage (131072 B) or block_m 32 (180480 B) fit.
    "dkdv_atomic_dq-bf16-d256-off": "dK/dV with atomic dQ at head dim 256 needs 263168 B of shared memory",
    "dkdv_atomic_dq_tma-bf16-d256-off": "dK/dV with atomic dQ by TMA at head dim 256 needs 271360 B of shared memory",
}


def _cases():
    """Heaviest first, so that pytest-xdist's workers finish together."""
    cases = []

    def add(case_id, case):
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case_id])] if case_id in KNOWN_FAILURES else []
        cases.append(pytest.param(*case, id=case_id, marks=marks))

    # Every switch on (bf16): varlen, seqused_k, a window on both sides, softcap, ALiBi, dropout,
    # return_softmax; decode: paged, window, softcap, ALiBi, split.
    for d in ALL_ON_HEAD_DIMS:
        add(f"decode-bf16-d{d}-on", _decode_case("bf16", d, True))
        if decode._config(d)[0] == d:
            add(f"decode_tma-bf16-d{d}-on", _decode_case("bf16", d, True, tma=True))
        add(f"dkdv_atomic_dq-bf16-d{d}-on", _backward_case("_dkdv_kernel", "bf16", d, True, True))
        if backward._block_d(d) == d:  # a TMA view of the accumulator only then
            add(f"dkdv_atomic_dq_tma-bf16-d{d}-on", _backward_case("_dkdv_kernel", "bf16", d, True, True, dq_tma=True))
        add(f"dkdv-bf16-d{d}-on", _backward_case("_dkdv_kernel", "bf16", d, True))
        add(f"dq-bf16-d{d}-on", _backward_case("_dq_kernel", "bf16", d, True))
        if backward._block_d(d) == d:  # backward() takes TMA only then
            add(f"dkdv_tma-bf16-d{d}-on", _backward_case("_dkdv_kernel", "bf16", d, True, tma=True))
            add(f"dq_tma-bf16-d{d}-on", _backward_case("_dq_kernel", "bf16", d, True, tma=True))
        add(f"forward-bf16-d{d}-on", _forward_case("bf16", d, True))
        if forward._block_d(d) == d:  # forward() takes TMA only then
            add(f"forward_tma-bf16-d{d}-on", _forward_case("bf16", d, True, tma=True))
            add(f"forward_ws-bf16-d{d}-on", _forward_case("bf16", d, True, ws=True))
    # Dropout alone, with the non-causal configs (which the all-on cases never pick): the mask tile's
    # layout change goes through shared memory (dQ at d=128 (128, 128, 8, 2) once needed 262144 B).
    for d in FAST_HEAD_DIMS:
        add(f"dkdv-bf16-d{d}-dropout", _backward_case("_dkdv_kernel", "bf16", d, False, dropout=True))
        add(f"dq-bf16-d{d}-dropout", _backward_case("_dq_kernel", "bf16", d, False, dropout=True))
        if d == 128:
            add(f"forward_tma-bf16-d{d}-dropout", _forward_case("bf16", d, False, tma=True, dropout=True))
    # fp32 (exact ieee dots) and fp16: one head dim, fast path.
    add("decode-fp32-d128-off", _decode_case("fp32", 128, False))
    add("forward-fp32-d128-off", _forward_case("fp32", 128, False))
    for d in FAST_HEAD_DIMS:
        add(f"dkdv_atomic_dq-bf16-d{d}-off", _backward_case("_dkdv_kernel", "bf16", d, False, True))
        add(f"dkdv_atomic_dq_tma-bf16-d{d}-off", _backward_case("_dkdv_kernel", "bf16", d, False, True, tma=True,
                                                                 dq_tma=True))
        add(f"dkdv-bf16-d{d}-off", _backward_case("_dkdv_kernel", "bf16", d, False))
        add(f"dq-bf16-d{d}-off", _backward_case("_dq_kernel", "bf16", d, False))
        add(f"dkdv_tma-bf16-d{d}-off", _backward_case("_dkdv_kernel", "bf16", d, False, tma=True))
        add(f"dq_tma-bf16-d{d}-off", _backward_case("_dq_kernel", "bf16", d, False, tma=True))
        add(f"forward-bf16-d{d}-off", _forward_case("bf16", d, False))
        add(f"forward_tma-bf16-d{d}-off", _forward_case("bf16", d, False, tma=True))
        add(f"forward_ws-bf16-d{d}-off", _forward_case("bf16", d, False, ws=True))
        add(f"decode-bf16-d{d}-off", _decode_case("bf16", d, False))
        add(f"decode_tma-bf16-d{d}-off", _decode_case("bf16", d, False, tma=True))
    add("dkdv-fp16-d128-off", _backward_case("_dkdv_kernel", "fp16", 128, False))
    add("dq-fp16-d128-off", _backward_case("_dq_kernel", "fp16", 128, False))
    add("forward-fp16-d128-off", _forward_case("fp16", 128, False))
    add("forward_tma-fp16-d128-off", _forward_case("fp16", 128, False, tma=True))
    add("decode-fp16-d128-off", _decode_case("fp16", 128, False))
    for d, all_on in [*((d, False) for d in FAST_HEAD_DIMS), *((d, True) for d in ALL_ON_HEAD_DIMS)]:
        tag = "on" if all_on else "off"
        add(f"delta-bf16-d{d}-{tag}", _backward_case("_delta_kernel", "bf16", d, all_on))
        add(f"dq_from_accumulator-bf16-d{d}-{tag}", _backward_case("_dq_from_accumulator_kernel", "bf16", d, all_on))
    return cases


@pytest.fixture(scope="module")
def compiler():
    with aot.Sm90Compiler() as child:
        yield child


@pytest.mark.parametrize("module, kernel, constexprs, options", _cases())
def test_compiles_for_sm90(compiler, module, kernel, constexprs, options):
    compiled = compiler.compile(module, kernel, constexprs, **options)
    assert compiled["shared"] <= aot.SM90_MAX_SHARED, (
        f"{kernel} needs {compiled['shared']} B of shared memory, Hopper has {aot.SM90_MAX_SHARED}")
    if constexprs.get("WARP_SPECIALIZE"):
        # Triton falls back to a plain kernel without a word when it cannot partition the loop.
        assert compiled["num_warps"] > options["num_warps"], "the loop was not warp-specialized"


def test_paged_tma_decode_keeps_two_kv_buffers(compiler):
    """decode() gives a paged TMA loop PAGED_TMA_EXTRA_STAGES more stages: Triton's pipeliner spends stages
    on the block table's load, and with the config's stages alone the loop keeps one K/V buffer (no copy in
    flight during a block's math; paged trailed contiguous by 20-29% on an H200). Two K and two V buffers
    of (BLOCK_N, BLOCK_D) show in the shared memory size."""
    module, kernel, constexprs, options = _decode_case("bf16", 128, False, tma=True)
    constexprs = dict(constexprs, PAGED=True, PAGE_SIZE=256)
    two_buffers = 2 * 2 * constexprs["BLOCK_N"] * constexprs["BLOCK_D"] * 2
    paged = compiler.compile(module, kernel, constexprs, **dict(
        options, num_stages=options["num_stages"] + decode.PAGED_TMA_EXTRA_STAGES))
    assert paged["shared"] >= two_buffers, paged
    contiguous = compiler.compile(module, kernel, dict(constexprs, PAGED=False, PAGE_SIZE=1), **options)
    assert contiguous["shared"] >= two_buffers, contiguous
    without = compiler.compile(module, kernel, constexprs, **options)
    assert without["shared"] < two_buffers, without  # the pipeliner's behaviour the extra stages answer


def test_compile_for_sm90_in_process():
    """In this process: compiles where Triton is not interpreting, and says what to use where it is."""
    import triton

    _, kernel, constexprs, options = _backward_case("_delta_kernel", "bf16", 64, False)
    kernel = getattr(backward, kernel)
    if triton.knobs.runtime.interpret:
        with pytest.raises(RuntimeError, match="Sm90Compiler"):
            aot.compile_for_sm90(kernel, constexprs, **options)
    else:
        assert aot.compile_for_sm90(kernel, constexprs, **options).metadata.shared <= aot.SM90_MAX_SHARED


def test_compile_error_is_reported(compiler):
    """A kernel that cannot compile raises, with the compiler's message (BLOCK_D below tl.dot's 16)."""
    _, kernel, constexprs, options = _backward_case("_dq_kernel", "bf16", 8, False)
    with pytest.raises(RuntimeError, match="did not compile"):
        compiler.compile("pyflash.kernels.backward", kernel, dict(constexprs, BLOCK_D=8), **options)


# sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4): 99 KB of shared memory a block, where the major-8 rows
# (sized for A100's 163 KB) and the decode config do not all fit. launch_fitting then walks
# common.smaller_configs; these are the heaviest kernels, each needing a fallback on such a part.
SM86_MAX_SHARED = 101376
SM86 = (8, 6)
SM86_HEAVY = {
    "dkdv-bf16-d256-dropout": _backward_case("_dkdv_kernel", "bf16", 256, False, dropout=True, capability=SM86),
    "dq-bf16-d256-dropout": _backward_case("_dq_kernel", "bf16", 256, False, dropout=True, capability=SM86),
    "dkdv-bf16-d128-on": _backward_case("_dkdv_kernel", "bf16", 128, True, capability=SM86),
    "dq-bf16-d128-on": _backward_case("_dq_kernel", "bf16", 128, True, capability=SM86),
    "decode-bf16-d128-off": _decode_case("bf16", 128, False, capability=SM86),
    "decode-fp32-d128-off": _decode_case("fp32", 128, False, capability=SM86),
}


@pytest.mark.parametrize("case_id", SM86_HEAVY)
def test_a_smaller_config_fits_sm86(compiler, case_id):
    from pyflash.kernels.common import smaller_configs

    module, kernel, constexprs, options = SM86_HEAVY[case_id]
    names = ("BLOCK_N",) if kernel == "_decode_kernel" else ("BLOCK_M", "BLOCK_N")
    tried = []
    for blocks, warps, stages in smaller_configs([constexprs[name] for name in names], options["num_warps"],
                                                 options["num_stages"]):
        sized = dict(constexprs, **dict(zip(names, blocks)))
        shared = compiler.compile(module, kernel, sized, **dict(options, num_warps=warps, num_stages=stages),
                                  capability=86)["shared"]
        tried.append((blocks, stages, shared))
        if shared <= SM86_MAX_SHARED:
            break
    assert tried[-1][2] <= SM86_MAX_SHARED, f"no config of {kernel} fits sm_86: {tried}"
