"""A lighter launch path for Triton and Gluon kernels (opt-in: PYFLASH_FAST_LAUNCH=1).

``kernel[grid](*args, **kwargs)`` spends most of pyflash's host time per call (benchmarks/RESULTS.md:
~170 us for the Gluon forward on the H100's host, SDPA's whole call ~30 us): Triton binds the
arguments, specializes each one (type, 16-byte alignment, the value 1), builds a cache key and only
then reaches the compiled kernel's launcher. ``FastLaunch`` keeps the compiled kernel per key of its
own, cheaper to compute and never coarser than Triton's (``arg_key``: equal keys mean equal
specializations; tests/test_kernel_common.py checks this against Triton's own specializer), and calls
the launcher directly with the arguments in parameter order, as ``JITFunction.run`` does. The first
call of each key goes through Triton (compiling if needed).

Not yet timed on a GPU, hence off by default.
"""
from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("PYFLASH_FAST_LAUNCH", "0") == "1"


def arg_key(value, constexpr: bool):
    """What Triton's specialization of ``value`` depends on (or more). A constexpr is keyed by value."""
    if constexpr or value is None:
        return value
    kind = type(value)
    if kind is bool:
        return (bool, value)
    if kind is int:
        return (int, value == 1, value % 16 == 0, -(1 << 31) <= value < (1 << 31), 0 <= value < (1 << 32))
    if kind is float:
        return (float,)
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, value.dtype, value.data_ptr() % 16 == 0)
    block_shape = getattr(value, "block_shape", None)
    if block_shape is not None:  # a host TMA descriptor: typed by dtype, box and (Gluon) shared layout
        return (kind, value.base.dtype, tuple(block_shape), getattr(value, "layout", None),
                getattr(value, "padding", None))
    return (kind, value)  # anything else keys by value (must be hashable)


class FastLaunch:
    """``FastLaunch(jit_fn)[grid](*args, **kwargs)``: the same launch as ``jit_fn[grid](...)``."""

    def __init__(self, fn):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.constexpr = [param.is_constexpr for param in fn.params]
        self.defaults = [param.default for param in fn.params]
        self.kernels = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        values = list(args)
        for index in range(len(args), len(self.names)):
            name = self.names[index]
            values.append(kwargs[name] if name in kwargs else self.defaults[index])
        options = tuple(sorted((name, value) for name, value in kwargs.items() if name not in self.names))
        key = (tuple(arg_key(value, constexpr) for value, constexpr in zip(values, self.constexpr)), options)
        kernel = self.kernels.get(key)
        if kernel is None:
            self.kernels[key] = self.fn[grid](*args, **kwargs)
            return
        from triton import knobs

        stream = current_stream()
        grid = tuple(grid) + (1, 1)
        metadata = kernel.launch_metadata(grid[:3], stream, *values)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, metadata,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)


def current_stream():
    """The stream Triton would launch on (its driver's current device and stream)."""
    from triton.runtime.driver import driver

    return driver.active.get_current_stream(driver.active.get_current_device())


_FAST = {}


def launcher(fn):
    """``fn`` itself, or (PYFLASH_FAST_LAUNCH=1) the one FastLaunch over it: ``launcher(fn)[grid](...)``.
    Under the interpreter (kernels are InterpretedFunctions, no compiled launcher) always ``fn``."""
    if not ENABLED or not hasattr(fn, "params"):
        return fn
    fast = _FAST.get(fn)
    if fast is None:
        fast = _FAST[fn] = FastLaunch(fn)
    return fast
