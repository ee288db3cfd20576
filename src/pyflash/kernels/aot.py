"""Ahead-of-time compilation of the Triton kernels for a GPU that need not be present.

Triton lowers and assembles (ptxas ships in the wheel) for an explicit target on a CPU-only
machine, so errors that the interpreter cannot show (lowering type errors, unsupported ops,
shared-memory overflow) and resource usage (registers, spills, shared memory) are visible without
a GPU::

    from pyflash.kernels import aot, forward
    compiled = aot.compile_for_sm90(forward._forward_kernel, dict(HEAD_DIM=128, ...), num_warps=4, num_stages=2)
    compiled.metadata.shared, compiled.asm["ptx"], compiled.asm["cubin"]

Arguments are typed by name (the names the pyflash kernels use); ``arg_types`` overrides any.

This needs a process where Triton was imported with TRITON_INTERPRET off: under the interpreter
``@triton.jit`` makes interpreter functions, Triton's own ``tl`` library included, and none of
them can be compiled. The CPU tests run under the interpreter, so they compile through
``Sm90Compiler``, which runs ``compile_for_sm90`` in a child process.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import traceback
from typing import Dict, Iterable, Optional

# Hopper's shared memory per block (227 KB) in bytes: what a kernel may use on sm_90.
SM90_MAX_SHARED = 232448

# Pointers to q/k/v-typed data (the dtype argument); the other pointers have a fixed type.
DATA_POINTERS = frozenset({"q", "k", "v", "out", "dout", "dq", "dk", "dv", "probs", "Q", "K", "V", "Out", "KData",
                           "VData"})
FIXED_POINTERS = {
    **dict.fromkeys(("softmax_lse", "softmax_d", "dq_accum", "alibi_slopes", "Lse", "OutPartial", "LsePartial",
                     "Alibi"), "*fp32"),
    **dict.fromkeys(("cu_seqlens_q", "cu_seqlens_k", "seqused_k", "Counters", "SeqlensK", "Leftpad", "BatchRows",
                     "BlockTable"), "*i32"),
}
FLOAT_SCALARS = frozenset({"softmax_scale", "qk_scale", "softcap_scale", "dropout_p", "dropout_scale", "scale",
                           "softcap"})
INT64_SCALARS = frozenset({"philox_seed"})


def _aligned_by_default(name: str, ty: str) -> bool:
    """What a typical launch specialises as 16-divisible: torch's pointers, strides and sizes of
    round shapes (as scripts/tune_backward.py's benchmark has them)."""
    return ty.startswith("*") or name.startswith(("stride_", "dense_seqlen")) or name == "num_heads"


def kernel_signature(kernel, constexprs: Dict[str, object], dtype: str = "bf16",
                     arg_types: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Triton's signature of ``kernel``: ``"constexpr"`` for constexprs, then ``arg_types``, then
    the type the name has in pyflash's kernels (``dtype`` for q/k/v-like pointers), else ``"i32"``."""
    arg_types = arg_types or {}
    unknown = (set(constexprs) | set(arg_types)) - set(kernel.arg_names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {sorted(unknown)}")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in arg_types:
            signature[name] = arg_types[name]
        elif name in DATA_POINTERS:
            signature[name] = "*" + dtype
        else:
            signature[name] = FIXED_POINTERS.get(name, "fp32" if name in FLOAT_SCALARS else
                                                 "i64" if name in INT64_SCALARS else "i32")
    return signature


def compile_for_sm90(kernel, constexprs: Dict[str, object], num_warps: Optional[int] = None,
                     num_stages: Optional[int] = None, dtype: str = "bf16",
                     arg_types: Optional[Dict[str, str]] = None, divisible: Optional[Iterable[str]] = None,
                     capability: int = 90):
    """``kernel`` (a JITFunction) compiled for sm_``capability`` (Hopper by default); no GPU needed.

    constexprs: the value of every constexpr parameter without a default (and of any other
    parameter to specialise as a constant, e.g. ``stride_lse_m=1``). dtype: the element type of q/k/v-like pointers
    ("bf16", "fp16", "fp32"). arg_types: explicit types by name, e.g. a TMA descriptor
    ``"tensordesc<bf16[128, 128]>"``. divisible: names of the arguments specialised as multiples of
    16 (default: pointers, strides, dense_seqlen_*, num_heads). num_warps / num_stages: None is
    Triton's default. Returns Triton's CompiledKernel (``.metadata.shared``, ``.asm["ptx"]``, ...);
    raises what the compiler raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret or not hasattr(kernel, "params"):
        raise RuntimeError("Triton runs the interpreter here (TRITON_INTERPRET=1), whose kernels cannot be "
                           "compiled: use aot.Sm90Compiler, which compiles in a child process")
    # Constexpr parameters left out take their defaults, as at a launch.
    constexprs = {**{p.name: p.default for p in kernel.params
                     if p.is_constexpr and p.default is not inspect.Parameter.empty}, **constexprs}
    signature = kernel_signature(kernel, constexprs, dtype, arg_types)
    divisible = None if divisible is None else set(divisible)
    attrs = {}
    for index, (name, ty) in enumerate(signature.items()):
        if ty == "constexpr" or ty.startswith("tensordesc"):
            continue
        if (name in divisible) if divisible is not None else _aligned_by_default(name, ty):
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options)


# The child process: one JSON request a line on stdin, one JSON reply a line on the reply pipe.
# Constexprs that are Triton dtypes travel as {"tl.dtype": "bf16"}.

def _encode_constexprs(constexprs: Dict[str, object]) -> Dict[str, object]:
    return {name: {"tl.dtype": value.name} if type(value).__name__ == "dtype" else value
            for name, value in constexprs.items()}


def _decode_constexprs(constexprs: Dict[str, object]) -> Dict[str, object]:
    import triton.language as tl

    return {name: tl.dtype(value["tl.dtype"]) if isinstance(value, dict) else value
            for name, value in constexprs.items()}


def _serve(requests, replies) -> None:
    import importlib

    for line in requests:
        request = json.loads(line)
        try:
            kernel = getattr(importlib.import_module(request.pop("module")), request.pop("kernel"))
            request["constexprs"] = _decode_constexprs(request["constexprs"])
            compiled = compile_for_sm90(kernel, **request)
            reply = dict(shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                         num_stages=compiled.metadata.num_stages)
        except Exception:  # noqa: BLE001 - the compiler's error is the answer
            reply = dict(error=traceback.format_exc())
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class Sm90Compiler:
    """``compile_for_sm90`` in a child process where TRITON_INTERPRET is off, so that it works
    whatever this process runs (the CPU tests run the interpreter). One child serves every call;
    ``compile`` returns ``{"shared": bytes, "num_warps": ..., "num_stages": ...}`` or raises
    ``RuntimeError`` with the compiler's traceback."""

    def __init__(self):
        self._child = None

    def _start(self):
        import pyflash

        env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        src = os.path.dirname(os.path.dirname(os.path.abspath(pyflash.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
        # Replies on a pipe of their own: whatever the compiler prints to stdout cannot corrupt them.
        read_fd, write_fd = os.pipe()
        self._child = subprocess.Popen(
            [sys.executable, "-c", f"from pyflash.kernels.aot import _serve; import os, sys; "
                                   f"_serve(sys.stdin, os.fdopen({write_fd}, 'w'))"],
            stdin=subprocess.PIPE, env=env, text=True, pass_fds=(write_fd,))
        os.close(write_fd)
        self._replies = os.fdopen(read_fd)

    def compile(self, module: str, kernel: str, constexprs: Dict[str, object], **options) -> Dict[str, int]:
        """Compile ``module.kernel`` (e.g. "pyflash.kernels.forward", "_forward_kernel"); options as
        compile_for_sm90's (num_warps, num_stages, dtype, arg_types, divisible, capability)."""
        if self._child is None or self._child.poll() is not None:
            self._start()
        request = dict(module=module, kernel=kernel, constexprs=_encode_constexprs(constexprs), **options)
        self._child.stdin.write(json.dumps(request) + "\n")
        self._child.stdin.flush()
        line = self._replies.readline()
        if not line:
            code = self._child.wait()
            self._replies.close()
            self._child = None
            raise RuntimeError(f"the compiling child process died (exit code {code}) on {kernel} {constexprs}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{kernel} did not compile for sm_90 with {constexprs} {options}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self._child is not None:
            self._child.stdin.close()
            self._child.wait()
            self._replies.close()
            self._child = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ptxas_stats(ptx: str):
    """ptxas -v (the one in Triton's wheel) on ptx for sm_90a: dict(regs, spill_stores, spill_loads, stack,
    warnings (lines naming a warning or an error), returncode, text)."""
    import re
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(2)) if spill else None,
                spill_loads=int(spill.group(3)) if spill else None,
                stack=int(spill.group(1)) if spill else None,
                warnings=[line for line in text.splitlines() if "warning" in line.lower() or "error" in line.lower()],
                returncode=run.returncode, text=text)
