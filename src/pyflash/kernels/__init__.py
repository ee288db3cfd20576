"""Triton kernels (CUDA GPUs; CPU under TRITON_INTERPRET=1)."""
