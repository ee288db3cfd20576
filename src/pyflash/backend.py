"""Backend choice: Triton kernels for CUDA tensors, the PyTorch reference path for anything else.

``PYFLASH_BACKEND=reference`` forces the reference path; ``PYFLASH_BACKEND=triton`` forces the kernels
(on CPU tensors this needs ``TRITON_INTERPRET=1``; that is how CI tests them).
"""
from __future__ import annotations

import os
from types import ModuleType

import torch


def name_for(device: torch.device) -> str:
    forced = os.environ.get("PYFLASH_BACKEND", "").strip().lower()
    if forced in ("reference", "triton"):
        return forced
    if forced:
        raise ValueError(f"PYFLASH_BACKEND must be 'reference' or 'triton', got {forced!r}")
    return "triton" if device.type == "cuda" else "reference"


def get(device: torch.device) -> ModuleType:
    """The module holding ``forward(...)`` and ``backward(...)`` per the backend contract."""
    if name_for(device) == "triton":
        from pyflash.kernels import attention

        return attention
    from pyflash import reference

    return reference
