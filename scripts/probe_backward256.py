"""Where the d=256 Gluon backward (gluon_backward's split_d layout) spends its time: one H100/H200 call.

    PYTHONPATH=src python3 scripts/probe_backward256.py [--seqlens 4096] [--variants default st1 ...]

Times backward_gluon (bf16, batch * seqlen = 16384, 8 heads of 256, triton.testing.do_bench median)
for Config variants of the split_d kernel and for diagnostic copies of the module with one stage
removed (loaded from the module's source with one line replaced, so the product code carries no
diagnostic switches):

* default, st1 (one Q stage), st1-dq2 (one Q stage, two dQ staging buffers a warpgroup), acc (acc_init),
  rot / acc-rot (rotate: the CTAs running at once add into different dQ tiles); d128 / d128-rot: the
  d=128 kernel's default (non-causal) config without / with rotate
* noreduce: the dQ TMA reduce-adds skipped (the dQ GEMMs and shared-memory stores stay): what dQ's
  traffic into the fp32 accumulator costs;
* nodq: the dQ GEMMs, stores and reduces skipped: what all of dQ costs.
* hybrid: Config(with_dq=False) for dK / dV, then the Triton dQ kernel alone for dQ (deterministic; its
  gradients are compared with the default's like every row).
The diagnostic rows compute wrong gradients by construction: only their times mean anything.
--kernel-times instead prints each kernel's GPU time (torch.profiler) in the Triton kernels' backward and
in the default one: the Triton dQ kernel's share sizes a "split_d without dQ + separate dQ pass" design.
"""
import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from pyflash.kernels import gluon_backward as gb  # noqa: E402

REDUCE_LINE = "        _tma_reduce_add(dq_desc, [batch, m0, col], dq_buf)\n"


def patched_module(name, replacements):
    """A copy of kernels/gluon_backward.py with source lines replaced (each must occur)."""
    src = open(gb.__file__).read()
    for old, new in replacements:
        assert old in src, old
        src = src.replace(old, new)
    path = os.path.join("/tmp", f"gluon_backward_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"gluon_backward_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants():
    sd = dict(split_d=True)
    return {
        "default": (gb, None),
        "sd": (gb, gb.Config(**sd)),
        "acc": (gb, gb.Config(acc_init=True, **sd)),
        "rot": (gb, gb.Config(rotate=True, **sd)),
        "acc-rot": (gb, gb.Config(acc_init=True, rotate=True, **sd)),
        "lpt": (gb, gb.Config(lpt=True, **sd)),
        "hybrid": ("hybrid", gb.Config(split_d=True, rotate=True, with_dq=False)),
        "hybrid-plain": ("hybrid", gb.Config(split_d=True, with_dq=False)),
        "hybrid-acc": ("hybrid", gb.Config(split_d=True, acc_init=True, with_dq=False)),
        "hybrid-acc-rot": ("hybrid", gb.Config(split_d=True, acc_init=True, rotate=True, with_dq=False)),
        "hybrid-lpt": ("hybrid", gb.Config(split_d=True, lpt=True, with_dq=False)),
        "hybrid-acc-lpt": ("hybrid", gb.Config(split_d=True, acc_init=True, lpt=True, with_dq=False)),
        "hybrid-st1": ("hybrid", gb.Config(split_d=True, num_stages=1, with_dq=False)),
        # the dQ pass on a second stream, concurrent with the dK / dV kernel (its own delta)
        "hybrid-2s": ("hybrid2s", gb.Config(split_d=True, with_dq=False)),
        "hybrid-2s-acc-rot": ("hybrid2s", gb.Config(split_d=True, acc_init=True, rotate=True, with_dq=False)),
        "acc-lpt": (gb, gb.Config(acc_init=True, lpt=True, **sd)),
        "d128": (gb, gb.Config(acc_init=True)),
        "d128-rot": (gb, gb.Config(acc_init=True, rotate=True)),
        "st1": (gb, gb.Config(num_stages=1, **sd)),
        "st1-dq2": (gb, gb.Config(num_stages=1, dq_bufs=2, **sd)),
        "noreduce": (lambda: patched_module("noreduce", [(REDUCE_LINE, "        pass\n")]), None),
        "nodq": (lambda: patched_module("nodq", [
            ("            _dq_reduce(dq, dq_smem, WG * DQ_BUFS + (t * DQ_PARTS) % DQ_BUFS, dq_desc, batch, m0, dq_col,\n"
             "                       DQ_BUFS - 1)\n", ""),
            ("            for part in gl.static_range(1, DQ_PARTS):\n                dq_tok = warpgroup_mma(ds_w.permute((1, 0)), k_half.slice(part",
             "            for part in gl.static_range(1, 1):\n                dq_tok = warpgroup_mma(ds_w.permute((1, 0)), k_half.slice(part"),
        ]), None),
    }


def main():
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096])
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(variants()))
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    parser.add_argument("--kernel-times", action="store_true",
                        help="instead: GPU time of each kernel of the Triton and the Gluon backward (torch.profiler)")
    args = parser.parse_args()
    table = variants()
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    if args.kernel_times:
        for dtype in args.dtypes:
            for seqlen in args.seqlens:
                for causal in map(bool, args.causal):
                    kernel_times(seqlen, causal, dtype)
        return
    for dtype in args.dtypes:
        for seqlen in args.seqlens:
            for causal in map(bool, args.causal):
                for head_dim in (256, 128):
                    names = [n for n in args.variants if n.startswith("d128") == (head_dim == 128)]
                    if names:
                        probe(seqlen, causal, head_dim, names, table, dtype)


