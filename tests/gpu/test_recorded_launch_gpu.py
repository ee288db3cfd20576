"""Recorded launches (kernels/launch.py) on the GPU: the Gluon forward and backward and the Triton
backward replay a call like an earlier one without Triton's launch path (gluon_forward.try_forward,
gluon_backward.try_backward, backward._PLANS).
A replay must give what a launch through Triton gives on the same inputs, bit for bit (dQ of the
backward within rounding: its TMA reduce-add order varies)."""
import pytest
import torch

import pyflash
from pyflash.kernels import backward, forward, gluon_backward, gluon_forward, launch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, params=[False, True], ids=["via-triton", "direct"])
def direct_launch(request, monkeypatch):
    """Every test both ways: replays through kernel.run, and through the C launcher itself (launch._Direct,
    launch.DIRECT_LAUNCH)."""
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", request.param)
    return request.param


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _calls(q, k, v, dout, causal, **options):
    out, _, _, _, lse, seed, offset, _ = pyflash.mha_fwd(q, k, v, None, options.get("alibi"), 0.0, None, causal,
                                                         *options.get("window", (-1, -1)), False, None,
                                                         softcap=options.get("softcap", 0.0))
    if options:
        return out, lse
    dq, dk, dv, _ = pyflash.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, None, causal, -1, -1,
                                    False, seed, offset)
    return out, lse, dq, dk, dv


def _record_then_replay(monkeypatch, runs, call, plan_tables):
    """Each run through Triton (the plan tables dropped before it, the Triton kernels' recorded launches
    on), then each run again, replayed. Returns (results recorded, replays while recording, results
    replayed, replays while replaying); a replay is a launch.Recorded call."""
    monkeypatch.setattr(launch, "RECORD_TRITON", True)
    replays = []
    replay = launch.Recorded.__call__
    monkeypatch.setattr(launch.Recorded, "__call__", lambda self, *args: replays.append(1) or replay(self, *args))
    direct_calls = []
    direct = launch._Direct.__call__
    monkeypatch.setattr(launch._Direct, "__call__", lambda self, *args: direct_calls.append(1) or direct(self, *args))
    recorded = []
    for run in runs:
        for table in plan_tables:
            table.clear()
        recorded.append(call(*run))
    replays_recording = len(replays)
    replays.clear()
    replayed = [call(*run) for run in runs]
    # With launch.DIRECT_LAUNCH replays go through the C launcher itself (those of kernels without scratch
    # memory: _Direct.build); without it none does.
    assert bool(direct_calls) == (launch.DIRECT_LAUNCH and bool(replays)), (len(direct_calls), len(replays))
    return recorded, replays_recording, replayed, len(replays)


def _assert_same(recorded, replayed, names):
    """Bit for bit, but dQ within rounding (added by atomics / TMA reduce-add in arrival order)."""
    for want, got in zip(recorded, replayed):
        for name, a, b in zip(names, got, want):
            if name == "dq":
                torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)
            else:
                assert torch.equal(a, b), name


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels run on sm_90")
@pytest.mark.parametrize("head_dim, causal, heads_k, seqlen, options", [
    (128, False, 4, 300, {}), (128, True, 2, 517, {}), (64, True, 4, 1000, {}), (64, False, 1, 200, {}),
    (256, True, 2, 333, {}),
    (128, False, 4, 300, dict(window=(100, 20), softcap=10.0)), (64, True, 2, 300, dict(alibi=True)),
])
def test_replayed_launches_match_triton_launches(monkeypatch, head_dim, causal, heads_k, seqlen, options):
    gen = torch.Generator(device="cuda").manual_seed(seqlen + head_dim)
    if options.get("alibi"):
        options = dict(options, alibi=torch.rand(4, device="cuda", generator=gen))

    def inputs():
        q = torch.randn(2, seqlen, 4, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(2, seqlen, heads_k, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        return q, k, v, torch.randn_like(q)

    # The Triton backward's plans (d=64, d=256) too.
    recorded, _, replayed, replays = _record_then_replay(
        monkeypatch, [inputs() for _ in range(3)], lambda *run: _calls(*run, causal, **options),
        (gluon_forward._PLANS, gluon_backward._PLANS, backward._PLANS))
    assert any(gluon_forward._PLANS.values()), "the Gluon forward recorded no launch"
    assert replays, "no recorded launch was replayed"
    _assert_same(recorded, replayed, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("causal", [False, True])
def test_replayed_triton_launches_match_for_varlen(monkeypatch, causal):
    """Varlen calls run the Triton forward and backward (kernels/forward.py, kernels/backward.py): their
    replays (launch.RECORD_TRITON) must match launches through Triton bit for bit (dQ within rounding:
    atomics)."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    cu = torch.tensor([0, 100, 357, 400], dtype=torch.int32, device="cuda")

    def inputs():
        q = torch.randn(400, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(400, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        return q, k, v, torch.randn_like(q)

    def calls(q, k, v, dout):
        out, _, _, _, lse, seed, offset, _ = pyflash.mha_varlen_fwd(q, k, v, None, cu, cu, None, None, 257, 257, 0.0,
                                                                    None, False, causal, -1, -1, False, None)
        dq, dk, dv, _ = pyflash.mha_varlen_bwd(dout, q, k, v, out, lse, None, None, None, cu, cu, None, 257, 257,
                                               0.0, None, False, causal, -1, -1, False, seed, offset)
        return out, lse, dq, dk, dv

    recorded, replays_recording, replayed, replays = _record_then_replay(
        monkeypatch, [inputs() for _ in range(3)], calls, (forward._PLANS, backward._PLANS))
    assert not replays_recording
    assert replays, "no recorded launch was replayed"
    _assert_same(recorded, replayed, ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [0, 1])
def test_replayed_decode_launches_match(monkeypatch, paged, num_splits):
    """flash_attn_with_kvcache's decode kernel (kernels/decode.py): replays (launch.RECORD_TRITON; fresh
    split buffers, this stream's counters) must match launches through Triton bit for bit."""
    from pyflash.kernels import decode
    from pyflash.kvcache import flash_attn_with_kvcache

    gen = torch.Generator(device="cuda").manual_seed(11)
    batch, capacity, page = 2, 2048, 256
    seqlens = torch.tensor([1500, 700], dtype=torch.int32, device="cuda")

    def inputs():
        q = torch.randn(batch, 1, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        if paged:
            k, v = (torch.randn(batch * capacity // page, page, 2, 128, device="cuda", dtype=torch.bfloat16,
                                generator=gen) for _ in range(2))
            table = torch.randperm(batch * capacity // page, device="cuda", generator=gen).to(torch.int32)
            return q, k, v, table.view(batch, -1)
        k, v = (torch.randn(batch, capacity, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))
        return q, k, v, None

    def call(q, k, v, table):
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, num_splits=num_splits,
                                       return_softmax_lse=True)

    recorded, replays_recording, replayed, replays = _record_then_replay(
        monkeypatch, [inputs() for _ in range(3)], call, (decode._PLANS,))
    assert not replays_recording
    assert replays, "no recorded launch was replayed"
    _assert_same(recorded, replayed, ("out", "lse"))
