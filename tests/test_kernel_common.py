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
    monkeypatch.setattr(gluon_forward, "supported", lambda *args: True)
    monkeypatch.setattr(gluon_forward, "forward", lambda *args: calls.append(args))
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


@pytest.mark.parametrize("head_dim, deterministic, expected", [(128, False, 1), (128, True, 0), (64, False, 0)])
def test_backward_dispatches_to_gluon_at_its_head_dims(monkeypatch, head_dim, deterministic, expected):
    """The Gluon backward takes d=128 (backward.GLUON_HEAD_DIMS) when its supported() accepts the call,
    which the real one never does when deterministic (here a stub that checks the flag)."""
    from pyflash.kernels import backward as module
    from pyflash.kernels import gluon_backward

    calls = []
    monkeypatch.setattr(gluon_backward, "supported", lambda *args: not args[-1])
    monkeypatch.setattr(gluon_backward, "backward", lambda *args: calls.append(args))
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


def test_fast_launch_keys_are_never_coarser_than_triton_specialization():
    """kernels/launch.FastLaunch reuses a compiled kernel for equal arg_key()s: equal keys must mean
    equal specializations under Triton's own specializer (type, alignment, the value 1, int width)."""
    import itertools

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.tools.tensor_descriptor import TensorDescriptor

    from pyflash.kernels.launch import arg_key

    base = torch.zeros(4096, dtype=torch.bfloat16)
    values = [0, 1, 2, 15, 16, 17, 32, -1, -16, (1 << 31) - 16, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, -(1 << 31),
              -(1 << 31) - 16, 0.0, 1.0, 2.5, True, False,
              base, base[8:], base[16:], base[1:], base.float(), base.float()[4:], base.to(torch.int32)]
    values += [TensorDescriptor(base[:4096].view(64, 64), [64, 64], [64, 1], block) for block in ([16, 64], [32, 64])]
    values += [TensorDescriptor(base[:2048].view(32, 64), [32, 64], [64, 1], [16, 64])]
    for a, b in itertools.product(values, repeat=2):
        if arg_key(a, False) == arg_key(b, False):
            spec_a = native_specialize_impl(CUDABackend, a, False, True, True)
            spec_b = native_specialize_impl(CUDABackend, b, False, True, True)
            assert spec_a == spec_b, (a, b, spec_a, spec_b)


def test_fast_launch_calls_the_compiled_launcher_with_every_parameter(monkeypatch):
    """The first call of a key goes through Triton; later ones reach kernel.run directly, with the
    arguments in parameter order (defaults filled in, constexprs included) as JITFunction.run passes them."""
    from types import SimpleNamespace

    from pyflash.kernels import launch

    runs, first = [], []

    class Kernel:
        function, packed_metadata = "function", "packed"

        def launch_metadata(self, grid, stream, *values):
            return None

        def run(self, *args):
            runs.append(args)

    class Fn:
        arg_names = ["x", "n", "BLOCK", "FLAG"]
        params = [SimpleNamespace(is_constexpr=c, default=d)
                  for c, d in ((False, None), (False, None), (True, None), (True, False))]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: first.append((grid, args, kwargs)) or Kernel()

    monkeypatch.setattr(launch, "current_stream", lambda: 7)
    fast = launch.FastLaunch(Fn())
    x = torch.zeros(16)
    fast[(3, 2)](x, 32, BLOCK=64, num_warps=4)
    assert len(first) == 1 and not runs
    fast[(5,)](x, 48, BLOCK=64, num_warps=4)  # same key: 48 and 32 are both multiples of 16
    # (grid, stream, function, packed metadata, launch metadata, Triton's enter / exit hooks, the arguments)
    assert len(first) == 1 and len(runs) == 1
    assert runs[0][:7] == (5, 1, 1, 7, "function", "packed", None) and runs[0][9:] == (x, 48, 64, False)
    for changed in (dict(n=1), dict(n=33), dict(BLOCK=32), dict(num_warps=8), dict(FLAG=True)):
        kwargs = {**dict(BLOCK=64, num_warps=4), **{k: v for k, v in changed.items() if k != "n"}}
        fast[(1,)](x, changed.get("n", 32), **kwargs)
    assert len(first) == 6 and len(runs) == 1  # every change of key compiled / launched through Triton
