"""What the API layer hands to a backend once the inputs are validated (see DEVELOPERS.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class AttentionParams:
    softmax_scale: float
    window_left: int  # -1: unbounded
    window_right: int  # -1: unbounded; causal is window_right == 0
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None  # fp32 (b, h), stride 0 along b for an (h) input
    dropout_p: float = 0.0
    philox_seed: int = 0
    philox_offset: int = 0

    @property
    def is_causal(self) -> bool:
        return self.window_left < 0 and self.window_right == 0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0


@dataclass(frozen=True)
class Seqlens:
    """Sequence lengths. Dense inputs have no cu_seqlens: every sequence is (max_seqlen_q, max_seqlen_k)."""

    batch_size: int
    max_seqlen_q: int
    max_seqlen_k: int
    cu_seqlens_q: Optional[torch.Tensor] = None  # int32 (b + 1,)
    cu_seqlens_k: Optional[torch.Tensor] = None  # int32 (b + 1,)
    seqused_k: Optional[torch.Tensor] = None  # int32 (b,)

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None
