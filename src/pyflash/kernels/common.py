"""Rules shared by the Triton kernels, mirroring ``pyflash.masks`` and ``pyflash.philox``."""
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

# Under the interpreter tl.dot on bf16 operands returns garbage: kernels upcast when this is set.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_descriptor_reduce():
    """Triton 3.6's interpreter has descriptor loads and stores but no reduce (``desc.atomic_add``: the
    backward's DQ_TMA): add it, as the masked atomic add over the box's pointers that the TMA reduce is."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduce {kind} under the interpreter")
        ptrs, mask = desc.materialize_pointers(indices)
        op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
        self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, None)

    builder.create_descriptor_reduce = create_descriptor_reduce


if INTERPRET:
    _interpreter_descriptor_reduce()

_CAPABILITIES = {}


def device_capability(device: torch.device):
    """torch.cuda.get_device_capability, remembered per device: it costs microseconds per call, and
    every launch asks (the tuning tables are keyed by it)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _CAPABILITIES.get(index)
    if found is None:
        found = _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return found


_MULTIPROCESSORS = {}


def multiprocessor_count(device: torch.device) -> int:
    """The device's streaming multiprocessors, remembered per device like device_capability."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _MULTIPROCESSORS.get(index)
    if found is None:
        found = _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return found


def cdiv(a: int, b: int) -> int:
    """triton.cdiv for the host code: Triton's own is a constexpr function, ~2 us a call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for the host code (the same values), without its call overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def tuned_generation(major: int, generations) -> int:
    """The generation whose rows of a tuning table serve a GPU of compute capability ``major``: the
    newest of ``generations`` (sorted) at or below it, the oldest for older GPUs; 0 (interpreter) stays 0."""
    if major == 0:
        return 0
    return max([m for m in generations if m <= major] or [generations[0]])


def smaller_configs(blocks, num_warps: int, num_stages: int):
    """``(blocks, num_warps, num_stages)`` first, then ever smaller shared-memory footprints: fewer
    pipeline stages, then the largest block halved (down to 16) at one stage. ``blocks``: a tuple of
    block sizes (the tiles a kernel keeps in shared memory scale with them)."""
    configs = [(tuple(blocks), num_warps, stages) for stages in range(num_stages, 0, -1)]
    blocks = list(blocks)
    while max(blocks) > 16:
        largest = blocks.index(max(blocks))
        blocks[largest] //= 2
        configs.append((tuple(blocks), num_warps, 1))
    return configs


def tma_view_ok(t, rows, block_d, head_dim) -> bool:
    """Whether t viewed as (rows, heads * head_dim) can be read through a TMA descriptor."""
    heads = t.shape[-2]
    row_stride = t.stride(-3)
    dense_ok = t.dim() == 3 or t.shape[0] == 1 or t.stride(0) == t.shape[1] * row_stride
    if not dense_ok or (heads > 1 and t.stride(-2) != head_dim) or block_d != head_dim or rows == 0:
        return False
    return not (t.data_ptr() % 16 or (row_stride * t.element_size()) % 16)


