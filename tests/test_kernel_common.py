"""Host-side helpers of kernels/common.py: the same values as Triton's own, the table lookup rule,
the fallback to smaller tiles on parts with less shared memory."""
import math

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from pyflash.kernels.common import cdiv, launch_fitting, next_power_of_2, smaller_configs, tuned_generation


def test_int_helpers_match_triton():
    for n in range(0, 2100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_tuned_generation():
    generations = [8, 9]
    assert tuned_generation(0, generations) == 0  # the interpreter's rows
    assert tuned_generation(7, generations) == 8  # older GPUs: the oldest tuned rows
    assert tuned_generation(8, generations) == 8
    assert tuned_generation(9, generations) == 9
    assert tuned_generation(12, generations) == 9  # newer GPUs: the newest tuned rows


def test_smaller_configs():
    assert smaller_configs((64, 128), 8, 3) == [
        ((64, 128), 8, 3), ((64, 128), 8, 2), ((64, 128), 8, 1), ((64, 64), 8, 1), ((32, 64), 8, 1),
        ((32, 32), 8, 1), ((16, 32), 8, 1), ((16, 16), 8, 1)]
    assert smaller_configs((16,), 4, 1) == [((16,), 4, 1)]


class _FakeDevice:
    """Launches record their config and raise OutOfResources above a shared-memory budget (bytes per
    stage of a tile of prod(blocks) elements, as a stand-in for the compiler's figure)."""

    def __init__(self, budget):
        self.budget, self.launched = budget, []

    def launch(self, blocks, num_warps, num_stages):
        need = num_stages * math.prod(blocks) * 8
        if need > self.budget:
            raise OutOfResources(need, self.budget, "shared memory")
        self.launched.append((blocks, num_warps, num_stages))


def test_launch_fitting_falls_back_and_remembers():
    big = _FakeDevice(budget=10**9)
    launch_fitting(("test", "big"), (64, 128), 8, 3, big.launch)
    assert big.launched == [((64, 128), 8, 3)]  # fits: the table's config, nothing else tried

    small = _FakeDevice(budget=64 * 64 * 8)
    launch_fitting(("test", "small"), (64, 128), 8, 3, small.launch)
    assert small.launched == [((64, 64), 8, 1)]  # the first smaller config that fits
    small.launched.clear()
    launch_fitting(("test", "small"), (64, 128), 8, 3, small.launch)
    assert small.launched == [((64, 64), 8, 1)]  # remembered: no failing attempt first

    tiny = _FakeDevice(budget=1)
    with pytest.raises(OutOfResources):
        launch_fitting(("test", "tiny"), (64, 128), 8, 3, tiny.launch)
    assert tiny.launched == []


# ----------------------------------------------------------------------------------------------
# Dispatch to the Gluon kernels (Hopper): which calls go there. The kernels themselves are checked
# by tests/test_gluon*_compile.py (sm_90 compiles) and on the GPU (tests/gpu, scripts/gluon_*check.py).
# ----------------------------------------------------------------------------------------------

def _dispatch_inputs(head_dim=128):
    from pyflash.params import AttentionParams, Seqlens

    q = torch.randn(1, 17, 2, head_dim)
    return q, AttentionParams(head_dim ** -0.5, -1, 0), Seqlens(1, 17, 17)


def test_forward_dispatches_to_gluon_when_supported(monkeypatch):
    from pyflash.kernels import forward as module
    from pyflash.kernels import gluon_forward

    calls = []
    monkeypatch.setattr(gluon_forward, "try_forward", lambda *args: calls.append(args) or True)
    q, params, seqlens = _dispatch_inputs()
    out, lse = torch.full_like(q, math.nan), torch.full((1, 2, 17), math.nan)
    module.forward(q, q, q, out, lse, None, params, seqlens)
    assert len(calls) == 1 and out.isnan().all()  # the (stubbed) Gluon kernel ran, not the Triton one
    for kwargs in (dict(kernel="triton"), dict(use_tma=False), dict(config=(64, 32, 4, 1))):
        module.forward(q, q, q, out, lse, None, params, seqlens, **kwargs)
        assert len(calls) == 1 and not out.isnan().any(), kwargs
        out.fill_(math.nan)
    with pytest.raises(ValueError, match="kernel"):
        module.forward(q, q, q, out, lse, None, params, seqlens, kernel="gluon")


@pytest.mark.parametrize("head_dim, deterministic, expected", [(128, False, 1), (128, True, 1), (64, False, 0),
                                                               (64, True, 0), (256, False, 1), (256, True, 1)])
def test_backward_dispatches_to_gluon_at_its_head_dims(monkeypatch, head_dim, deterministic, expected):
    """The Gluon backward takes d=128 and d=256 (backward.GLUON_HEAD_DIMS) calls when its try_backward
    accepts the call (here a stub that does); deterministic ones only where they run in two passes
    (gluon_backward.two_pass: d=128 and 256; its own deterministic mode measured slower than the Triton
    kernels)."""
    from pyflash.kernels import backward as module
    from pyflash.kernels import gluon_backward

    calls = []
    monkeypatch.setattr(gluon_backward, "try_backward", lambda *args: calls.append(args) or True)
    q, params, seqlens = _dispatch_inputs(head_dim)
    out, lse = torch.randn_like(q), torch.randn(1, 2, 17)
    grads = [torch.full_like(q, math.nan) for _ in range(3)]
    softmax_d = torch.full_like(lse, math.nan)
    module.backward(torch.randn_like(q), q, q, q, out, lse, *grads, softmax_d, params, seqlens, deterministic)
    assert len(calls) == expected
    assert all(g.isnan().all() for g in grads) == bool(expected)
    with pytest.raises(ValueError, match="kernel"):
        module.backward(torch.randn_like(q), q, q, q, out, lse, *grads, softmax_d, params, seqlens, False,
                        kernel="gluon")


class _FakeKernel:
    """A CompiledKernel's launch surface: records kernel.run's arguments."""

    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *values):
        return None

    def run(self, *args):
        self.runs.append(args)


