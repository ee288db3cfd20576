"""The score rules on the reference side: visibility (causal/window/lengths), softcap, ALiBi.

``kernels/common.py`` states the same rules as Triton helpers; tests hold the two together.
"""
from __future__ import annotations

import torch


def visible(rows: torch.Tensor, cols: torch.Tensor, seqlen_q: int, seqlen_k, window_left: int,
            window_right: int) -> torch.Tensor:
    """Boolean mask: key ``cols`` visible to query ``rows`` (broadcast), bottom-right aligned.

    ``seqlen_k`` may be an int or a tensor broadcastable with rows/cols (keys actually used).
    """
    diag = rows + seqlen_k - seqlen_q  # the key aligned with row i
    mask = cols < seqlen_k
    if window_left >= 0:
        mask = mask & (cols >= diag - window_left)
    if window_right >= 0:
        mask = mask & (cols <= diag + window_right)
    return mask


def alibi_bias(slopes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, seqlen_q: int, seqlen_k) -> torch.Tensor:
    """``-slope * |i + sk - sq - j|`` with slopes broadcast against the (rows, cols) grid."""
    return -slopes * (rows + seqlen_k - seqlen_q - cols).abs().to(torch.float32)


def apply_softcap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(scores / softcap) if softcap > 0 else scores
