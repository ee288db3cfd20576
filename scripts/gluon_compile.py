"""Compile the Gluon FlashAttention-3-style forward (pyflash.kernels.gluon_forward) offline for sm_90.

No GPU needed: Triton lowers and assembles for an explicit target (ptxas ships in the wheel). For each
configuration this prints the launch register count, the per-partition register budgets (setmaxnreg),
spills (ptxas -v), shared memory, the wgmma shapes and whether anything in the main loop goes through
shared memory. Exit status 1 when any configuration fails, spills or outgrows shared memory.

    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py                  # defaults x feature switches
    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py --features none  # defaults, plain and causal
    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py --sweep          # + the tuning candidates
    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py --candidates '*-ps'  # those candidates x every feature
    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py --dump /tmp/gl   # keep ttgir / ptx
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # interpreter kernels cannot be compiled

import triton  # noqa: E402

from pyflash.kernels import gluon_forward as gf  # noqa: E402

# Feature switch sets: (name, dict of compile_sm90 flags).
FEATURES = {
    "plain": dict(),
    "causal": dict(has_right=True),
    "window": dict(has_left=True, has_right=True),
    "left": dict(has_left=True),
    "softcap": dict(softcap=True),
    "alibi": dict(alibi=True),
    "causal+softcap+alibi": dict(has_right=True, softcap=True, alibi=True),
    "all": dict(has_left=True, has_right=True, softcap=True, alibi=True),
}


def ptx_facts(ptx: str):
    setmaxnreg = sorted({(m.group(1), int(m.group(2))) for m in
                         re.finditer(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)})
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return dict(setmaxnreg=setmaxnreg, wgmma=wgmma, ex2=ptx.count("ex2.approx"),
                shared_ld=len(re.findall(r"\bld\.shared|\bldmatrix", ptx)),
                shared_st=len(re.findall(r"\bst\.shared|\bstmatrix", ptx)),
                bar_sync=len(re.findall(r"\bbar\.sync", ptx)))


def check(head_dim, cfg, features, dtype="bf16", dump=None, verbose=True):
    """Compile one config; returns (ok, line)."""
    flags = FEATURES[features]
    name = (f"d={head_dim} {features:<20} {dtype} BN={cfg.block_n} stages={cfg.num_stages} wg={cfg.num_wg} "
            f"pp={int(cfg.pingpong)} ps={int(gf.persistent_launch(cfg, flags.get('has_left', False), flags.get('softcap', False), flags.get('alibi', False)))}")
    start = time.time()
    try:
        compiled = gf.compile_sm90(head_dim, cfg, dtype, **flags)
    except Exception as error:  # noqa: BLE001 - report and go on
        message = [line for line in str(error).strip().splitlines() if line.strip()]
        if os.environ.get("VERBOSE"):
            traceback.print_exc()
        return False, f"{name}: FAILED to compile: {message[-1] if message else type(error).__name__}"
    ptx = compiled.asm["ptx"]
    stats = gf.ptxas_stats(ptx)
    facts = ptx_facts(ptx)
    shared = compiled.metadata.shared
    ok = (stats["returncode"] == 0 and stats["spill_stores"] == 0 and stats["spill_loads"] == 0
          and shared <= gf.SM90_MAX_SHARED and not stats["warnings"])
    line = (f"{name}: {'OK ' if ok else 'BAD'} regs {stats['regs']} spill st/ld {stats['spill_stores']}/"
            f"{stats['spill_loads']} shared {shared} B ({shared / 1024:.1f} KiB) setmaxnreg {facts['setmaxnreg']} "
            f"wgmma {facts['wgmma']} ex2 {facts['ex2']} smem ld/st {facts['shared_ld']}/{facts['shared_st']} "
            f"[{time.time() - start:.1f}s]")
    for warning in stats["warnings"]:
        line += f"\n    ptxas: {warning}"
    if dump:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, f"gluon_fwd_d{head_dim}_{features.replace('+', '_')}_{dtype}_bn{cfg.block_n}"
                                  f"_s{cfg.num_stages}_wg{cfg.num_wg}_pp{int(cfg.pingpong)}_ps{int(cfg.persistent)}")
        for ext in ("ttgir", "ptx"):
            with open(f"{stem}.{ext}", "w") as f:
                f.write(compiled.asm[ext])
    return ok, line


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    parser.add_argument("--features", nargs="+", default=list(FEATURES),
                        help=f"feature sets ({', '.join(FEATURES)}) or 'none' for plain + causal only")
    parser.add_argument("--sweep", action="store_true", help="also the tuning candidates (plain and causal)")
    parser.add_argument("--candidates", nargs="+", metavar="PATTERN",
                        help="only the tuning candidates whose label (gluon_forward.config_label, e.g. "
                             "bn128-st2-wg2-ps) matches one of these shell patterns ('default': default_config), "
                             "each with every --features set")
    parser.add_argument("--dump", help="directory to write the ttgir and ptx of each config")
    args = parser.parse_args()
    features = ["plain", "causal"] if args.features == ["none"] else args.features

    jobs = []
    for head_dim in args.head_dims:
        for dtype in args.dtypes:
            if args.candidates:
                configs = [gf.default_config(head_dim, False), gf.default_config(head_dim, True)]
                labelled = [("default", cfg) for cfg in dict.fromkeys(configs)]
                labelled += [(gf.config_label(cfg), cfg) for cfg in gf.tuning_candidates(head_dim)]
                for label, cfg in labelled:
                    if any(fnmatch.fnmatchcase(label, pattern) for pattern in args.candidates):
                        jobs += [(head_dim, cfg, feature, dtype) for feature in features]
                continue
            for feature in features:
                cfg = gf.default_config(head_dim, feature == "causal")
                jobs.append((head_dim, cfg, feature, dtype))
            if args.sweep:
                for cfg in gf.tuning_candidates(head_dim):
                    for feature in ("plain", "causal"):
                        jobs.append((head_dim, cfg, feature, dtype))

    print(f"triton {triton.__version__}, target sm_90, register budgets (maxnreg, consumer, producer): "
          f"2 wg {gf.register_budget(2)}, 3 wg {gf.register_budget(3)}", flush=True)
    failed = 0
    for head_dim, cfg, feature, dtype in jobs:
        ok, line = check(head_dim, cfg, feature, dtype, args.dump)
        failed += not ok
        print(line, flush=True)
    print(f"{len(jobs) - failed}/{len(jobs)} configs clean", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