def test_recorded_launch_replays_every_parameter_with_new_tensors(monkeypatch):
    """record() launches through Triton once; the Recorded replay reaches kernel.run with the arguments
    in parameter order (defaults filled in, constexprs included) as JITFunction.run passes them, this
    call's tensors in the slots, and keeps no tensor of the first call."""
    import gc
    import weakref
    from types import SimpleNamespace

    from pyflash.kernels import launch

    kernel, first = _FakeKernel(), []

    class Fn:
        arg_names = ["x", "y", "n", "BLOCK", "FLAG"]
        params = [SimpleNamespace(default=d) for d in (None, None, None, None, False)]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: first.append((grid, args, kwargs)) or kernel

    monkeypatch.setattr(launch, "current_stream", lambda: 7)
    x, y = torch.zeros(16), torch.ones(16)
    recorded = launch.record(Fn(), (3, 2), (x, y, 32), dict(BLOCK=64, num_warps=4), slots=(0, 1))
    assert len(first) == 1 and first[0][1] == (x, y, 32) and not kernel.runs
    x_ref = weakref.ref(x)
    del x, first[:]
    gc.collect()
    assert x_ref() is None, "the recorded launch keeps the first call's tensor alive"
    a, b = torch.zeros(8), torch.ones(8)
    recorded(a, b)
    # (grid, stream, function, packed metadata, launch metadata, Triton's enter / exit hooks, the arguments)
    (run,) = kernel.runs
    assert run[:7] == (3, 2, 1, 7, "function", "packed", None)
    assert run[9] is a and run[10] is b and run[11:] == (32, 64, False)


def test_record_returns_none_without_a_compiled_kernel():
    """Under the interpreter a launch returns no CompiledKernel: nothing to replay."""
    from types import SimpleNamespace

    from pyflash.kernels import launch

    class Fn:
        arg_names, params = ["x"], [SimpleNamespace(default=None)]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    assert launch.record(Fn(), (1,), (torch.zeros(1),), {}, slots=(0,)) is None


