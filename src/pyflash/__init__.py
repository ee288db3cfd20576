"""pyflash: FlashAttention in Python. Triton kernels on NVIDIA GPUs, a PyTorch path everywhere else."""
from pyflash.api import mha_bwd, mha_fwd, mha_varlen_bwd, mha_varlen_fwd
from pyflash.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)

__version__ = "0.1.0"

__all__ = [
    "mha_fwd",
    "mha_varlen_fwd",
    "mha_bwd",
    "mha_varlen_bwd",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "scaled_dot_product_attention",
]
from pyflash.kvcache import flash_attn_with_kvcache  # noqa: E402,F401
