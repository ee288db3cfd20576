"""The Gluon FlashAttention-3-style backward (kernels/gluon_backward.py) compiled offline for Hopper
(sm_90) on this CPU-only machine: no spills (ptxas -v) and shared memory within Hopper's 227 KB, for
the default configs and representative tuning candidates.

Gluon cannot compile in a process where TRITON_INTERPRET=1 (how the CPU tests run, tests/conftest.py),
so the compiles run in child processes without it (tests/gluon_offline.py). Skipped only when Gluon
itself cannot be imported.
"""
import pytest

from gluon_offline import assert_clean, run_reports

pytest.importorskip("triton.experimental.gluon")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


# (id, head_dim, causal, dtype, Config fields (block_m, num_stages, split_mask, acc_init, dq_bufs, lpt[, dq_own,
# dq_early, wgs]) or None)
CASES = [
    ("d64-default", 64, False, "bf16", None),
    ("d64-causal-acc-st3-dq2", 64, True, "bf16", (64, 3, False, True, 2, False)),
    ("d64-causal-split", 64, True, "fp16", (64, 2, True, False, 1, False)),
    ("d128-default", 128, False, "bf16", None),
    ("d128-causal-default-fp16", 128, True, "fp16", None),
    ("d128-causal-acc-dq2-lpt", 128, True, "bf16", (64, 2, False, True, 2, True)),
    # (..., dq_own, dq_early, wgs): each warpgroup's own dQ (d=64), dQ GEMM before dK (shared dS).
    ("d64-own", 64, False, "bf16", (64, 2, False, False, 1, False, True, False, 2)),
    ("d64-causal-acc-own-st3", 64, True, "bf16", (64, 3, False, True, 1, False, True, False, 2)),
    ("d128-causal-dqe", 128, True, "bf16", (64, 2, False, False, 1, False, False, True, 2)),
    # One consumer warpgroup (wgs=1, dq_own): 64 keys a CTA, two CTAs an SM.
    ("d64-one-warpgroup", 64, False, "bf16", (64, 2, False, True, 1, False, True, False, 1)),
    ("d64-causal-one-warpgroup-st3-fp16", 64, True, "fp16", (64, 3, False, False, 1, False, True, False, 1)),
    ("d64-causal-one-warpgroup-st3-dq2", 64, True, "bf16", (64, 3, False, True, 2, False, True, False, 1)),
    ("d128-acc-dqe-fp16", 128, False, "fp16", (64, 2, False, True, 1, False, False, True, 2)),
    # dK / dV only in the plain layout (gluon_backward.two_pass_config below d=256; not measured yet).
    ("d128-two-pass", 128, False, "bf16", (64, 2, False, True, 1, False, False, False, 2, False, True, False)),
    ("d128-causal-two-pass-fp16", 128, True, "fp16", (64, 2, False, True, 1, False, False, False, 2, False, False,
                                                      False)),
]
# The deterministic modes (id, head_dim, causal, dtype, DETERMINISTIC) of the default configs. Their
# turn-taking code spills a few 64-bit values (shared-memory descriptors) that the loop reloads, ~7
# local loads per step of ~3 us (SASS in RESULTS.md): a bound, not zero.
DETERMINISTIC_CASES = [
    ("d128-deterministic-rotated", 128, False, "bf16", 1),
    ("d128-causal-deterministic-descending-fp16", 128, True, "fp16", 1),
    ("d128-causal-deterministic-ascending", 128, True, "bf16", 2),
]
DETERMINISTIC_MAX_SPILL = 256
# head_dim 256 (split_d): the default configs. The default partition spills a dozen scalars (44-68 B each way),
# reloaded ~6 times a step of ~4.5 us; the wgmma descriptors of the loop-invariant K / V tiles, which spilled
# 512 B when hoisted, are rebuilt each step (_step's opaque zero).
SPLIT_D_CASES = [
    ("d256-default", 256, False, "bf16", None),
    ("d256-causal-default-fp16", 256, True, "fp16", None),
    ("d256-causal-lpt", 256, True, "bf16", (64, 2, False, False, 1, True, False, False, 2, True)),
    ("d256-default-fp16", 256, False, "fp16", None),
    ("d256-plain", 256, False, "bf16", (64, 2, False, False, 1, False, False, False, 2, True, False)),
    # dK / dV only (dQ from another pass: kernels/backward.backward(dq_only=True)): gluon_backward.two_pass_config.
    ("d256-causal-without-dq", 256, True, "bf16", (64, 2, False, False, 1, False, False, False, 2, True, False,
                                                   False)),
    ("d256-two-pass", 256, False, "bf16", (64, 2, False, True, 1, False, False, False, 2, True, True, False)),
    ("d256-causal-two-pass-fp16", 256, True, "fp16", (64, 2, False, True, 1, False, False, False, 2, True, False,
                                                      False)),
    # coop: S^T / P^T in warpgroup 0, dP^T / dS^T in warpgroup 1, exchanged through shared memory.
    ("d256-causal-two-pass-coop", 256, True, "bf16", (64, 2, False, True, 1, False, False, False, 2, True, False,
                                                      False, True)),
    ("d256-two-pass-coop-fp16", 256, False, "fp16", (64, 2, False, False, 1, False, False, False, 2, True, True,
                                                     False, True)),
    ("d256-two-pass-coop", 256, False, "bf16", (64, 2, False, True, 1, False, False, False, 2, True, True, False,
                                                1)),
    # coop=2: the next step's S^T / dP^T issued before this step's dV / dK GEMMs.
    ("d256-causal-two-pass-coop2", 256, True, "bf16", (64, 2, False, True, 1, False, False, False, 2, True, False,
                                                       False, 2)),
    ("d256-two-pass-coop2-fp16", 256, False, "fp16", (64, 2, False, False, 1, False, False, False, 2, True, True,
                                                      False, 2)),
]
SPLIT_D_MAX_SPILL = 96
# persistent (one CTA per SM looping over key-block tiles): clean at d=64 and without dQ (d=128, d=256's first
# pass); at d=128 with dQ the tile loop's scalars push the consumers past their 240 registers: 68-96 B
# spilled, one store and two loads of them per step of ~2 us (the rest around tiles). Not yet run on a GPU.
PERSISTENT_CASES = [
    ("d64-persistent", 64, False, "bf16", (64, 2, False, True, 1, False, False, False, 2, False, False, True, 0,
                                           True), 0),
    ("d64-causal-persistent-lpt-fp16", 64, True, "fp16", (64, 2, False, False, 1, True, False, False, 2, False,
                                                          False, True, 0, True), 0),
    ("d128-causal-two-pass-persistent", 128, True, "bf16", (64, 2, False, True, 1, True, False, False, 2, False,
                                                            False, False, 0, True), 0),
    ("d256-causal-two-pass-persistent-lpt", 256, True, "bf16", (64, 2, False, True, 1, True, False, False, 2, True,
                                                                False, False, 0, True), 0),
    ("d256-two-pass-persistent-fp16", 256, False, "fp16", (64, 2, False, True, 1, False, False, False, 2, True, True,
                                                           False, 0, True), 0),
    ("d256-causal-two-pass-coop2-persistent", 256, True, "bf16", (64, 2, False, True, 1, True, False, False, 2,
                                                                  True, False, False, 2, True), 0),
    ("d128-persistent", 128, False, "bf16", (64, 2, False, True, 1, False, False, False, 2, False, False, True, 0,
                                             True), 128),
    ("d128-causal-persistent-lpt-fp16", 128, True, "fp16", (64, 2, False, False, 1, True, False, False, 2, False,
                                                            False, True, 0, True), 128),
]