def test_gluon_forward_plan_replays_calls_like_an_earlier_one(monkeypatch):
    """gluon_forward.try_forward: the first call of a key goes through supported() and forward();
    a call that differs only in its tensors' (aligned) addresses replays the recorded launch with TMA
    descriptors over its own tensors; any other difference (shape, window, alignment) is a new key;
    a rejected key is remembered as rejected."""
    from pyflash.kernels import gluon_forward as gf
    from pyflash.kernels.launch import Descriptor, Launch
    from pyflash.params import AttentionParams, Seqlens

    supported_calls, forward_calls, replays = [], [], []

    def fake_forward(q, k, v, out, *args):  # a Launch with forward()'s sources (no TMA view: misaligned)
        forward_calls.append((q, k, v, out, *args))
        named = dict(q=q, k=k, v=v, out=out)
        views = (("desc", name, *(gf.tma_view3(t) or (None, None))) for name, t in named.items())
        return Launch(lambda *tensors: replays.append(tensors), (*views, "softmax_lse", "alibi"))

    def fake_supported(q, *args):
        supported_calls.append(q.shape)
        return q.shape[-1] != 64

    monkeypatch.setattr(gf, "AVAILABLE", True)
    monkeypatch.setattr(gf, "_PLANS", {})
    monkeypatch.setattr(gf, "supported", fake_supported)
    monkeypatch.setattr(gf, "forward", fake_forward)

    def call(q, lse, window_right=0, head_dim=128):
        params = AttentionParams(head_dim ** -0.5, -1, window_right)
        return gf.try_forward(q, q, q, q, lse, params, Seqlens(*q.shape[:2], q.shape[1]), False)

    storage = torch.randn(4 * 100 * 2 * 128 + 8)
    q1, q2 = storage[:25600].view(1, 100, 2, 128), storage[64:25664].view(1, 100, 2, 128)
    lse = torch.randn(1, 2, 100)
    assert call(q1, lse) and len(forward_calls) == 1 and not replays
    assert call(q2, lse) and len(forward_calls) == 1 and len(replays) == 1
    descs, lse_arg, alibi_arg = replays[0][:4], replays[0][4], replays[0][5]
    assert all(isinstance(d, Descriptor) and d.base is q2 for d in descs) and lse_arg is lse and alibi_arg is lse
    assert descs[0].shape == [1, 100, 256] and descs[0].strides == [25600, 256, 1]
    misaligned = storage[2:25602].view(1, 100, 2, 128)
    for args in ((q1.reshape(2, 50, 2, 128), torch.randn(2, 2, 50)), (q1, lse, -1), (misaligned, lse)):
        assert call(*args)
    assert len(forward_calls) == 4 and len(replays) == 1
    q64 = torch.randn(1, 100, 2, 64)
    assert not call(q64, lse, head_dim=64) and not call(q64, lse, head_dim=64)
    assert supported_calls.count(q64.shape) == 1 and len(forward_calls) == 4


