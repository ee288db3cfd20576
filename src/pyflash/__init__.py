"""pyflash: FlashAttention in Python. Triton kernels on NVIDIA GPUs, a PyTorch path everywhere else."""
from pyflash import flash_attn_interface
from pyflash.api import mha_bwd, mha_fwd, mha_varlen_bwd, mha_varlen_fwd
from pyflash.flash_attn_interface import *  # noqa: F401,F403  (the flash_attn names)
from pyflash.interface import scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = ["mha_fwd", "mha_varlen_fwd", "mha_bwd", "mha_varlen_bwd", "scaled_dot_product_attention",
           *flash_attn_interface.__all__]
