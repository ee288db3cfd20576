"""kernels/launch.FastLaunch (PYFLASH_FAST_LAUNCH=1) on the GPU: after the first launch of a key the
compiled launcher is called directly; results must match Triton's own launch path bit for bit."""
import pytest
import torch

import pyflash
from pyflash.kernels import launch

pytestmark = pytest.mark.gpu


def _calls(q, k, v, dout, causal, deterministic):
    out, _, _, _, lse, seed, offset, _ = pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
    dq, dk, dv, _ = pyflash.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, None, causal, -1, -1,
                                    deterministic, seed, offset)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_launch_matches_triton_launch(monkeypatch, head_dim, causal, deterministic):
    """Bit for bit, except dq of the non-deterministic backward (the Gluon one at d=128 adds dQ in
    arrival order)."""
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    shapes = [(2, 300, 4, head_dim), (2, 517, 2, head_dim), (2, 517, 2, head_dim), (2, 300, 4, head_dim)]
    runs = []
    for _ in range(3):  # the first call of each key goes through Triton, the next ones do not
        runs.append([torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes])
    monkeypatch.setattr(launch, "ENABLED", False)
    expected = [_calls(*inputs, causal, deterministic) for inputs in runs]
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "_FAST", {})
    for inputs, want in zip(runs, expected):
        got = _calls(*inputs, causal, deterministic)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            if name == "dq" and not deterministic:
                torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
            else:
                assert torch.equal(a, b), name
    assert launch._FAST, "no kernel went through FastLaunch"
