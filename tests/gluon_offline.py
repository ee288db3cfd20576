"""Offline sm_90 compiles of the Gluon kernels for the CPU tests (tests/test_gluon_compile.py,
tests/test_gluon_backward_compile.py).

Gluon cannot compile in a process where TRITON_INTERPRET=1 (how the CPU tests run, tests/conftest.py),
so the compiles run in child processes without it; each child runs ``child_src`` on its share of the
cases (``sys.argv[1]``, JSON) and prints one ``REPORT {json with an "id"}`` line per case.
"""
import json
import os
import subprocess
import sys

SM90_MAX_SHARED = 232448
CHILDREN = 2  # compiles are single-threaded: two children halve the wall time on CI's two cores


def run_reports(child_src: str, cases):
    """{case id: report} from the children, and the stderr tails of children that failed."""
    import pyflash

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    src = os.path.dirname(os.path.dirname(os.path.abspath(pyflash.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
    chunks = [cases[i::CHILDREN] for i in range(CHILDREN)]
    procs = [subprocess.Popen([sys.executable, "-c", child_src, json.dumps(chunk)], env=env, stdout=subprocess.PIPE,
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
    return found, errors


def assert_clean(report, case_id, max_spill_bytes=0):
    """Compiled, no spills (or at most max_spill_bytes each way), no ptxas warnings, shared memory
    within Hopper's 227 KB."""
    assert "error" not in report, report.get("error")
    assert report["ptxas_ok"], report
    assert report["spill_stores"] <= max_spill_bytes and report["spill_loads"] <= max_spill_bytes, \
        f"{case_id} spills: {report}"
    assert not report["warnings"], report["warnings"]
    assert report["shared"] <= SM90_MAX_SHARED, f"{case_id} needs {report['shared']} B of shared memory"
