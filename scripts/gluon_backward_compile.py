"""Compile the Gluon FlashAttention-3-style backward (pyflash.kernels.gluon_backward) offline for sm_90.

No GPU needed: Triton lowers and assembles for an explicit target (ptxas ships in the wheel). For each
configuration this prints the launch register count, the per-partition register budgets (setmaxnreg),
spills (ptxas -v), shared memory, the wgmma shapes, the TMA reduce count and shared-memory traffic.
Exit status 1 when any configuration fails, spills or outgrows shared memory.

    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py                  # the default configs
    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py --sweep          # + block_m / stages
    PYTHONPATH=src .venv/bin/python scripts/gluon_backward_compile.py --dump /tmp/glb  # keep ttgir / ptx
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

from pyflash.kernels import gluon_backward as gb  # noqa: E402

SM90_MAX_SHARED = 232448  # bytes of shared memory a block may use on H100
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def desc_type(dtype: str, block):
    torch_dtype = torch.float32 if dtype == "fp32" else DTYPES[dtype]
    return f"tensordesc<{dtype}{list(block)},{gb.smem_layout(block, torch_dtype)!r}>"


def signature(head_dim: int, block_m: int, dtype: str):
    """Triton signature of gb._backward_kernel: Gluon TMA descriptors are typed with their shared layout."""
    qd = desc_type(dtype, [1, block_m, head_dim])
    kvd = desc_type(dtype, [1, gb.BLOCK_N, head_dim])
    dqd = desc_type("fp32", [1, block_m, head_dim // 2])
    ptr = "*bf16" if dtype == "bf16" else "*fp16"
    std = desc_type("fp32", [1, 4, block_m])
    sig = dict(q_desc=qd, do_desc=qd, k_desc=kvd, v_desc=kvd, dq_desc=dqd, st_desc=std,
               dk_ptr=ptr, dv_ptr=ptr, seqlen="i32", num_heads="i32", qk_scale="fp32", softmax_scale="fp32")
    sig.update({name: "constexpr" for name in gb._backward_kernel.arg_names if name not in sig})
    return {name: sig[name] for name in gb._backward_kernel.arg_names}


def compile_config(head_dim, causal, block_m, num_stages, dtype="bf16", seqlen_divisible=True, split_mask=False):
    from triton.experimental.gluon._runtime import GluonASTSource

    constexprs = dict(BLOCK_M=block_m, HEAD_DIM=head_dim, NUM_STAGES=num_stages, CAUSAL=causal, SPLIT_MASK=split_mask,
                      CONSUMER_REGS=gb.CONSUMER_REGS, PRODUCER_REGS=gb.PRODUCER_REGS)
    sig = signature(head_dim, block_m, dtype)
    names = list(sig)
    attrs = {(names.index(n), ): [["tt.divisibility", 16]] for n in ("dk_ptr", "dv_ptr")}
    if seqlen_divisible:
        attrs[(names.index("seqlen"), )] = [["tt.divisibility", 16]]
    src = GluonASTSource(gb._backward_kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=gb.MAXNREG))


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
    warnings = [line for line in text.splitlines() if "warning" in line.lower() or "error" in line.lower()]
    return (int(regs.group(1)) if regs else None, int(spill.group(2)) if spill else None,
            int(spill.group(3)) if spill else None, int(spill.group(1)) if spill else None, warnings)


def ptx_facts(ptx: str):
    setmaxnreg = sorted({(m.group(1), int(m.group(2))) for m in
                         re.finditer(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)})
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return dict(setmaxnreg=setmaxnreg, wgmma=wgmma, ex2=ptx.count("ex2.approx"),
                tma_reduce=len(re.findall(r"cp\.reduce\.async\.bulk\.tensor", ptx)),
                shared_ld=len(re.findall(r"\bld\.shared|\bldmatrix", ptx)),
                shared_st=len(re.findall(r"\bst\.shared|\bstmatrix", ptx)),
                bar_sync=len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--sweep", action="store_true", help="also block_m {64, 128} / stages {2, 3}")
    parser.add_argument("--dump", help="directory to write the ttgir and ptx of each config")
    args = parser.parse_args()

    configs = []
    for head_dim, causal, dtype in itertools.product(args.head_dims, (False, True), args.dtypes):
        block_m, stages = gb.default_config(head_dim, causal)
        configs.append((head_dim, causal, dtype, block_m, stages))
        if args.sweep:
            for bm, st in itertools.product((64, 128), (2, 3)):
                if (bm, st) != (block_m, stages):
                    configs.append((head_dim, causal, dtype, bm, st))

    failed = 0
    print(f"triton {triton.__version__}, target sm_90, maxnreg {gb.MAXNREG}, "
          f"worker regs consumer/producer {gb.CONSUMER_REGS}/{gb.PRODUCER_REGS}", flush=True)
    for head_dim, causal, dtype, block_m, stages in configs:
        name = f"d={head_dim} causal={int(causal)} {dtype} BM={block_m} BN={gb.BLOCK_N} stages={stages}"
        try:
            compiled = compile_config(head_dim, causal, block_m, stages, dtype)
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
              f"ex2 {facts['ex2']} tma-reduce {facts['tma_reduce']} smem ld/st {facts['shared_ld']}/"
              f"{facts['shared_st']} bar {facts['bar_sync']}", flush=True)
        for warning in warnings:
            print(f"    ptxas: {warning}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = os.path.join(args.dump, f"gluon_bwd_d{head_dim}_c{int(causal)}_{dtype}_bm{block_m}_s{stages}")
            for ext in ("ttgir", "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(compiled.asm[ext])
    print(f"{len(configs) - failed}/{len(configs)} configs clean", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
