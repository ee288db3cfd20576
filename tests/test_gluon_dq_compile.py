"""The Gluon dQ kernel (kernels/gluon_dq.py) compiled offline for Hopper (sm_90) on this CPU-only machine: no
spills (ptxas -v), no ptxas warnings and shared memory within Hopper's 227 KB, for the default configs at
every head dim, causal and not, bf16 and fp16. Compiles run in child processes without TRITON_INTERPRET
(tests/gluon_offline.py). Skipped only when Gluon itself cannot be imported."""
import pytest

from gluon_offline import assert_clean, run_reports

pytest.importorskip("triton.experimental.gluon")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")

# (id, head_dim, causal, dtype, Config fields (block_n, num_stages, num_wg[, pingpong]) or None: the default)
CASES = [
    ("d64", 64, False, "bf16", None),
    ("d64-causal-fp16", 64, True, "fp16", None),
    ("d128", 128, False, "fp16", None),
    ("d128-causal", 128, True, "bf16", None),
    ("d256", 256, False, "bf16", None),
    ("d256-causal-fp16", 256, True, "fp16", None),
    ("d128-causal-one-warpgroup", 128, True, "bf16", (64, 3, 1)),
    ("d256-one-warpgroup-bn64", 256, False, "bf16", (64, 2, 1)),
    ("d64-bn128", 64, False, "bf16", (128, 2, 2)),
    ("d128-causal-pingpong", 128, True, "bf16", (64, 3, 2, True)),
    ("d256-pingpong-fp16", 256, False, "fp16", (32, 2, 2, True)),
]

_CHILD = r"""
import json, sys, traceback
from pyflash.kernels import gluon_dq
for case_id, head_dim, causal, dtype, config in json.loads(sys.argv[1]):
    try:
        report = gluon_dq.offline_report(head_dim, config, dtype, causal)
    except Exception:
        report = dict(error=traceback.format_exc())
    print("REPORT " + json.dumps(dict(id=case_id, **report)), flush=True)
"""


@pytest.fixture(scope="module")
def reports():
    return run_reports(_CHILD, CASES)


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
def test_gluon_dq_compiles_clean(reports, case_id):
    found, errors = reports
    assert case_id in found, f"no report for {case_id}: {errors}"
    assert_clean(found[case_id], case_id)


def test_tuning_candidates_fit_shared_memory():
    """Every candidate fits Hopper's shared memory (with room for the compiler's scratch); d=256 keeps
    Q and dO of two warpgroups resident only with small key blocks."""
    from pyflash.kernels import gluon_dq

    for head_dim in (64, 128, 256):
        cands = gluon_dq.tuning_candidates(head_dim)
        assert cands and gluon_dq.config_label(gluon_dq.default_config(head_dim, False)) in cands
        for cfg in cands.values():
            assert gluon_dq.shared_bytes(head_dim, cfg) + 2048 <= gluon_dq.SM90_MAX_SHARED
    assert "bn128-st2-wg2" not in gluon_dq.tuning_candidates(256)
