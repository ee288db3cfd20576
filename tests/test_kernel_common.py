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