def test_gluon_backward_plan_replays_its_three_launches(monkeypatch):
    """gluon_backward.try_backward: the first call of a key runs backward(); a call differing only in
    its tensors' addresses replays the plan: fresh stats / dQ accumulator buffers of the recorded shapes (the
    preprocess launch, which zeroes the accumulator, gets both), the three launches with this call's tensors (TMA descriptors over q, dout, k, v and the
    buffers); a deterministic call is a key of its own; a rejected key is remembered as rejected."""
    from pyflash.kernels import gluon_backward as gb
    from pyflash.kernels.launch import Descriptor, Launch
    from pyflash.params import AttentionParams, Seqlens

    launches, supported_calls = {"preprocess": [], "main": [], "convert": []}, []

    def recorder(name):
        return lambda *tensors: launches[name].append(tensors)

    descs = (("desc", name, [1, 17, 256], [4352, 256, 1]) for name in ("q", "dout", "k", "v", "dq_accum", "stats"))
    plan = gb._Plan((Launch(recorder("preprocess"), ("out", "dout", "softmax_lse", "softmax_d", "stats", "dq_accum")),
                     Launch(recorder("main"), (*descs, "dk", "dv", "counters")),
                     Launch(recorder("convert"), ("dq_accum", "dq"))), (2, 4, 64), (1, 17, 2, 128), (2, 1, 2))
    backward_calls = []

    def fake_supported(*args):
        supported_calls.append(args[1].shape)
        return args[1].shape[-1] == 128

    monkeypatch.setattr(gb, "AVAILABLE", True)
    monkeypatch.setattr(gb, "_PLANS", {})
    monkeypatch.setattr(gb, "supported", fake_supported)
    configs = []
    monkeypatch.setattr(gb, "backward", lambda *args, **kwargs: backward_calls.append(kwargs) or configs.append(
        args[12]) or plan)

    def call(head_dim=128, deterministic=False):
        q = torch.randn(1, 17, 2, head_dim)
        lse = torch.randn(1, 2, 17)
        tensors = (torch.randn_like(q), q, torch.randn_like(q), torch.randn_like(q), torch.randn_like(q), lse,
                   torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), torch.empty_like(lse))
        params = AttentionParams(head_dim ** -0.5, -1, 0)
        return tensors, gb.try_backward(*tensors, params, Seqlens(1, 17, 17), deterministic)

    _, ran = call()
    assert ran and len(backward_calls) == 1 and not launches["main"]
    tensors, ran = call()
    assert ran and len(backward_calls) == 1
    dout, q, k, v, out, lse, dq, dk, dv, softmax_d = tensors
    (pre,), (main,), (convert,) = launches["preprocess"], launches["main"], launches["convert"]
    stats, accum = pre[4], convert[0]
    assert pre[:4] == (out, dout, lse, softmax_d) and stats.shape == (2, 4, 64) and stats.dtype == torch.float32
    assert accum.shape == (1, 17, 2, 128) and accum.dtype == torch.float32 and pre[5] is accum and convert[1] is dq
    counters = main[8]
    assert all(isinstance(d, Descriptor) for d in main[:6]) and main[6:8] == (dk, dv)
    assert counters.shape == (2, 1, 2) and counters.dtype == torch.int32 and not counters.any()
    assert all(d.base is t for d, t in zip(main[:4], (q, dout, k, v)))
    assert main[4].base is accum and main[5].base is stats
    # A deterministic call is a key of its own and runs two passes (gluon_backward.two_pass at d=128): the
    # kernel without dQ (with_dq=False, its own deterministic mode off), then a dQ pass (here the Gluon one,
    # GLUON_DQ, part of the plan; the Triton one would run after it).
    monkeypatch.setattr(gb, "GLUON_DQ", (128,))
    assert call(deterministic=True)[1] and len(supported_calls) == 2 and len(backward_calls) == 2
    assert backward_calls[0] == dict(deterministic=False, gluon_dq=False)
    assert backward_calls[-1] == dict(deterministic=False, gluon_dq=True)
    assert configs[0] is None and configs[-1] == gb.two_pass_config(128, True) and not configs[-1].with_dq
    assert not call(head_dim=64)[1] and not call(head_dim=64)[1]
    assert supported_calls.count(torch.Size([1, 17, 2, 64])) == 1 and len(backward_calls) == 2
    # At a two-pass head dim outside GLUON_DQ (d=256 here) the kernel leaves dQ to the Triton dQ pass, which
    # runs after it.
    from pyflash.kernels import backward as triton_module

    triton_calls = []
    monkeypatch.setattr(triton_module, "backward", lambda *args, **kwargs: triton_calls.append(kwargs))
    monkeypatch.setattr(gb, "supported", lambda *args: True)
    assert call(head_dim=256, deterministic=True)[1] and len(backward_calls) == 3
    assert backward_calls[-1] == dict(deterministic=False, gluon_dq=False)
    assert configs[-1] == gb.two_pass_config(256, True)
    assert triton_calls == [dict(kernel="triton", dq_only=True, delta_ready=True)]