# trim (causal: warpgroup 1 runs no GEMM at the query blocks that see none of its keys). bf16 with dQ keeps 8-36 B
# of warpgroup 1's loop values in local memory (~5 loads a step, none in warpgroup 0); the rest are clean.
TRIM_CASES = [
    ("d128-causal-trim", 128, True, "bf16", (64, 2, False, False, 1, False, False, False, 2, False, False, True, 0,
                                             False, True), 64),
    ("d128-causal-trim-fp16", 128, True, "fp16", (64, 2, False, False, 1, False, False, False, 2, False, False, True,
                                                  0, False, True), 0),
    ("d128-causal-acc-trim", 128, True, "bf16", (64, 2, False, True, 1, False, False, False, 2, False, False, True, 0,
                                                 False, True), 16),
    ("d128-causal-two-pass-trim", 128, True, "bf16", (64, 2, False, True, 1, False, False, False, 2, False, False,
                                                      False, 0, False, True), 0),
    ("d64-causal-trim", 64, True, "bf16", (64, 2, False, False, 1, False, False, False, 2, False, False, True, 0,
                                           False, True), 0),
]

_CHILD = r"""
import json, re, sys, traceback
from pyflash.kernels import gluon_backward as gb
for case_id, head_dim, causal, dtype, config, deterministic in json.loads(sys.argv[1]):
    try:
        report = gb.offline_report(head_dim, causal, config, dtype, deterministic)
        ptx = report.pop("ptx")
        report["wgmma"] = ptx.count("wgmma.mma_async")
        report["setmaxnreg_inc"] = max(map(int, re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)),
                                       default=0)
    except Exception:
        report = dict(error=traceback.format_exc())
    print("REPORT " + json.dumps(dict(id=case_id, **report)), flush=True)
"""