def tma_descriptor(t, rows, block_rows, block_d):
    """A TMA descriptor over t viewed as (rows, heads * head_dim) (tma_view_ok), tiles (block_rows, block_d)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, [rows, t.shape[-2] * block_d], [t.stride(-3), 1], [block_rows, block_d])


_FITTING = {}


def launch_fitting(key, blocks, num_warps: int, num_stages: int, launch) -> None:
    """``launch(blocks, num_warps, num_stages)``, or with the first of ``smaller_configs`` whose
    kernel fits the device's shared memory.

    The tuning tables are keyed by compute capability major, but one generation's parts differ:
    sm_80 has 163 KB of shared memory a block, sm_86 / sm_89 99 KB. Triton raises OutOfResources
    before it launches a kernel that does not fit; the config that launched is remembered under
    ``key`` (the kernel, the device and whatever else shapes its tiles)."""
    first = _FITTING.get(key, 0)
    error = None
    if first == 0:
        try:
            launch(tuple(blocks), num_warps, num_stages)
            return
        except OutOfResources as exc:
            error, first = exc, 1
    configs = smaller_configs(blocks, num_warps, num_stages)
    for index in range(first, len(configs)):
        try:
            launch(*configs[index])
        except OutOfResources as exc:
            error = exc
            continue
        _FITTING[key] = index
        return
    raise error


@triton.jit
def visible_mask(rows, cols, seqlen_q, seqlen_k, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, CHECK_SEQLEN_K: tl.constexpr):
    """rows (M, 1), cols (1, N), sequence-local: True where key j is visible to query i."""
    diag = rows + seqlen_k - seqlen_q
    mask = (rows >= 0) & (cols >= 0)  # a full-shaped all-true start
    if CHECK_SEQLEN_K:
        mask = mask & (cols < seqlen_k)
    if HAS_LEFT:
        mask = mask & (cols >= diag - window_left)
    if HAS_RIGHT:
        mask = mask & (cols <= diag + window_right)
    return mask


@triton.jit
def load_tile(ptr, rows, stride_row, row_limit, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile from ``ptr`` (offset to the sequence and head): 0 in the columns past
    HEAD_DIM and, with CHECK_ROWS, in the rows at or past row_limit."""
    ptrs = ptr + rows[:, None] * stride_row + offs_d[None, :]
    if CHECK_ROWS:
        return tl.load(ptrs, mask=(rows[:, None] < row_limit) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def load_block(src, tma_row, tma_col, rows, stride_row, row_limit, offs_d, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, ZERO_TAIL: tl.constexpr):
    """A (rows, BLOCK_D) tile that a kernel loop steps over: through a TMA descriptor over the
    (rows, heads * d) view, read at [tma_row, tma_col], or by pointer as load_tile (``src`` then
    offset to the sequence and head). Past the sequence TMA reads the next sequence's rows or zeros
    past the tensor; ZERO_TAIL zeroes the rows at or past row_limit, where padding or unused cache
    slots may hold NaN that a zero probability does not cancel."""
    if USE_TMA:
        tile = src.load([tma_row, tma_col])
        if ZERO_TAIL:
            tile = tl.where((rows < row_limit)[:, None], tile, 0.0)
    else:
        tile = load_tile(src, rows, stride_row, row_limit, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
    return tile


@triton.jit
def alibi_bias(slope, rows, cols, seqlen_q, seqlen_k):
    dist = rows + seqlen_k - seqlen_q - cols
    return -slope * tl.abs(dist).to(tl.float32)


@triton.jit
def dropout_threshold(p_dropout):
    """The smallest kept 16-bit value, ceil(p_dropout * 65536) of the fp32 p_dropout (exact: a power-of-two
    scale), as pyflash.philox.dropout_threshold."""
    scaled = p_dropout * 65536.0
    floor = scaled.to(tl.int32)
    return floor + (floor.to(tl.float32) < scaled).to(tl.int32)


@triton.jit
def dropout_bits(seed, offset, bh, rows, cols):
    """The 16 random bits (int32 in [0, 65536)) of elements (bh, rows, cols) on any grid (rows, cols broadcast,
    cols >= 0): Philox counter (cols // 8, rows, bh, offset), key = seed, output word (cols % 8) // 2, its low
    half for even cols, its high half for odd (DEVELOPERS.md). Runs one Philox call per element: for a key
    block starting at a multiple of 8 use dropout_bits_tile, which runs one per 8 elements."""
    zero = (rows * 0 + cols * 0).to(tl.int32)
    c = (cols + zero).to(tl.int32)
    c0 = c // 8
    c1 = (rows + zero).to(tl.int32)
    c2 = (zero + bh).to(tl.int32)
    c3 = (zero + offset).to(tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    word = (c % 8) // 2
    r = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3)))
    return tl.where(c % 2 == 0, r & 0xFFFF, r >> 16).to(tl.int32)


@triton.jit
def dropout_uniform(seed, offset, bh, rows, cols):
    """dropout_bits / 65536 in fp32 (exact), in [0, 1)."""
    return dropout_bits(seed, offset, bh, rows, cols).to(tl.float32) * 1.52587890625e-05


@triton.jit
def dropout_keep(seed, offset, p_dropout, bh, rows, cols):
    return dropout_bits(seed, offset, bh, rows, cols) >= dropout_threshold(p_dropout)


