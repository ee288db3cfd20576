"""Recorded launches: a kernel launched once through Triton, then replayed without Triton's launch path.

``kernel[grid](*args, **kwargs)`` costs ~100-170 us of host time on the H100's host for the Gluon
kernels (benchmarks/RESULTS.md; SDPA's whole call costs ~20-30 us): Triton binds the ~45 arguments,
specializes each one (type, 16-byte alignment, the value 1), builds a cache key, and the Gluon host
TMA descriptors validate themselves. A caller that knows a key of its own which fixes every argument
but the tensors (``Recorded``'s contract) launches once through Triton (``record``) and then calls
the compiled kernel's launcher directly with the new tensors in the same places (``Recorded.__call__``),
as ``JITFunction.run`` itself does after its cache lookup.

The caller's key must hold every non-tensor argument's value and, for each tensor in a slot, what
Triton specializes on: its dtype and whether its address is 16-byte aligned (host TMA descriptors:
dtype, box, layout, and the shape and strides they carry, which the caller passes again).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

# Recorded launches of the Triton-language kernels (kernels/forward.py, backward.py, decode.py): on
# unless PYFLASH_RECORD_TRITON=0 (tests/gpu/test_recorded_launch_gpu.py checks replays against Triton's
# own launches bit for bit on a GPU; scripts/api_overhead.py --cuda times both). The Gluon kernels'
# recorded launches are always on.
RECORD_TRITON = os.environ.get("PYFLASH_RECORD_TRITON", "1") != "0"
# Replays through the compiled C launcher itself (_Direct): on unless PYFLASH_DIRECT_LAUNCH=0
# (tests/gpu/test_recorded_launch_gpu.py runs both ways: 26 passed on an H100, 2026-12-07; scripts/api_overhead.py
# --cuda times both: mha_fwd 123 -> 97 us, mha_bwd 255 -> 191 us per call there; benchmarks/RESULTS.md).
DIRECT_LAUNCH = os.environ.get("PYFLASH_DIRECT_LAUNCH", "1") != "0"
# Arguments of the launcher before the kernel's own (Triton 3.6's _BASE_ARGS_FORMAT "iiiKKppOOOOOO"): grid
# x, y, z, stream, function, cooperative, PDL, global and profile scratch, packed metadata, launch
# metadata, enter and exit hooks.
_BASE_ARGS = 13


class Plans(dict):
    """Plans (recorded launches) by call key, at most ``limit`` of them: a workload whose shapes keep
    changing (serving many prompt lengths) would otherwise grow the table without end. Past the limit the
    table starts over; the calls after that record again."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def __setitem__(self, key, value) -> None:
        if len(self) >= self.limit and key not in self:
            self.clear()
        super().__setitem__(key, value)


class Descriptor(NamedTuple):
    """What a compiled launcher reads of a host TMA descriptor (Triton's make_tensordesc_arg): built
    without the validation the Gluon / Triton TensorDescriptor classes run on construction, for a
    replay of a launch whose first call passed the validated descriptor of the same shape and strides."""

    base: object
    shape: Sequence[int]
    strides: Sequence[int]
    padding: str = "zero"


