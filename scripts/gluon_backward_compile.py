"""Compile the Gluon FlashAttention-3-style backward (pyflash.kernels.gluon_backward) offline for sm_90.

No GPU needed: Triton lowers and assembles for an explicit target (ptxas ships in the wheel). For each
configuration this prints the per-partition register budgets (setmaxnreg), spills (ptxas -v), shared
memory, the wgmma shapes, the TMA reduce count and shared-memory traffic. Exit status 1 when any
configuration fails, spills or outgrows shared memory.

    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py                  # default configs
    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py --sweep          # + tuning_candidates
    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py --config 128,2,0,1,1,0   # one Config
    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py --head-dims 64 --config 64,2,0,0,1,0,1,0,2  # dq_own
    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py --dump /tmp/glb  # keep ttgir / ptx
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # interpreter kernels cannot be compiled

from pyflash.kernels import gluon_backward as gb  # noqa: E402


def ptx_facts(ptx: str):
    setmaxnreg = sorted({(m.group(1), int(m.group(2))) for m in
                         re.finditer(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)})
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return dict(setmaxnreg=setmaxnreg, wgmma=wgmma, ex2=ptx.count("ex2.approx"),
                tma_reduce=len(re.findall(r"cp\.reduce\.async\.bulk\.tensor", ptx)),
                shared_ld=len(re.findall(r"\bld\.shared|\bldmatrix", ptx)),
                shared_st=len(re.findall(r"\bst\.shared|\bstmatrix", ptx)),
                bar_sync=len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)))


def run_one(job):
    head_dim, causal, dtype, label, cfg, dump = job
    name = f"d={head_dim} causal={int(causal)} {dtype} {label} {tuple(cfg)}"
    try:
        report = gb.offline_report(head_dim, causal, cfg, dtype)
    except Exception as error:  # noqa: BLE001 - report and go on
        message = str(error).strip().splitlines()
        return False, f"{name}: FAILED to compile: {message[-1] if message else type(error).__name__}"
    ptx = report["ptx"]
    facts = ptx_facts(ptx)
    shared = report["shared"]
    ok = (report["spill_stores"] == 0 and report["spill_loads"] == 0 and shared <= gb.SM90_MAX_SHARED
          and not report["warnings"] and report["ptxas_ok"])
    line = (f"{name}: {'OK ' if ok else 'BAD'} spill st/ld {report['spill_stores']}/{report['spill_loads']} "
            f"stack {report['stack']} shared {shared} B ({shared / 1024:.1f} KiB) setmaxnreg {facts['setmaxnreg']} "
            f"wgmma {facts['wgmma']} ex2 {facts['ex2']} tma-reduce {facts['tma_reduce']} "
            f"smem ld/st {facts['shared_ld']}/{facts['shared_st']} bar {facts['bar_sync']}")
    for warning in report["warnings"]:
        line += f"\n    ptxas: {warning}"
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, f"gluon_bwd_d{head_dim}_c{int(causal)}_{dtype}_{label}")
        with open(f"{stem}.ptx", "w") as f:
            f.write(ptx)
    return ok, line


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    parser.add_argument("--sweep", action="store_true", help="also every tuning_candidates config")
    parser.add_argument("--config", help="one Config as comma-separated fields (block_m,num_stages,split_mask,"
                                         "acc_init,dq_bufs,lpt[,dq_own,dq_early,wgs]) instead of the defaults")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dump", help="directory to write the ptx of each config")
    args = parser.parse_args()

    jobs = []
    for head_dim, causal, dtype in itertools.product(args.head_dims, (False, True), args.dtypes):
        if args.config:
            cfg = gb.Config(*(int(x) for x in args.config.split(",")))
            jobs.append((head_dim, causal, dtype, "given", cfg, args.dump))
            continue
        jobs.append((head_dim, causal, dtype, "default", gb.default_config(head_dim, causal, dtype == "fp16"),
                     args.dump))
        if args.sweep:
            for label, cfg in gb.tuning_candidates(head_dim, causal).items():
                jobs.append((head_dim, causal, dtype, label, cfg, args.dump))

    print(f"target sm_90, maxnreg {gb.MAXNREG}, worker regs consumer/producer {gb.CONSUMER_REGS}/"
          f"{gb.PRODUCER_REGS}; Config fields {gb.Config._fields}", flush=True)
    failed = 0
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for ok, line in pool.map(run_one, jobs):
            failed += not ok
            print(line, flush=True)
    print(f"{len(jobs) - failed}/{len(jobs)} configs clean", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