@pytest.mark.parametrize("zero_dq", [False, True])
def test_gluon_backward_preprocess_and_convert_kernels(zero_dq):
    """The Gluon backward's two plain Triton kernels (under the interpreter here): the preprocess writes softmax_d
    = rowsum(O * dO), the stats rows the main kernel reads (padding rows: lse +inf, delta 0) and, ZERO_DQ, zeroes
    the fp32 dQ accumulator's rows (and nothing past them); the convert writes dq = scale * accumulator."""
    from pyflash.kernels import gluon_backward as gb

    batch, seqlen_q, seqlen_k, heads, head_dim = 2, 70, 90, 3, 64
    stats_len = 128  # seqlen_q rounded up to the main kernel's block_m (64)
    torch.manual_seed(0)
    out, dout = (torch.randn(batch, seqlen_q, heads, head_dim) for _ in range(2))
    lse = torch.randn(batch, heads, seqlen_q)
    softmax_d = torch.full((batch, heads, seqlen_q), math.nan)
    stats = torch.full((batch * heads, 4, stats_len), math.nan)
    size = batch * seqlen_q * heads * head_dim
    guarded = torch.full((size + 4096, ), math.nan)  # a NaN tail past the accumulator must stay NaN
    accum = guarded[:size].view(batch, seqlen_q, heads, head_dim)
    lse_mul, delta_mul = 1.25, -1.0
    gb._preprocess_kernel[(stats_len // gb.ROW_BLOCK, batch * heads)](
        out, dout, lse, softmax_d, stats, accum, seqlen_q, heads, stats_len, seqlen_k - seqlen_q, lse_mul, delta_mul,
        *out.stride()[:3], *dout.stride()[:3], *lse.stride(), *softmax_d.stride(), HEAD_DIM=head_dim,
        BLOCK=gb.ROW_BLOCK, ZERO_DQ=zero_dq)
    delta = (out.double() * dout.double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(softmax_d.double(), delta, rtol=1e-5, atol=1e-5)
    rows = stats.view(batch, heads, 4, stats_len)
    torch.testing.assert_close(rows[:, :, 0, :seqlen_q], lse * lse_mul)
    torch.testing.assert_close(rows[:, :, 1, :seqlen_q].double(), delta * delta_mul, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows[:, :, 2, :], (torch.arange(stats_len) + seqlen_k - seqlen_q).float().expand(batch, heads, -1))
    assert (rows[:, :, 0, seqlen_q:] == math.inf).all() and (rows[:, :, 1, seqlen_q:] == 0).all()
    assert guarded[size:].isnan().all()
    assert (accum == 0).all() if zero_dq else accum.isnan().all()

    accum.copy_(torch.randn_like(accum))
    dq = torch.full((batch, seqlen_q, heads + 1, head_dim), math.nan, dtype=torch.bfloat16)[:, :, 1:]
    gb._dq_convert_kernel[(2, batch * heads)](accum, dq, seqlen_q, heads, 0.5, *dq.stride()[:3], HEAD_DIM=head_dim,
                                               BLOCK=gb.ROW_BLOCK)
    # (The interpreter rounds fp32 to bf16 toward zero, a GPU to nearest: within one bf16 step either way.)
    torch.testing.assert_close(dq.float(), accum * 0.5, rtol=2 ** -7, atol=0.0)


def test_triton_backward_plan_replay_builds_buffers_and_descriptors():
    """backward._Plan: per call a fresh delta (when softmax_d's strides differ) copied into softmax_d at
    the end, a fresh fp32 dQ accumulator (atomic dQ; the delta kernel zeroes it), and each recorded launch gets this call's tensors
    or TMA descriptors over them in its slots."""
    from pyflash.kernels import backward as kb
    from pyflash.kernels.launch import Descriptor, Launch

    seen = []
    first = Launch(lambda *args: seen.append(("delta", args)) or args[2].fill_(3.0), ("out", "dout", "delta", "cu_q"))
    second = Launch(lambda *args: seen.append(("dkdv", args)),
                        (("desc", "q", [34, 256], [256, 1]), "k", "dq_target", "dq"))
    plan = kb._Plan((first, second), separate_delta=True, accumulate_dq=True)
    q, k, out, dout, dq = (torch.randn(2, 17, 2, 128) for _ in range(5))
    softmax_lse = torch.randn(2, 2, 17)
    softmax_d = torch.full((2, 2, 20), float("nan"))[..., :17]
    named = dict(q=q, k=k, out=out, dout=dout, dq=dq, softmax_lse=softmax_lse, softmax_d=softmax_d, cu_q=softmax_lse)
    plan(named)
    (_, delta_args), (_, dkdv_args) = seen
    assert delta_args[0] is out and delta_args[1] is dout and delta_args[2] is not softmax_d
    assert (softmax_d == 3.0).all()  # the separate delta, copied back
    desc, k_arg, accum, dq_arg = dkdv_args
    assert isinstance(desc, Descriptor) and desc.base is q and desc.shape == [34, 256] and k_arg is k
    assert accum.dtype == torch.float32 and accum.shape == dq.shape and dq_arg is dq


def test_plans_table_starts_over_past_its_limit():
    """launch.Plans keeps at most `limit` plans: a new key past it clears the table (an existing key is
    just replaced), so shapes that keep changing cannot grow it without end."""
    from pyflash.kernels.launch import Plans

    plans = Plans(limit=3)
    for key in range(3):
        plans[key] = key
    plans[1] = "again"
    assert dict(plans) == {0: 0, 1: "again", 2: 2}
    plans[3] = 3
    assert dict(plans) == {3: 3}


def test_direct_launch_passes_what_triton_passes(monkeypatch):
    """launch._Direct lays out the arguments Triton 3.6's CudaLauncher and its descriptor wrapper
    (wrap_handle_tensordesc) hand the compiled C launcher: the same list, built from the real Triton code
    with a stand-in C launcher and descriptor encoder, for a kernel with a tensor, a TMA descriptor, a
    scalar and a constexpr; a descriptor seen before (shape and strides as lists) is not encoded again."""
    from triton.backends.nvidia import driver as nvidia

    from pyflash.kernels import launch

    encoded = []

    def encode(desc, meta):  # make_tensordesc_arg's output shape: the CUtensorMap, then shape and strides
        encoded.append(desc)
        return [("map", desc.base.data_ptr(), tuple(desc.shape), meta["swizzle"]), *desc.shape, *desc.strides]

    monkeypatch.setattr(nvidia, "make_tensordesc_arg", encode)
    calls = []
    signature = {"x": "*bf16", "desc": "tensordesc<bf16[64, 32]>", "n": "i32", "BLOCK": "constexpr"}
    meta = dict(swizzle=3, elem_size=2, elem_type=0, block_size=[64, 32], fp4_padded=False)
    runner = object.__new__(nvidia.CudaLauncher)  # its __call__ as Triton runs it, on stand-in parts
    runner.launch = nvidia.wrap_handle_tensordesc(lambda *args: calls.append(args), signature, [meta])
    runner.num_ctas, runner.launch_cooperative_grid, runner.launch_pdl = 1, False, False
    runner.global_scratch_size = runner.profile_scratch_size = 0
    runner.global_scratch_align = runner.profile_scratch_align = 1

    class Kernel:
        function, packed_metadata, run = "function", "packed", runner

        def launch_metadata(self, grid, stream, *values):
            return None

    monkeypatch.setattr(launch, "current_stream", lambda: 7)
    recorded = launch.Recorded(Kernel(), (3, 2, 1), [None, None, 100, 64], slots=(0, 1))
    x = torch.zeros(8)
    # Shape and strides as lists, as Triton's and Gluon's TensorDescriptor keep them.
    desc = launch.Descriptor(torch.zeros(4), [128, 32], [32, 1])
    for direct in (False, True, True):
        monkeypatch.setattr(launch, "DIRECT_LAUNCH", direct)
        recorded(x, desc)
    through_triton, direct_first, direct_again = calls
    # Launch metadata and the enter / exit hooks (empty HookChains in Triton 3.6) go as None: the C
    # launcher then skips them.
    assert direct_first[10:13] == (None, None, None)
    assert direct_first[:10] + direct_first[13:] == through_triton[:10] + through_triton[13:]
    assert direct_again == direct_first
    assert through_triton[:10] == (3, 2, 1, 7, "function", False, False, None, None, "packed")
    assert through_triton[13] is x and through_triton[-1] == 64 and len(through_triton) == 13 + 1 + 5 + 2
    assert len(encoded) == 2  # Triton's path, then the direct path's first call; its second hit the cache
    # A registered hook sends the replay back through Triton.
    from triton import knobs

    knobs.runtime.launch_enter_hook.add(print)
    try:
        recorded(x, desc)
    finally:
        knobs.runtime.launch_enter_hook.remove(print)
    assert calls[-1][11] is knobs.runtime.launch_enter_hook


def test_backward_config_takes_the_dropout_row_where_there_is_one(monkeypatch):
    """Calls with dropout look up configs.BACKWARD_DROPOUT first and fall back to configs.BACKWARD's row
    (tests/test_kernel_backward.py checks that backward() asks for it exactly when p_dropout > 0)."""
    from pyflash.kernels import backward, configs

    q = torch.zeros(1, 1, 1, 64)
    key = (0, q.element_size(), 64, True)
    plain = backward.backward_config(q, 64, True)
    assert plain == backward.BackwardConfig(*configs.BACKWARD[key])
    assert backward.backward_config(q, 64, True, dropout=True) == plain  # no dropout row: BACKWARD's
    row = ((16, 16, 4, 1), (16, 16, 4, 1), False)
    monkeypatch.setitem(configs.BACKWARD_DROPOUT, key, row)
    assert backward.backward_config(q, 64, True, dropout=True) == backward.BackwardConfig(*row)
    assert backward.backward_config(q, 64, True) == plain
    assert backward.backward_config(q, 64, False, dropout=True) == backward.backward_config(q, 64, False)