class _Direct:
    """A recorded launch laid out for Triton's compiled C launcher, skipping the Python around it
    (CudaLauncher.__call__ and the wrapper that turns each host TMA descriptor into a CUtensorMap on every
    launch, make_tensordesc_arg): the launcher's arguments are built once, and a call writes only its
    tensors and descriptors into their places. A descriptor's CUtensorMap depends only on its address,
    shape, strides and padding (and the slot's box and swizzle), so each slot keeps the last few it
    encoded. ``build`` returns None wherever the launcher is not as Triton 3.6 makes it (then the replay
    goes through ``kernel.run``)."""

    __slots__ = ("launcher", "template", "places", "caches")

    @staticmethod
    def build(kernel, grid, values, slots):
        run = kernel.run
        inner = getattr(run, "launch", None)
        if type(run).__name__ != "CudaLauncher" or inner is None or getattr(run, "num_ctas", 1) != 1:
            return None
        if run.global_scratch_size or run.profile_scratch_size:
            return None  # scratch is allocated per launch
        code = getattr(inner, "__code__", None)
        if code is None:  # no descriptor argument: the wrapper is the C function itself
            launcher, indices, metas = inner, (), ()
        else:
            cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in inner.__closure__ or ())))
            if not {"launcher", "tensordesc_indices", "tensordesc_meta"} <= cells.keys():
                return None
            launcher, indices = cells["launcher"], sorted(cells["tensordesc_indices"])
            metas = cells["tensordesc_meta"]
            if any(meta is None for meta in metas) or len(metas) != len(indices):
                return None
        from triton.backends.nvidia.driver import make_tensordesc_arg

        direct = _Direct()
        direct.launcher = launcher
        meta_of = dict(zip(indices, metas))
        template = [grid[0], grid[1], grid[2], None, kernel.function, run.launch_cooperative_grid, run.launch_pdl,
                    None, None, kernel.packed_metadata, None, None, None]
        places = {}
        for index, value in enumerate(values):
            if index in meta_of:
                if index not in slots:
                    return None  # every descriptor of a recorded launch is one of its slots
                # make_tensordesc_arg: the CUtensorMap, then the shape and strides (the box's rank each).
                width = 1 + 2 * len(meta_of[index]["block_size"])
                places[index] = (len(template), width, meta_of[index], make_tensordesc_arg)
                template.extend([None] * width)
            else:
                if index in slots:
                    places[index] = (len(template), 0, None, None)
                template.append(value)
        direct.template = template
        direct.places = tuple(places[slot] for slot in slots)
        direct.caches = tuple({} for _ in slots)
        return direct

    def __call__(self, stream, tensors) -> None:
        args = self.template.copy()
        args[3] = stream
        for (place, width, meta, encode), cache, value in zip(self.places, self.caches, tensors):
            if not width:
                args[place] = value
                continue
            # Triton's TensorDescriptor keeps its shape and strides as lists: the key takes tuples.
            key = (value.base.data_ptr(), tuple(value.shape), tuple(value.strides), value.padding)
            encoded = cache.get(key)
            if encoded is None:
                if len(cache) >= 8:
                    cache.clear()
                encoded = cache[key] = encode(value, meta)
            args[place:place + width] = encoded
        self.launcher(*args)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook (a HookChain in Triton 3.6, None or a function before) has anything to
    call: the direct launch passes no hooks and no launch metadata, as the C launcher then skips them."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Recorded:
    """One launch of a compiled kernel (``record``), replayed with other tensors in ``slots``."""

    __slots__ = ("kernel", "grid", "values", "slots", "direct")

    def __init__(self, kernel, grid, values, slots):
        self.kernel, self.grid, self.slots = kernel, grid, tuple(slots)
        self.values = list(values)
        for slot in self.slots:
            self.values[slot] = None  # a recorded launch keeps no tensor alive
        self.direct = None  # _Direct.build's answer once asked; False: not buildable

    def __call__(self, *tensors) -> None:
        from triton import knobs

        runtime = knobs.runtime
        if DIRECT_LAUNCH and not (_hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)):
            if self.direct is None:
                self.direct = _Direct.build(self.kernel, self.grid, self.values, self.slots) or False
            if self.direct:
                self.direct(current_stream(), tensors)
                return
        values = self.values.copy()
        for slot, tensor in zip(self.slots, tensors):
            values[slot] = tensor
        stream = current_stream()
        kernel, grid = self.kernel, self.grid
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *values), knobs.runtime.launch_enter_hook,
                   knobs.runtime.launch_exit_hook, *values)


def record(fn, grid, args, kwargs, slots):
    """Launch ``fn[grid](*args, **kwargs)`` through Triton and return the launch as a ``Recorded``
    (None where Triton returned no compiled kernel, as under the interpreter). kwargs: constexpr
    parameters and launch options (num_warps, maxnreg, ...)."""
    kernel = fn[grid](*args, **kwargs)
    if kernel is None or not hasattr(kernel, "packed_metadata"):
        return None
    values = list(args)
    for index in range(len(args), len(fn.arg_names)):
        name = fn.arg_names[index]
        values.append(kwargs[name] if name in kwargs else fn.params[index].default)
    return Recorded(kernel, tuple(grid) + (1,) * (3 - len(grid)), values, slots)


class Launch(NamedTuple):
    """A recorded launch of a plan and, per slot, where a call's argument comes from: the name of one of
    its tensors (``named``), or ("desc", name, shape, strides): a TMA descriptor over it."""

    recorded: Recorded
    sources: tuple

    def __call__(self, named) -> None:
        self.recorded(*(named[source] if isinstance(source, str) else Descriptor(named[source[1]], *source[2:])
                        for source in self.sources))


def launch_into(launches, fn, grid, args, kwargs, sources) -> None:
    """fn[grid](*args, **kwargs); with a list ``launches`` (a plan being recorded) the launch is recorded
    into it as a Launch with sources {argument position: source} (None where nothing was recorded)."""
    if launches is None:
        fn[grid](*args, **kwargs)
        return
    recorded = record(fn, grid, args, kwargs, slots=tuple(sources))
    # Descriptor sources with tuple shapes and strides (hashable: _Direct's cache keys take them as they are).
    sources = tuple(source if isinstance(source, str) else (*source[:2], tuple(source[2]), tuple(source[3]))
                    for source in sources.values())
    launches.append(None if recorded is None else Launch(recorded, sources))


_MISSING = object()


def replay_or_record(plans, key, named, supported, run) -> bool:
    """The recorded-launch entry of a kernel that handles only some calls (the Gluon kernels' try_forward,
    try_backward): a key with a plan replays it with this call's tensors (``plan(named)``); a key supported()
    rejected before is rejected again without asking (plans[key] is None); a new key asks ``supported()``
    and, where it accepts, ``run()``s the call and keeps the plan run returns (None: nothing recorded, the
    key's next call runs again). True where the call ran here."""
    plan = plans.get(key, _MISSING)
    if plan is None:
        return False
    if plan is not _MISSING:
        plan(named)
        return True
    if not supported():
        plans[key] = None
        return False
    plan = run()
    if plan is not None:
        plans[key] = plan
    return True


def optional_tensors(params, seqlens, stand_in):
    """A call's optional tensors by the names plan sources (Launch) use: ALiBi slopes, the varlen
    offsets and seqused_k, each ``stand_in`` (never read: its kernel switch is off) where absent."""
    varlen = seqlens.is_varlen
    return dict(alibi=params.alibi_slopes if params.alibi_slopes is not None else stand_in,
                cu_q=seqlens.cu_seqlens_q if varlen else stand_in,
                cu_k=seqlens.cu_seqlens_k if varlen else stand_in,
                seqused_k=seqlens.seqused_k if varlen and seqlens.seqused_k is not None else stand_in)


def describe(t):
    """What a recorded launch's key holds of a tensor: all but its address, of which the 16-byte alignment."""
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16


def call_key(tensors, params, seqlens, *extra):
    """A key of an attention call (AttentionParams, Seqlens) for recorded launches: everything a kernel
    entry reads of it but its tensors' addresses, of which only the 16-byte alignment counts (TMA,
    Triton's specialization), plus ``extra`` (the current device, flags of the entry)."""
    return (tuple(describe(t) for t in tensors), params.softmax_scale, params.window_left, params.window_right,
            params.softcap, params.dropout_p, params.alibi_slopes is None, seqlens.batch_size, seqlens.max_seqlen_q,
            seqlens.max_seqlen_k, seqlens.is_varlen, seqlens.seqused_k is None, *extra)


def current_device():
    """Triton's current device (the one its compiled kernels are loaded on)."""
    from triton.runtime.driver import driver

    return driver.active.get_current_device()


def current_stream():
    """The stream Triton launches on: its current device's current stream."""
    from triton.runtime.driver import driver

    active = driver.active
    return active.get_current_stream(active.get_current_device())
