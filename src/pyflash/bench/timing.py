"""Timing: ``triton.testing.do_bench`` (median) on CUDA, a wall-clock median on the CPU; the card's
ceilings (bf16 matmul TFLOP/s, device-to-device copy TB/s) measured the same way."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def median_ms(fn: Callable[[], object], device: torch.device, cpu_budget_s: float = 0.5) -> float:
    """Median time of ``fn`` in milliseconds, after a warm-up call (compilation, autotuning).

    CPU: calls for ``cpu_budget_s`` seconds (5 to 20 calls; a budget of 0 means a single call)."""
    fn()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times, min_calls = [], 5 if cpu_budget_s > 0 else 1
    started = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - started < cpu_budget_s and len(times) < 20):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def ceilings(device: torch.device) -> Dict[str, float]:
    """bf16 8192^3 matmul (fp32 1024^3 on the CPU) and a large copy (read + write bytes counted)."""
    if device.type == "cuda":
        size, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        size, dtype, copy_bytes = 1024, torch.float32, 1 << 26
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_ms = median_ms(lambda: a @ b, device)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    return {
        "mm_TFLOPs": 2 * size ** 3 / (mm_ms * 1e-3) / 1e12,
        "mm_shape": f"{size}^3 {str(dtype).replace('torch.', '')}",
        "copy_TBps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
    }
