"""Run one job of a GPU check script in a child process under a watchdog (scripts/gluon_check.py,
scripts/gluon_backward_check.py): warp-specialized kernels with a barrier mistake hang rather than
fail, and one hang must not eat a device call."""
import json
import os
import subprocess
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def run_child(script: str, job, timeout: float):
    """``python script --child <job as JSON>`` without TRITON_INTERPRET, killed (its whole process
    group) after ``timeout`` seconds. Returns (status: "ok" / "exit code N" / "HANG ...", output, seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH", "")]))
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--child", json.dumps(job)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        status = f"HANG (killed after {timeout} s)"
    output = output.decode() if isinstance(output, bytes) else (output or "")
    return status, output, time.time() - start


def log_json(filename: str, record) -> None:
    """Append record as one JSON line to $OUT/filename (the device tool brings $OUT back); no $OUT: nothing."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, filename), "a") as f:
            f.write(json.dumps(record) + "\n")