@pytest.fixture(scope="module")
def reports():
    cases = [(*case, 0) for case in CASES + SPLIT_D_CASES]
    cases += [(*case[:5], 0) for case in PERSISTENT_CASES + TRIM_CASES]
    cases.append(("d128-causal-plain", 128, True, "bf16", None, 0))
    cases += [(case_id, head_dim, causal, dtype, None, mode)
              for case_id, head_dim, causal, dtype, mode in DETERMINISTIC_CASES]
    return run_reports(_CHILD, cases)


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
def test_gluon_backward_compiles_clean(reports, case_id):
    found, errors = reports
    assert case_id in found, f"no report for {case_id}: {errors}"
    report = found[case_id]
    assert_clean(report, case_id)


@pytest.mark.parametrize("case_id", ["d64-one-warpgroup", "d64-causal-one-warpgroup-st3-fp16",
                                     "d64-causal-one-warpgroup-st3-dq2"])
def test_one_warpgroup_fits_two_ctas_per_sm(reports, case_id):
    """wgs=1: 256 threads at 128 registers and under half of an SM's 228 KB of shared memory (each CTA
    also reserves 1 KB), so that two CTAs share an SM; the consumer gets 232 registers by setmaxnreg."""
    found, errors = reports
    assert case_id in found, f"no report for {case_id}: {errors}"
    report = found[case_id]
    assert report["regs"] <= 128, report["regs"]
    assert 2 * (report["shared"] + 1024) <= 228 * 1024, report["shared"]
    assert report["setmaxnreg_inc"] == 232, report["setmaxnreg_inc"]


@pytest.mark.parametrize("case_id", [case[0] for case in SPLIT_D_CASES])
def test_gluon_backward_head_dim_256_compiles(reports, case_id):
    found, errors = reports
    assert case_id in found, f"no report for {case_id}: {errors}"
    assert_clean(found[case_id], case_id, SPLIT_D_MAX_SPILL)


def test_coop_issues_each_gemm_once(reports):
    """split_d issues S^T and dP^T in both warpgroups; coop in one each: per warpgroup one 64 x 64 x 256
    GEMM (16 k-steps) and its halves of dV and dK (64 x 128 x 64: 4 k-steps each)."""
    found, errors = reports
    for case_id in ("d256-causal-two-pass-coop", "d256-two-pass-coop-fp16", "d256-causal-two-pass-fp16"):
        assert case_id in found, f"no report for {case_id}: {errors}"
    per_wg = 256 // 16 + 2 * (64 // 16)
    assert found["d256-causal-two-pass-coop"]["wgmma"] == found["d256-two-pass-coop-fp16"]["wgmma"] == 2 * per_wg
    assert found["d256-causal-two-pass-fp16"]["wgmma"] == 2 * (per_wg + 256 // 16)


def test_coop_needs_split_d_without_dq():
    from pyflash.kernels import gluon_backward as gb

    base = gb.two_pass_config(256, True)._replace(coop=True)
    assert gb.launch_shape(base)[0] == 64
    for bad in (base._replace(with_dq=True), base._replace(split_d=False), base._replace(split_mask=True)):
        with pytest.raises(ValueError, match="coop needs split_d"):
            gb.launch_shape(bad)


@pytest.mark.parametrize("case_id", [case[0] for case in DETERMINISTIC_CASES])
def test_gluon_backward_deterministic_compiles(reports, case_id):
    found, errors = reports
    assert case_id in found, f"no report for {case_id}: {errors}"
    assert_clean(found[case_id], case_id, DETERMINISTIC_MAX_SPILL)


def test_supported_refuses_off_gpu():
    """Under the interpreter (or without an sm_90 GPU) the backend never claims a call."""
    import torch

    from pyflash.kernels import gluon_backward as gb
    from pyflash.params import AttentionParams, Seqlens

    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 8)
    params, seqlens = AttentionParams(0.125, -1, -1), Seqlens(1, 8, 8)
    assert not gb.supported(q, q, q, q, q, lse, q, q, q, params, seqlens, False)


def test_two_pass_configs_are_listed():
    """The configs two_pass() calls run are among the compile-checked cases above."""
    from pyflash.kernels import gluon_backward as gb

    listed = {(head_dim, causal, gb.Config(*config)) for _, head_dim, causal, _, config in CASES + SPLIT_D_CASES
              if config}
    for head_dim in (128, 256):
        for causal in (False, True):
            assert (head_dim, causal, gb.two_pass_config(head_dim, causal)) in listed


def test_head_dim_256_configs_are_split_d():
    """At d=256 only the split_d layout fits (dK / dV of 128 keys would not): every default and tuning
    candidate uses it, with 64-key K / V boxes and 64-column dQ reduces; split_d with a layout it cannot
    combine with is refused by name."""
    from pyflash.kernels import gluon_backward as gb

    for causal in (False, True):
        configs = [gb.default_config(256, causal, fp16) for fp16 in (False, True)]
        configs += list(gb.tuning_candidates(256, causal).values())
        for cfg in configs:
            assert cfg.split_d, cfg
            assert gb.launch_shape(cfg)[0] == gb.kv_box_rows(cfg) == 64
            assert gb.dq_box_cols(cfg, 256) == 64
    for bad in (gb.Config(split_d=True, dq_own=True), gb.Config(split_d=True, wgs=3),
                gb.Config(with_dq=False, dq_own=True), gb.Config(with_dq=False, wgs=3, dq_own=True)):
        with pytest.raises(ValueError, match="split_d"):
            gb.launch_shape(bad)
    # Without dQ the plain layout is fine too (128 keys a CTA).
    assert gb.launch_shape(gb.Config(with_dq=False))[0] == 128


@pytest.mark.parametrize("case_id,max_spill", [(case[0], case[5]) for case in PERSISTENT_CASES + TRIM_CASES])
def test_gluon_backward_variant_compiles(reports, case_id, max_spill):
    """The persistent and trimmed variants, each within its spill bound."""
    found, errors = reports
    assert case_id in found, f"no report for {case_id}: {errors}"
    assert_clean(found[case_id], case_id, max_spill)


def test_persistent_keeps_one_loop_body(reports):
    """The persistent grid wraps the same steps in a tile loop: as many GEMMs in the code as one tile per CTA."""
    found, errors = reports
    pairs = (("d128-persistent", "d128-default"), ("d64-persistent", "d64-default"),
             ("d128-causal-two-pass-persistent", "d128-two-pass"), ("d256-two-pass-persistent-fp16", "d256-two-pass"))
    for persistent, plain in pairs:
        assert persistent in found and plain in found, f"no report for {persistent} / {plain}: {errors}"
        assert found[persistent]["wgmma"] == found[plain]["wgmma"] > 0, (persistent, plain)


def test_persistent_needs_two_warpgroups_one_loop():
    from pyflash.kernels import gluon_backward as gb

    base = gb.Config(persistent=True)
    assert gb.launch_shape(base)[0] == 128
    assert gb.launch_shape(base._replace(with_dq=False))[0] == 128
    assert gb.launch_shape(gb.two_pass_config(256, True)._replace(persistent=True))[0] == 64
    assert gb.launch_shape(gb.two_pass_config(256, True)._replace(persistent=True, coop=2))[0] == 64
    for bad in (base._replace(split_mask=True), base._replace(wgs=3, dq_own=True)):
        with pytest.raises(ValueError, match="persistent needs"):
            gb.launch_shape(bad)


def test_trim_adds_only_the_half_dq_gemm(reports):
    """trim leaves warpgroup 0's loop as it is and gives warpgroup 1 a skip step whose only GEMM is its dQ half
    over 64 keys (4 wgmma of K = 16) beside its plain step; without dQ the skip step has no GEMM at all."""
    found, errors = reports
    for trimmed, plain, extra in (("d128-causal-trim", "d128-causal-plain", 4),
                                  ("d128-causal-two-pass-trim", "d128-causal-two-pass-fp16", 0)):
        assert trimmed in found and plain in found, f"no report for {trimmed} / {plain}: {errors}"
        assert found[trimmed]["wgmma"] == found[plain]["wgmma"] + extra > extra, (trimmed, plain)


def test_trim_switch_reaches_causal_defaults_below_256_only(monkeypatch):
    """gluon_backward.TRIM_CAUSAL (PYFLASH_TRIM=bwd) gives the causal one-pass and first-pass configs below d=256
    trim, and nothing else (d=256's split_d cannot take it)."""
    from pyflash.kernels import gluon_backward as gb

    for switch in (False, True):
        monkeypatch.setattr(gb, "TRIM_CAUSAL", switch)
        for head_dim in (64, 128, 256):
            for causal in (False, True):
                expected = switch and causal and head_dim < 256
                for fp16 in (False, True):
                    assert gb.default_config(head_dim, causal, fp16).trim == expected
                assert bool(gb.two_pass_config(head_dim, causal).trim) == expected
                gb.launch_shape(gb.default_config(head_dim, causal))  # a layout trim allows
