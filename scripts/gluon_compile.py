"""Compile the Gluon FlashAttention-3-style forward (pyflash.kernels.gluon_forward) offline for sm_90.

No GPU needed: Triton lowers and assembles for an explicit target (ptxas ships in the wheel). For each
configuration this prints the launch register count, the per-partition register budgets (setmaxnreg),
spills (ptxas -v), shared memory, the wgmma shapes and whether the P operand conversion or anything
else in the main loop goes through shared memory. Exit status 1 when any configuration fails,
spills or outgrows shared memory.

    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py                  # the default configs
    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py --sweep          # + other BLOCK_N / stages
    PYTHONPATH=src .venv/bin/python scripts/gluon_compile.py --dump /tmp/gl   # keep ttgir / ptx
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # interpreter kernels cannot be compiled

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from pyflash.kernels import gluon_forward as gf  # noqa: E402

SM90_MAX_SHARED = 232448  # bytes of shared memory a block may use on H100
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def signature(head_dim: int, block_n: int, dtype: str):
    """Triton signature of gf._forward_kernel: Gluon TMA descriptors are typed with their shared layout."""
    torch_dtype = DTYPES[dtype]
    q_block, kv_block = [1, gf.WG_M, head_dim], [1, block_n, head_dim]
    q_ty = f"tensordesc<{dtype}{q_block},{gf.smem_layout(q_block, torch_dtype)!r}>"
    kv_ty = f"tensordesc<{dtype}{kv_block},{gf.smem_layout(kv_block, torch_dtype)!r}>"
    sig = dict(q_desc=q_ty, k_desc=kv_ty, v_desc=kv_ty, o_desc=q_ty, lse_ptr="*fp32", seqlen="i32", num_heads="i32",
               qk_scale="fp32", softmax_scale="fp32")
    missing = set(gf._forward_kernel.arg_names) - set(sig)
    sig.update({name: "constexpr" for name in gf._forward_kernel.arg_names if name in missing})
    return {name: sig[name] for name in gf._forward_kernel.arg_names}


def compile_config(head_dim, causal, block_n, num_stages, pingpong=True, dtype="bf16", seqlen_divisible=True):
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(BLOCK_N=block_n, HEAD_DIM=head_dim, NUM_STAGES=num_stages, CAUSAL=causal, PINGPONG=pingpong,
                      CONSUMER_REGS=gf.CONSUMER_REGS, PRODUCER_REGS=gf.PRODUCER_REGS)
    sig = signature(head_dim, block_n, dtype)
    names = list(sig)
    attrs = {(names.index("lse_ptr"), ): [["tt.divisibility", 16]]}
    if seqlen_divisible:
        attrs[(names.index("seqlen"), )] = [["tt.divisibility", 16]]
    src = GluonASTSource(gf._forward_kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=gf.MAXNREG))


def ptxas_report(ptx: str):
    """(registers, spill stores, spill loads, stack bytes, warnings) from ptxas -v on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([os.path.join(NVIDIA_BIN, "ptxas"), "-arch=sm_90a", "-v", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    warnings = [line for line in text.splitlines() if "warning" in line.lower()]
    return (int(regs.group(1)) if regs else None, int(spill.group(2)) if spill else None,
            int(spill.group(3)) if spill else None, int(spill.group(1)) if spill else None, warnings)


def ptx_facts(ptx: str):
    setmaxnreg = sorted({(m.group(1), int(m.group(2))) for m in
                         re.finditer(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)})
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return dict(setmaxnreg=setmaxnreg, wgmma=wgmma, ex2=ptx.count("ex2.approx"),
                shared_ld=len(re.findall(r"\bld\.shared|\bldmatrix", ptx)),
                shared_st=len(re.findall(r"\bst\.shared|\bstmatrix", ptx)),
                bar_sync=len(re.findall(r"\bbar\.sync", ptx)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--sweep", action="store_true",
                        help="also BLOCK_N {64, 128} / stages {2, 3} / pingpong off (TMA boxes: powers of 2)")
    parser.add_argument("--dump", help="directory to write the ttgir and ptx of each config")
    args = parser.parse_args()

    configs = []
    for head_dim, causal, dtype in itertools.product(args.head_dims, (False, True), args.dtypes):
        block_n, stages = gf.default_config(head_dim, causal)
        configs.append((head_dim, causal, dtype, block_n, stages, True))
        if args.sweep:
            for bn, st, pp in itertools.product((64, 128) if head_dim <= 128 else (64, 128), (2, 3),
                                                (True, False)):
                if (bn, st, pp) != (block_n, stages, True):
                    configs.append((head_dim, causal, dtype, bn, st, pp))

    failed = 0
    print(f"triton {triton.__version__}, target sm_90, maxnreg {gf.MAXNREG}, "
          f"worker regs consumer/producer {gf.CONSUMER_REGS}/{gf.PRODUCER_REGS}", flush=True)
    for head_dim, causal, dtype, block_n, stages, pingpong in configs:
        name = f"d={head_dim} causal={int(causal)} {dtype} BN={block_n} stages={stages} pingpong={int(pingpong)}"
        try:
            compiled = compile_config(head_dim, causal, block_n, stages, pingpong, dtype)
        except Exception as error:  # noqa: BLE001 - report and go on
            failed += 1
            message = str(error).strip().splitlines()
            print(f"{name}: FAILED to compile: {message[-1] if message else type(error).__name__}", flush=True)
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
            continue
        ptx = compiled.asm["ptx"]
        regs, spill_st, spill_ld, stack, warnings = ptxas_report(ptx)
        facts = ptx_facts(ptx)
        shared = compiled.metadata.shared
        ok = spill_st == 0 and spill_ld == 0 and shared <= SM90_MAX_SHARED and not warnings
        failed += not ok
        print(f"{name}: {'OK ' if ok else 'BAD'} regs {regs} spill st/ld {spill_st}/{spill_ld} stack {stack} "
              f"shared {shared} B ({shared / 1024:.1f} KiB) setmaxnreg {facts['setmaxnreg']} wgmma {facts['wgmma']} "
              f"ex2 {facts['ex2']} smem ld/st {facts['shared_ld']}/{facts['shared_st']} bar.sync {facts['bar_sync']}",
              flush=True)
        for warning in warnings:
            print(f"    ptxas: {warning}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = os.path.join(args.dump, f"gluon_fwd_d{head_dim}_c{int(causal)}_{dtype}_bn{block_n}_s{stages}"
                                           f"_pp{int(pingpong)}")
            for ext in ("ttgir", "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(compiled.asm[ext])
    print(f"{len(configs) - failed}/{len(configs)} configs clean", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
