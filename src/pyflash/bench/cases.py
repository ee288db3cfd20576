"""What is measured: one attention problem (:class:`Case`), the BENCHMARK.md workload, and its FLOPs.

Workload (the FlashAttention papers' convention): ``batch * seqlen = tokens`` (16384) and
``heads * head_dim = hidden`` (2048), so every row moves the same number of tokens; plus the extra
rows users care about (GQA, varlen, sliding window, dropout).

FLOPs: forward ``4 * b * h * sq * sk * d`` (two matmuls), halved when causal; backward 2.5x the
forward (five matmuls instead of two); fwd+bwd 3.5x. Varlen sums the forward count over sequences.
A sliding window counts the (query, key) pairs it actually sees: ``4 * h * d * visible_pairs``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One attention problem. Dense unless ``seqlens`` is set (then batch is len(seqlens) and the
    sequences are packed, ``seqlen`` being the longest). ``window_left`` >= 0 bounds the keys a query
    sees on the left; ``causal`` is window_right == 0, aligned to the bottom-right corner."""

    dtype: str
    batch: int
    seqlen: int
    num_heads: int
    num_heads_k: int
    head_dim: int
    causal: bool
    window_left: int = -1
    dropout_p: float = 0.0
    seqlens: Optional[Tuple[int, ...]] = None
    tag: str = ""  # "" for the main workload, else the name of the extra row

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_varlen(self) -> bool:
        return self.seqlens is not None

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5

    @property
    def window_right(self) -> int:
        return 0 if self.causal else -1

    @property
    def label(self) -> str:
        return self.tag or "main"

    def sequence_lengths(self) -> Tuple[int, ...]:
        return self.seqlens if self.seqlens is not None else (self.seqlen,) * self.batch

    def visible_pairs(self, length: int) -> int:
        """(query, key) pairs a length x length sequence sees under this case's window."""
        if self.window_left < 0:
            return length * length // 2 if self.causal else length * length
        rows = torch.arange(length, dtype=torch.int64)
        first = (rows - self.window_left).clamp(min=0)
        last = rows if self.causal else torch.full_like(rows, length - 1)
        return int((last - first + 1).clamp(min=0).sum())

    def flops(self, mode: str) -> float:
        forward = sum(4.0 * self.num_heads * self.head_dim * self.visible_pairs(n)
                      for n in self.sequence_lengths())
        return forward * MODE_FLOP_FACTOR[mode]

    def describe(self) -> dict:
        return {
            "tag": self.label, "dtype": self.dtype, "b": self.batch, "s": self.seqlen,
            "h": self.num_heads, "hk": self.num_heads_k, "d": self.head_dim, "causal": self.causal,
            "window_left": self.window_left, "dropout_p": self.dropout_p,
            "seqlens": list(self.seqlens) if self.seqlens is not None else None,
        }


def main_workload(dtypes: Sequence[str], head_dims: Sequence[int], seqlens: Sequence[int],
                  causal: Sequence[bool], tokens: int, hidden: int) -> List[Case]:
    cases = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for is_causal in causal:
                for seqlen in seqlens:
                    batch = max(1, tokens // seqlen)
                    heads = max(1, hidden // head_dim)
                    cases.append(Case(dtype, batch, seqlen, heads, heads, head_dim, is_causal))
    return cases


def random_lengths(total: int, count: int, seed: int = 0) -> Tuple[int, ...]:
    """``count`` random positive lengths summing to ``total`` (uniform cut points, reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=gen)[: count - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), cuts.sort().values,
                        torch.tensor([total])])
    return tuple(int(n) for n in bounds.diff())


def extra_rows(dtypes: Sequence[str], causal: Sequence[bool], tokens: int, hidden: int,
               seqlen: int = 4096, window_seqlen: int = 16384, window: int = 4096) -> List[Case]:
    """BENCHMARK.md's extra rows at head_dim 128: GQA (h=32, hk=8), varlen (random lengths summing
    to ``tokens``), sliding window ``window`` at ``window_seqlen`` (causal, Mistral-style), dropout 0.1."""
    head_dim = 128
    heads = max(1, hidden // head_dim)
    seqlen = min(seqlen, tokens)
    batch = max(1, tokens // seqlen)
    window_seqlen = min(window_seqlen, tokens)
    lengths = random_lengths(tokens, max(2, tokens // 1024))
    cases = []
    for dtype in dtypes:
        for is_causal in causal:
            cases.append(Case(dtype, batch, seqlen, 32, 8, head_dim, is_causal, tag="gqa"))
            cases.append(Case(dtype, len(lengths), max(lengths), heads, heads, head_dim, is_causal,
                              seqlens=lengths, tag="varlen"))
            cases.append(Case(dtype, batch, seqlen, heads, heads, head_dim, is_causal, dropout_p=0.1,
                              tag="dropout"))
        cases.append(Case(dtype, max(1, tokens // window_seqlen), window_seqlen, heads, heads, head_dim,
                          True, window_left=min(window, window_seqlen - 1), tag="window"))
    return cases


@dataclass
class Inputs:
    """Fresh random normal inputs of one case, shared by every implementation of that case.

    Dense: q/dout ``(b, s, h, d)``, k/v ``(b, s, hk, d)``. Varlen: packed ``(total, h|hk, d)`` with
    ``cu_seqlens`` int32 ``(b + 1,)``. Implementations derive their own layouts from these (untimed).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    cu_seqlens: Optional[torch.Tensor] = None


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    if case.is_varlen:
        total = sum(case.seqlens)
        lead_q, lead_k = (total,), (total,)
        lengths = torch.tensor((0,) + case.seqlens, dtype=torch.int64)
        cu_seqlens = lengths.cumsum(0).to(device=device, dtype=torch.int32)
    else:
        lead_q = lead_k = (case.batch, case.seqlen)
        cu_seqlens = None
    return Inputs(
        q=randn(*lead_q, case.num_heads, case.head_dim),
        k=randn(*lead_k, case.num_heads_k, case.head_dim),
        v=randn(*lead_k, case.num_heads_k, case.head_dim),
        dout=randn(*lead_q, case.num_heads, case.head_dim),
        cu_seqlens=cu_seqlens,
    )
