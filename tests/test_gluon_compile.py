"""The Gluon FlashAttention-3-style forward (kernels/gluon_forward.py) compiled offline for Hopper
(sm_90) on this CPU-only machine: no spills (ptxas -v) and shared memory within Hopper's 227 KB,
for a representative set of head dims, feature switches and launch configs.

Gluon cannot compile in a process where TRITON_INTERPRET=1 (how the CPU tests run, tests/conftest.py),
so the compiles run in one child process without it (like aot.Sm90Compiler), which prints one JSON
line per config. Skipped only when Gluon itself cannot be imported.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")

SM90_MAX_SHARED = 232448

# (id, head_dim, dtype, config (block_n, num_stages, num_wg, pingpong) or None for the default, flags)
CASES = [
    ("d64-plain", 64, "bf16", None, {}),
    ("d64-all", 64, "bf16", None, dict(has_left=True, has_right=True, softcap=True, alibi=True)),
    ("d64-causal-3wg", 64, "bf16", (128, 2, 3, True), dict(has_right=True)),
    ("d128-causal-fp16", 128, "fp16", None, dict(has_right=True)),
    ("d128-all", 128, "bf16", None, dict(has_left=True, has_right=True, softcap=True, alibi=True)),
    ("d256-plain", 256, "bf16", None, {}),
    ("d256-all", 256, "bf16", None, dict(has_left=True, has_right=True, softcap=True, alibi=True)),
    # Persistent variants (tuning candidates for short sequences): plain / causal / right windows.
    ("d64-persistent-3wg", 64, "bf16", (64, 4, 3, True, True), {}),
    ("d128-persistent-causal", 128, "bf16", (128, 2, 2, True, True), dict(has_right=True)),
    ("d256-persistent-causal", 256, "bf16", (32, 3, 2, True, True), dict(has_right=True)),
]
CHILDREN = 2  # compiles are single-threaded: two children halve the wall time on CI's two cores

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
    import pyflash

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    src = os.path.dirname(os.path.dirname(os.path.abspath(pyflash.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
    chunks = [CASES[i::CHILDREN] for i in range(CHILDREN)]
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(chunk)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for chunk in chunks if chunk]
    found, errors = {}, []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        for line in stdout.splitlines():
            if line.startswith("REPORT "):
                report = json.loads(line[len("REPORT "):])
                found[report.pop("id")] = report
        if proc.returncode:
            errors.append(f"exit code {proc.returncode}:\n{stderr[-4000:]}")
    assert found, f"the compiling children printed nothing: {errors}"
    return found


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
def test_gluon_forward_compiles_for_sm90(reports, case_id):
    report = reports.get(case_id)
    assert report is not None, f"no report for {case_id}"
    assert "error" not in report, report.get("error")
    assert report["ptxas_ok"], report
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{case_id} spills: {report}"
    assert not report["warnings"], report["warnings"]
    assert report["shared"] <= SM90_MAX_SHARED, f"{case_id} needs {report['shared']} B of shared memory"
