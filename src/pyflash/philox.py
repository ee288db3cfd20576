"""Philox4x32-10 in torch integer ops: the generator behind Triton's ``tl.rand``.

The dropout mask is a pure function of (seed, offset, bh, i, j) -- see DEVELOPERS.md for the layout
(16 random bits an element, 8 keys a Philox call).
The reference path calls :func:`dropout_uniform`; the Triton kernels call the same generator through
``tl.philox`` (``kernels/common.py``), so both draw the same mask bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # multiplier for counter word 0
_ROUND_B = 0xCD9E8D57  # multiplier for counter word 2
_KEY_A = 0x9E3779B9  # golden ratio
_KEY_B = 0xBB67AE85  # sqrt(3) - 1
_ROUNDS = 10
# Offsets stay below 2**31 so Triton passes them as int32 counters.
_OFFSET_MASK = 0x7FFFFFFF
# Largest float such that (2**31 - 1) * scale < 1 in fp32 (Triton's uint_to_uniform_float).
_UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # b holds values < 2**32 in int64; a * b < 2**64 can overflow int64, so split b into 16-bit halves.
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2**48
    hi_part = a * b_hi  # < 2**48
    full_lo = lo_part + ((hi_part & 0xFFFF) << 16)
    lo = full_lo & _MASK32
    hi = ((hi_part >> 16) + (full_lo >> 32)) & _MASK32
    return hi, lo


def philox4x32(seed: int, c0, c1=0, c2=0, c3=0) -> Tuple[torch.Tensor, ...]:
    """Philox4x32-10 with key (seed low word, seed high word) on counters given as int64 tensors/ints.

    Returns the four output words as int64 tensors holding unsigned 32-bit values.
    """
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    device = c0.device
    words = [torch.as_tensor(c, dtype=torch.int64, device=device) & _MASK32 for c in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = torch.broadcast_tensors(*words)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64 tensor) to fp32 uniforms in [0, 1), as tl.rand does."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def rand(seed: int, offset) -> torch.Tensor:
    """Equivalent of ``tl.rand(seed, offset)``."""
    return uint_to_uniform(philox4x32(seed, offset)[0])


def dropout_bits(seed: int, offset: int, bh, i, j) -> torch.Tensor:
    """The 16 random bits of element (bh, i, j), an int64 tensor in [0, 65536): the one mask layout
    (DEVELOPERS.md). One Philox call serves 8 consecutive keys: counter (j // 8, i, bh, offset), output word
    (j % 8) // 2, its low half for even j and its high half for odd j. ``bh``, ``i``, ``j`` broadcast (ints
    or int tensors, j >= 0)."""
    j = torch.as_tensor(j, dtype=torch.int64)
    keys = _consecutive_keys(j)
    if keys is not None:
        # Consecutive keys along the last dim (the reference path's tiles): one Philox call per 8 keys.
        first, count = keys
        octets = torch.arange(first // 8, (first + count - 1) // 8 + 1, device=j.device).view(j.shape[:-1] + (-1, ))
        words = philox4x32(seed, octets, i, bh, offset)
        halves = torch.stack([half for w in words for half in (w & 0xFFFF, w >> 16)], dim=-1)  # column 2w + h
        start = first - first // 8 * 8
        return halves.flatten(-2)[..., start:start + count]
    w0, w1, w2, w3 = philox4x32(seed, j // 8, i, bh, offset)
    word = (j % 8) // 2
    chosen = torch.where(word == 0, w0, torch.where(word == 1, w1, torch.where(word == 2, w2, w3)))
    return torch.where(j % 2 == 0, chosen & 0xFFFF, chosen >> 16)


def _consecutive_keys(j: torch.Tensor):
    """(first, count) when j is first, first + 1, ... along its last dim and of size 1 in every other, else None."""
    if j.dim() == 0 or j.numel() != j.shape[-1] or j.numel() == 0:
        return None
    flat = j.reshape(-1)
    first = int(flat[0])
    if first < 0 or not torch.equal(flat, torch.arange(first, first + flat.numel(), device=j.device)):
        return None
    return first, flat.numel()


def dropout_uniform(seed: int, offset: int, bh, i, j) -> torch.Tensor:
    """The dropout uniform of element (bh, i, j): dropout_bits / 65536 in fp32 (exact), in [0, 1)."""
    return dropout_bits(seed, offset, bh, i, j).to(torch.float32) * 2.0**-16


def dropout_threshold(p_dropout: float) -> int:
    """The smallest 16-bit value that is kept: ceil(fp32(p_dropout) * 65536), so that bits >= threshold iff
    uniform >= p_dropout in fp32 (the scale is a power of two: exact)."""
    return math.ceil(float(torch.tensor(p_dropout, dtype=torch.float32)) * 65536)


def dropout_keep(seed: int, offset: int, p_dropout: float, bh, i, j) -> torch.Tensor:
    """Element (bh, i, j) kept: dropout_uniform >= p_dropout (fp32), as 16-bit integers."""
    return dropout_bits(seed, offset, bh, i, j) >= dropout_threshold(p_dropout)


def next_seed_offset(gen: Optional[torch.Generator], device: torch.device, increment: int = 1) -> Tuple[int, int]:
    """Draw (seed, offset) from ``gen`` or the default generator of ``device`` and advance it."""
    if gen is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            gen = torch.cuda.default_generators[index]
        else:
            gen = torch.default_generator
    if gen.device.type == "cuda":
        # Philox-based generator: its seed is fixed, its offset is the stream position.
        offset = gen.get_offset()
        gen.set_offset(offset + 4 * increment)
        return gen.initial_seed() & (2**63 - 1), offset & _OFFSET_MASK
    drawn = torch.randint(0, 2**62, (2,), generator=gen, dtype=torch.int64)
    return int(drawn[0]), int(drawn[1]) & _OFFSET_MASK
