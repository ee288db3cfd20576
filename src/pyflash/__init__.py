"""pyflash: FlashAttention in Python. Triton kernels on NVIDIA GPUs, a PyTorch path everywhere else."""
from pyflash.api import mha_bwd, mha_fwd, mha_varlen_bwd, mha_varlen_fwd

__version__ = "0.1.0"

__all__ = ["mha_fwd", "mha_varlen_fwd", "mha_bwd", "mha_varlen_bwd"]