@triton.jit
def _philox_octets(seed, offset, bh, rows, start_n, BLOCK_N: tl.constexpr):
    """The four Philox words of the counter grid (start_n // 8 + arange(BLOCK_N // 8)) x rows (rows a (BLOCK_M, 1)
    column), each (BLOCK_M, BLOCK_N // 8): the 16-bit halves of word w at [m, t] are keys 8t + 2w, 8t + 2w + 1."""
    octets = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    zero = (rows * 0 + octets[None, :] * 0).to(tl.int32)
    c0 = (octets[None, :] + zero).to(tl.int32)
    c1 = (rows + zero).to(tl.int32)
    c2 = (zero + bh).to(tl.int32)
    c3 = (zero + offset).to(tl.int32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _interleave_halves(low0, low1, low2, low3, high0, high1, high2, high3, BLOCK_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile whose column 8t + 2w + h is [m, t] of low_w (h = 0) or high_w (h = 1).
    join(x, y) stacks x, y along a new LAST axis: element [m, t, a, b] of join(join(x0, x2), join(x1, x3)) is
    x_(2a + b), and element [m, t, a, b, h] of join(that of the lows, that of the highs) is half h of w = 2a + b;
    the row-major reshape sends it to column 8t + 4a + 2b + h = 8t + 2w + h."""
    BLOCK_M: tl.constexpr = low0.shape[0]
    low = tl.join(tl.join(low0, low2), tl.join(low1, low3))
    high = tl.join(tl.join(high0, high2), tl.join(high1, high3))
    return tl.reshape(tl.join(low, high), [BLOCK_M, BLOCK_N])


@triton.jit
def dropout_bits_tile(seed, offset, bh, rows, start_n, BLOCK_N: tl.constexpr):
    """dropout_bits of the (BLOCK_M, BLOCK_N) tile rows x (start_n + arange(BLOCK_N)), rows a (BLOCK_M, 1)
    column, start_n and BLOCK_N multiples of 8: one Philox call per 8 keys (_philox_octets), the halves of its
    words interleaved (_interleave_halves)."""
    r0, r1, r2, r3 = _philox_octets(seed, offset, bh, rows, start_n, BLOCK_N)
    return _interleave_halves(r0 & 0xFFFF, r1 & 0xFFFF, r2 & 0xFFFF, r3 & 0xFFFF, r0 >> 16, r1 >> 16, r2 >> 16,
                              r3 >> 16, BLOCK_N).to(tl.int32)


@triton.jit
def dropout_uniform_tile(seed, offset, bh, rows, start_n, BLOCK_N: tl.constexpr):
    """dropout_uniform of the tile rows (BLOCK_M, 1) x (start_n + arange(BLOCK_N)); see dropout_bits_tile."""
    return dropout_bits_tile(seed, offset, bh, rows, start_n, BLOCK_N).to(tl.float32) * 1.52587890625e-05


@triton.jit
def dropout_keep_tile(seed, offset, p_dropout, bh, rows, start_n, BLOCK_N: tl.constexpr):
    """dropout_keep of the tile rows (BLOCK_M, 1) x (start_n + arange(BLOCK_N)); see dropout_bits_tile. Each half
    is compared before the interleave, so that one byte an element moves, not 32-bit words (on sm_90 fewer
    spills and integer instructions than comparing after: the dQ kernel at d=128 68 / 132 B against 560 / 652)."""
    r0, r1, r2, r3 = _philox_octets(seed, offset, bh, rows, start_n, BLOCK_N)
    threshold = dropout_threshold(p_dropout).to(tl.uint32)
    return _interleave_halves(((r0 & 0xFFFF) >= threshold).to(tl.int8), ((r1 & 0xFFFF) >= threshold).to(tl.int8),
                              ((r2 & 0xFFFF) >= threshold).to(tl.int8), ((r3 & 0xFFFF) >= threshold).to(tl.int8),
                              ((r0 >> 16) >= threshold).to(tl.int8), ((r1 >> 16) >= threshold).to(tl.int8),
                              ((r2 >> 16) >= threshold).to(tl.int8), ((r3 >> 16) >= threshold).to(tl.int8),
                              BLOCK_N) != 0


@triton.jit
def tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates cleanly to +-1 where e^{2x} over- or underflows
    # (libdevice's tanh does not run under the interpreter).
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def visible_block_ranges(start, own_len, other_len, diag, lo_window, hi_window,
                         OWN_BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr,
                         HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """For the indices [start, start + OWN_BLOCK) of one side (valid below own_len), the range of the
    other side they can see, where own index t sees other index x iff
    t + diag - lo_window <= x <= t + diag + hi_window (a bound is absent without HAS_LO / HAS_HI).

    Queries seeing keys: (seqlen_q, seqlen_k, seqlen_k - seqlen_q, left, right).
    Keys seen by queries: (seqlen_k, seqlen_q, seqlen_q - seqlen_k, right, left).
    Returns lo <= full_lo <= full_hi <= hi: other indices outside [lo, hi) are seen by no own index,
    blocks in [full_lo, full_hi) are seen whole by every own index (no mask), the rest need the mask.
    lo, full_lo, full_hi are multiples of OTHER_BLOCK (or equal hi)."""
    first = start
    last = tl.minimum(start + OWN_BLOCK, own_len) - 1
    lo = 0
    full_lo = 0
    hi = other_len
    full_hi = other_len // OTHER_BLOCK * OTHER_BLOCK
    if HAS_LO:
        lo = tl.maximum(first + diag - lo_window, 0) // OTHER_BLOCK * OTHER_BLOCK
        full_lo = tl.cdiv(tl.maximum(last + diag - lo_window, 0), OTHER_BLOCK) * OTHER_BLOCK
    if HAS_HI:
        hi = tl.minimum(last + diag + hi_window + 1, other_len)
        full_hi = tl.maximum(tl.minimum(first + diag + hi_window + 1, other_len), 0) // OTHER_BLOCK * OTHER_BLOCK
    # A block past own_len (keys past seqused_k) sees nothing.
    hi = tl.where(first <= last, tl.maximum(hi, lo), lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi
