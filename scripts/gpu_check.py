"""The GPU check, run through the device tool in one call:

    PYTHONPATH=src python3 scripts/gpu_check.py [--bench-args "..."]

1. every test marked `gpu` (tests/gpu/): kernels against float32 references with the flash_attn
   error rule, against PyTorch's own FlashAttention ops, determinism, torch.compile. On 8 pytest-xdist
   workers: on a fresh machine compiling the kernels is most of the time (one process ran past the
   device tool's 10-minute call);
2. the benchmark (`python -m pyflash.bench`) on a subset, so one call gives correctness and speed.
Logs and JSON go to $OUT when it is set (the device tool brings them back).
"""
import argparse
import os
import shlex
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests", default="tests/gpu", help="pytest target(s), space separated")
    parser.add_argument("--workers", type=int, default=8,
                        help="pytest-xdist workers: a fresh machine spends most of the tests' time compiling "
                             "kernels, which runs in parallel on its CPU cores (0: one process)")
    parser.add_argument("--test-timeout", type=int, default=300, help="seconds per test (pytest-timeout)")
    parser.add_argument("--bench-args", default="--mode fwd bwd --head-dims 64 128 256 --seqlens 1024 4096 16384",
                        help="arguments for python -m pyflash.bench ('' skips the benchmark)")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, ["src", env.get("PYTHONPATH", "")]))

    import torch

    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name()}", flush=True)
    start = time.time()
    parallel = ["-n", str(args.workers)] if args.workers else []
    test_rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *parallel,
                               f"--timeout={args.test_timeout}", "--durations=10",
                               f"--junitxml={out_dir}/gpu_tests.xml", *args.tests.split()], env=env)
    print(f"== gpu tests: rc={test_rc} in {time.time() - start:.0f}s", flush=True)
    bench_rc = 0
    if args.bench_args:
        start = time.time()
        bench_rc = subprocess.call([sys.executable, "-m", "pyflash.bench", *shlex.split(args.bench_args),
                                    "--out", out_dir], env=env)
        print(f"== bench: rc={bench_rc} in {time.time() - start:.0f}s", flush=True)
    return test_rc or bench_rc


if __name__ == "__main__":
    sys.exit(main())
