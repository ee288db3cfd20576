"""``python -m pyflash.bench``: pyflash against its peers, side by side on this device.

On a CUDA GPU: BENCHMARK.md's workload (bf16 and fp16, tokens 16384, hidden 2048, head dims
64/128/256, seqlen 512..16384, causal off/on, plus the GQA / varlen / sliding-window / dropout rows)
against SDPA forced to FlashAttention-2, cuDNN and memory-efficient, and compiled FlexAttention.
On a CPU: a small fp32 table against SDPA. Options pick a subset.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from typing import List, Optional, Sequence

import torch

from pyflash.bench import report
from pyflash.bench.cases import DTYPES, MODES, Case, extra_rows, main_workload, make_inputs
from pyflash.bench.impls import CPU_PEERS, GPU_PEERS, PEERS, PyflashImpl
from pyflash.bench.timing import ceilings, median_ms

GPU_DEFAULTS = dict(dtypes=["bf16", "fp16"], head_dims=[64, 128, 256],
                    seqlens=[512, 1024, 2048, 4096, 8192, 16384], tokens=16384, hidden=2048,
                    modes=list(MODES), peers=list(GPU_PEERS), extras=True, threads=None)
CPU_DEFAULTS = dict(dtypes=["fp32"], head_dims=[64], seqlens=[128, 512, 1024], tokens=1024, hidden=256,
                    modes=["fwd", "bwd"], peers=list(CPU_PEERS), extras=False, threads=1)
# Largest |pyflash - peer| on the forward output that is not worth a warning (same inputs).
AGREEMENT = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-3}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pyflash.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: bf16 fp16 (cpu: fp32)")
    parser.add_argument("--head-dims", nargs="+", type=int, help="default: 64 128 256 (cpu: 64)")
    parser.add_argument("--seqlens", nargs="+", type=int, help="default: 512 .. 16384 (cpu: 128 512 1024)")
    parser.add_argument("--causal", nargs="+", choices=["off", "on", "both"], default=["both"])
    parser.add_argument("--mode", nargs="+", choices=list(MODES) + ["all"], dest="modes",
                        help="default: all (cpu: fwd bwd)")
    parser.add_argument("--peers", nargs="*", choices=sorted(PEERS),
                        help=f"default: {' '.join(GPU_PEERS)} (cpu: {' '.join(CPU_PEERS)}); none: pyflash alone")
    parser.add_argument("--tokens", type=int, help="batch * seqlen (default 16384; cpu 1024)")
    parser.add_argument("--hidden", type=int, help="heads * head_dim (default 2048; cpu 256)")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=None,
                        help="GQA / varlen / window / dropout rows (default: on for cuda, off for cpu)")
    parser.add_argument("--decode", action="store_true",
                        help="also the decoding rows (pyflash.bench.decode with its defaults; CUDA only)")
    parser.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the card's matmul and copy ceilings")
    parser.add_argument("--cpu-budget", type=float, default=0.5,
                        help="seconds spent timing one measurement on the CPU (0: a single call)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (cpu default 1: on a busy machine more threads spin and "
                             "the reference path's many small ops run ~30x slower)")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and the PNGs")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if "all" in args.modes:
        args.modes = list(MODES)
    causal = set(args.causal)
    args.causal_values = [c for c, key in ((False, "off"), (True, "on")) if key in causal or "both" in causal]
    return args


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _meta(args, argv: Sequence[str], device: torch.device) -> dict:
    import pyflash.backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "triton": triton_version, "commit": _git_commit(),
        "backend": pyflash.backend.name_for(device), "command": " ".join(["python -m pyflash.bench", *argv]),
        "threads": torch.get_num_threads(),
        "options": {k: v for k, v in vars(args).items() if k not in ("device", "causal_values")},
    }


def _error_text(error: BaseException) -> str:
    """First line of the message; dynamo's wrapped errors add the line naming the original one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text += "".join(f" ({line})" for line in lines[1:] if line.startswith("Developer debug context"))
    return f"{type(error).__name__}: {text}"[:300]


def _timed_call(runner, mode: str):
    if mode == "fwd":
        return runner.forward
    if mode == "bwd":
        return runner.make_backward()
    return runner.forward_backward


def run_case(case: Case, impls, modes: Sequence[str], device: torch.device, seed: int,
             progress: report.Progress, cpu_budget_s: float) -> List[dict]:
    inputs = make_inputs(case, device, seed)
    rows, reference_out = [], None
    for impl in impls:
        base = dict(case.describe(), impl=impl.name, label=impl.label)
        runner, setup_error, notes = None, None, {}
        try:
            runner = impl.prepare(case, inputs)
            notes = dict(runner.notes)
            if case.dropout_p == 0:
                out = runner.output()
                if impl.name == "pyflash":
                    reference_out = out.detach().float().clone()
                elif reference_out is not None:
                    notes["max_abs_diff_vs_pyflash"] = float((out.float() - reference_out).abs().max())
                del out
        except Exception as error:  # a peer that cannot run this case shows as '-'
            runner, setup_error = None, _error_text(error)
        for mode in modes:
            row = dict(base, mode=mode, ms=None, tflops=None, error=setup_error, **notes)
            if runner is not None:
                try:
                    ms = median_ms(_timed_call(runner, mode), device, cpu_budget_s)
                    row.update(ms=ms, tflops=case.flops(mode) / (ms * 1e-3) / 1e12)
                except Exception as error:
                    row["error"] = _error_text(error)
            rows.append(row)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.step(f"{case.dtype} {case.label} d={case.head_dim} s={case.seqlen} "
                      f"{'causal' if case.causal else 'full'} {impl.label}")
    return rows


def _decode(out_dir: str) -> None:
    """BENCHMARK.md's decoding row: ``python -m pyflash.bench.decode`` (its options) with defaults."""
    try:
        from pyflash.bench import decode

        decode_parser = argparse.ArgumentParser(add_help=False)
        decode.add_decode_arguments(decode_parser)
        decode_args = decode_parser.parse_args([])
        decode_args.out = out_dir
        print("\ndecoding (sq=1 against a KV cache; python -m pyflash.bench.decode --help for options)")
        decode.run_decode_bench(decode_args)
    except Exception as error:
        print(f"decoding benchmark failed: {_error_text(error)}")


def _construct(name: str):
    try:
        return PEERS[name](), None
    except Exception as error:
        return None, _error_text(error)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    device = args.device
    cases = main_workload(args.dtypes, args.head_dims, args.seqlens, args.causal_values, args.tokens,
                          args.hidden)
    if args.extras:
        cases += extra_rows(args.dtypes, args.causal_values, args.tokens, args.hidden)
    impls = [PyflashImpl()]
    for name in args.peers:
        peer, error = _construct(name)
        if peer is None:
            print(f"peer {name} unavailable ({error}): shown as '-'")
        else:
            impls.append(peer)
    meta = _meta(args, argv, device)
    print(f"pyflash bench on {meta['device']} (backend {meta['backend']}), torch {meta['torch']}, "
          f"triton {meta['triton']}, commit {meta['commit']}")
    unit = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
    if args.ceilings:
        meta["ceilings"] = ceilings(device)
        c = meta["ceilings"]
        print(f"ceilings: matmul {c['mm_shape']} {c['mm_TFLOPs'] * report.UNITS[unit]:.1f} {unit}, "
              f"copy {c['copy_TBps']:.3f} TB/s")
    print(f"{len(cases)} configurations x {len(impls)} implementations, modes {' '.join(args.modes)}")

    progress = report.Progress(len(cases) * len(impls))
    rows: List[dict] = []
    json_path = os.path.join(args.out, "bench.json")
    for index, case in enumerate(cases):
        rows += run_case(case, impls, args.modes, device, index, progress, args.cpu_budget)
        report.write_json(json_path, meta, rows)  # a run cut short keeps what it measured
    report.write_json(json_path, meta, rows)

    labels = [(impl.name, impl.label) for impl in impls]
    print()
    print(report.table(rows, labels, unit))
    print()
    print(report.summary(rows, labels))
    for row in rows:
        diff = row.get("max_abs_diff_vs_pyflash")
        if diff is not None and row["mode"] == "fwd" and diff > AGREEMENT[row["dtype"]]:
            print(f"warning: {row['label']} and pyflash disagree by {diff:.3g} on "
                  f"{row['tag']} d={row['d']} s={row['s']} causal={row['causal']} ({row['dtype']})")
    errors = {(row["impl"], row["error"]) for row in rows if row["error"]}
    for impl, error in sorted(errors):
        print(f"'-' {impl}: {error}")

    print(f"wrote {json_path}")
    if args.plot:
        for path in report.plot(args.out, rows, labels, unit):
            print(f"wrote {path}")
    if args.decode:
        _decode(args.out)
    return {"meta": meta, "rows": rows, "json": json_path}
