"""The Gluon FlashAttention-3-style forward (kernels/gluon_forward.py) compiled offline for Hopper
(sm_90) on this CPU-only machine: no spills (ptxas -v) and shared memory within Hopper's 227 KB,
for a representative set of head dims, feature switches and launch configs.

Gluon cannot compile in a process where TRITON_INTERPRET=1 (how the CPU tests run, tests/conftest.py),
so the compiles run in child processes without it (tests/gluon_offline.py). Skipped only when Gluon
itself cannot be imported.
"""
import pytest

from gluon_offline import assert_clean, run_reports

pytest.importorskip("triton.experimental.gluon")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
from pyflash.kernels import gluon_forward as gf  # noqa: E402


# (id, head_dim, dtype, config (block_n, num_stages, num_wg, pingpong) or None for the default, flags)
CASES = [
    ("d64-plain", 64, "bf16", None, {}),
    ("d64-all", 64, "bf16", None, dict(has_left=True, has_right=True, softcap=True, alibi=True)),
    # The default's three warpgroups (no causal mask) with a one-sided window, softcap and ALiBi.
    ("d64-left-softcap-alibi", 64, "bf16", None, dict(has_left=True, softcap=True, alibi=True)),
    ("d64-causal-3wg", 64, "bf16", (128, 2, 3, True), dict(has_right=True)),
    ("d128-causal-fp16", 128, "fp16", None, dict(has_right=True)),
    ("d128-all", 128, "bf16", None, dict(has_left=True, has_right=True, softcap=True, alibi=True)),
    ("d256-plain", 256, "bf16", None, {}),
    ("d256-all", 256, "bf16", None, dict(has_left=True, has_right=True, softcap=True, alibi=True)),
    # Persistent variants (tuning candidates for short sequences): plain / causal / right windows.
    ("d64-persistent-3wg", 64, "bf16", (64, 4, 3, True, True), {}),
    ("d128-persistent-causal", 128, "bf16", (128, 2, 2, True, True), dict(has_right=True)),
    ("d256-persistent-causal", 256, "bf16", (32, 3, 2, True, True), dict(has_right=True)),
    # What default_config picks for short keys (persistent, d=64 plain and causal).
    ("d64-short-default", 64, "bf16", tuple(gf.default_config(64, False, 512, 512)), {}),
    ("d64-short-default-causal", 64, "fp16", tuple(gf.default_config(64, True, 2048, 2048)), dict(has_right=True)),
    # Long causal keys at d=64: three warpgroups (128, 3, 3).
    ("d64-long-default-causal", 64, "bf16", tuple(gf.default_config(64, True, 8192, 8192)), dict(has_right=True)),
    # Trimmed warpgroup ranges (Config.trim): the half-block GEMMs beside the whole ones.
    ("d64-short-causal-trim", 64, "bf16", (128, 2, 2, True, True, True), dict(has_right=True)),
    ("d64-causal-3wg-trim", 64, "bf16", (128, 3, 3, True, False, True), dict(has_right=True)),
    ("d128-causal-trim-fp16", 128, "fp16", (128, 2, 2, True, False, True), dict(has_right=True)),
    ("d128-short-causal-trim", 128, "bf16", (128, 2, 2, True, True, True), dict(has_right=True)),
    ("d256-all-trim", 256, "bf16", (64, 2, 2, True, False, True),
     dict(has_left=True, has_right=True, softcap=True, alibi=True)),
]
# Spill bytes allowed (each way) where a tuning candidate is known to spill a little: the trimmed persistent d=128
# kernel keeps 24 B of kernel arguments in local memory (stored at its entry, a few loads a tile, none in the
# key-block loops: sm_90 SASS).
MAX_SPILL_BYTES = {"d128-short-causal-trim": 48}

_CHILD = r"""
import json, sys, traceback
from pyflash.kernels import gluon_forward as gf
for case_id, head_dim, dtype, config, flags in json.loads(sys.argv[1]):
    try:
        report = gf.offline_report(head_dim, config, dtype, **flags)
    except Exception:
        report = dict(error=traceback.format_exc())
    print("REPORT " + json.dumps(dict(id=case_id, **report)), flush=True)
"""


@pytest.fixture(scope="module")
def reports():
    found, errors = run_reports(_CHILD, CASES)
    assert found, f"the compiling children printed nothing: {errors}"
    return found


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
def test_gluon_forward_compiles_for_sm90(reports, case_id):
    report = reports.get(case_id)
    assert report is not None, f"no report for {case_id}"
    assert_clean(report, case_id, MAX_SPILL_BYTES.get(case_id, 0))


def test_trim_switch_reaches_causal_defaults_only(monkeypatch):
    """gluon_forward.TRIM_CAUSAL (PYFLASH_TRIM=fwd) gives causal calls' default configs trim, and nothing else."""
    shapes = [(d, s) for d in (64, 128, 256) for s in (512, 4096, 16384)]
    monkeypatch.setattr(gf, "TRIM_CAUSAL", False)
    assert not any(gf.default_config(d, causal, s, s).trim for d, s in shapes for causal in (False, True))
    monkeypatch.setattr(gf, "TRIM_CAUSAL", True)
    for d, s in shapes:
        assert gf.default_config(d, True, s, s) == gf._untrimmed_config(d, True, s, s)._replace(trim=True)
        assert not gf.default_config(d, False, s, s).trim