def kernel_times(seqlen, causal, dtype_name, calls=10):
    """Mean GPU time per call of each kernel the d=256 backward launches, through the Triton kernels
    (delta, dK/dV, dQ: what a split_d-without-dQ + separate dQ pass would reuse) and the default path."""
    import torch

    from gluon_backward_check import bench_inputs
    from pyflash.kernels.backward import backward
    from pyflash.params import AttentionParams, Seqlens
    from two_pass_check import profile_kernels

    flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, 256, causal, dtype_name)
    params = AttentionParams(scale, -1, 0 if causal else -1)
    seqlens = Seqlens(q.shape[0], seqlen, seqlen)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    softmax_d = torch.empty_like(lse)
    for kernel in ("triton", None):
        def run(kernel=kernel):
            backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_d, params, seqlens, False, kernel=kernel)
        profile_kernels(f"{dtype_name} d=256 s={seqlen} causal={int(causal)} {kernel or 'default':7s}", run, calls)


def hybrid(dout, q, k, v, out, lse, scale, causal, grads, config, side_stream=False):
    """The call of a "split_d without dQ + dQ pass" backward: dK, dV (and softmax_d) from the Gluon kernel
    with with_dq=False, then dQ from the Triton dQ kernel alone (kernels/backward.backward(dq_only=True):
    a fixed order, so the pair is deterministic)."""
    import torch

    from pyflash.kernels.backward import backward
    from pyflash.params import AttentionParams, Seqlens

    params = AttentionParams(scale, -1, 0 if causal else -1)
    seqlens = Seqlens(q.shape[0], q.shape[1], k.shape[1])
    softmax_d = torch.empty_like(lse)
    side_delta = torch.empty_like(lse)
    side = torch.cuda.Stream()

    def run():
        if side_stream:
            # side_stream: the dQ pass (computing its own delta) runs beside the dK / dV kernel, so that
            # each fills the other's tail.
            side.wait_stream(torch.cuda.current_stream())
            gb.backward(dout, q, k, v, out, lse, *grads, softmax_d, params, seqlens, config)
            with torch.cuda.stream(side):
                backward(dout, q, k, v, out, lse, *grads, side_delta, params, seqlens, True, kernel="triton",
                         dq_only=True)
            torch.cuda.current_stream().wait_stream(side)
            return
        gb.backward(dout, q, k, v, out, lse, *grads, softmax_d, params, seqlens, config)
        backward(dout, q, k, v, out, lse, *grads, softmax_d, params, seqlens, True, kernel="triton", dq_only=True,
                 delta_ready=True)
    return run


def probe(seqlen, causal, head_dim, names, table, dtype_name="bf16"):
    import torch
    import triton.testing

    from gluon_backward_check import bench_inputs

    flops, q, k, v, dout, out, lse, scale = bench_inputs(seqlen, head_dim, causal, dtype_name)
    grads = tuple(torch.empty_like(q) for _ in range(3))
    accum = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    reference = None
    for name in names:
        module, config = table[name]
        try:
            if module in ("hybrid", "hybrid2s"):
                fn = hybrid(dout, q, k, v, out, lse, scale, causal, grads, config, module == "hybrid2s")
            else:
                module = module() if callable(module) else module
                fn = lambda: module.backward_gluon(dout, q, k, v, out, lse, scale, causal,  # noqa: E731
                                                   dq=grads[0], dk=grads[1], dv=grads[2], dq_accum=accum,
                                                   config=config)
            fn()
            torch.cuda.synchronize()
            if reference is None:
                reference = tuple(g.clone() for g in grads)
            diff = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, reference))
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"PROBE {dtype_name} d={head_dim} s={seqlen} causal={int(causal)} {name:10s} {ms:8.3f} ms "
                  f"{flops / ms * 1e-9:7.1f} TFLOP/s  max|diff| vs first {diff:.1e}", flush=True)
        except Exception as error:  # noqa: BLE001 - one variant failing must not hide the others
            print(f"PROBE {dtype_name} d={head_dim} s={seqlen} causal={int(causal)} {name:10s} ERROR {type(error).__name__}: "
                  f"{str(error).strip().splitlines()[0][:300]}", flush=True)


if __name__ == "__main__":
    main()
