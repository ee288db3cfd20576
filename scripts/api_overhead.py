"""Host time per attention call.

    PYTHONPATH=src python scripts/api_overhead.py            # CPU: mha_fwd outside the backend (backend
                                                             # stubbed); kernels.forward.forward, launch stubbed
    PYTHONPATH=src python3 scripts/api_overhead.py --cuda    # GPU: whole calls, host-bound by construction

--cuda times back-to-back calls on a shape so small that the GPU finishes each kernel long before the
host issues the next: wall time per call is then the host's time per call (Python, argument checks,
Triton's launcher, TMA descriptors), the floor under every small-shape row of the benchmark. Peers
(SDPA's cuDNN and FLASH backends) are timed the same way. --profile prints cProfile's top entries.
"""
import argparse
import cProfile
import pstats
import time

import torch

import pyflash
from pyflash import backend


class _NoBackend:
    @staticmethod
    def forward(*args):
        pass

    @staticmethod
    def backward(*args):
        pass


def per_call_us(fn, calls: int, sync) -> float:
    for _ in range(50):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def cpu_main(calls: int) -> None:
    from pyflash.kernels import forward as kernel_module
    from pyflash.params import AttentionParams, Seqlens

    real_get = backend.get
    backend.get = lambda device: _NoBackend
    q = torch.randn(16, 1024, 16, 128, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    for causal in (False, True):
        us = per_call_us(lambda: pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None),
                         calls, lambda: None)
        print(f"causal={causal}: {us:.1f} us per mha_fwd outside the backend")
        res = pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
        us = per_call_us(lambda: pyflash.mha_bwd(q, q, k, v, res[0], res[4], None, None, None, None, 0.0, None, causal,
                                                 -1, -1, False, res[5], res[6]), calls, lambda: None)
        print(f"causal={causal}: {us:.1f} us per mha_bwd outside the backend")
    backend.get = real_get
    # kernels.forward.forward as on a Hopper card (table lookup, TMA descriptors), the launch stubbed.
    kernel_module._forward_kernel = _NoLaunch()
    kernel_module.INTERPRET = False
    kernel_module.device_capability = lambda device: (9, 0)
    q = torch.randn(1, 128, 2, 128, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 128)
    us = per_call_us(lambda: kernel_module.forward(q, q, q, out, lse, None, AttentionParams(128 ** -0.5, -1, 0),
                                                   Seqlens(1, 128, 128), use_tma=True), calls, lambda: None)
    print(f"{us:.1f} us per kernels.forward.forward before the launch (Hopper path: config, TMA descriptors)")


def cuda_main(calls: int, profile: bool) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pyflash.kernels.forward import forward
    from pyflash.params import AttentionParams, Seqlens

    q = torch.randn(1, 128, 2, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    dout = torch.randn_like(q)
    sync = torch.cuda.synchronize
    rows = []
    for causal in (False, True):
        fwd = lambda: pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)  # noqa: E731
        rows.append((f"pyflash.mha_fwd causal={causal}", per_call_us(fwd, calls, sync)))
        params = AttentionParams(128 ** -0.5, -1, 0 if causal else -1)
        out, lse = torch.empty_like(q), torch.empty(1, 2, 128, device="cuda")
        kernel = lambda: forward(q, k, v, out, lse, None, params, Seqlens(1, 128, 128))  # noqa: E731
        rows.append((f"kernels.forward.forward causal={causal}", per_call_us(kernel, calls, sync)))
        res = fwd()
        bwd = lambda: pyflash.mha_bwd(dout, q, k, v, res[0], res[4], None, None, None, None, 0.0, None,  # noqa: E731
                                      causal, -1, -1, False, res[5], res[6])
        rows.append((f"pyflash.mha_bwd causal={causal}", per_call_us(bwd, calls, sync)))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            with sdpa_kernel(getattr(SDPBackend, name)):
                sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)  # noqa: E731
                rows.append((f"SDPA {name} causal={causal}", per_call_us(sdpa, calls, sync)))
    from pyflash.kvcache import flash_attn_with_kvcache

    q1 = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(1, 4096, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cache_seqlens = torch.tensor([4000], dtype=torch.int32, device="cuda")
    from pyflash.kernels import launch

    default = launch.RECORD_TRITON
    for record_triton in (False, True):  # the Triton kernels' recorded launches (launch.RECORD_TRITON)
        launch.RECORD_TRITON = record_triton
        rows.append((f"flash_attn_with_kvcache (q (1, 1, 8, 128), cache 4000 of 4096, hk 2), "
                     f"RECORD_TRITON={int(record_triton)}",
                     per_call_us(lambda: flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=cache_seqlens),
                                 calls, sync)))
        q64 = q[..., :64].contiguous()
        res64 = pyflash.mha_fwd(q64, q64, q64, None, None, 0.0, None, True, -1, -1, False, None)
        rows.append((f"pyflash.mha_bwd d=64 (Triton kernels) causal=True, RECORD_TRITON={int(record_triton)}",
                     per_call_us(lambda: pyflash.mha_bwd(q64, q64, q64, q64, res64[0], res64[4], None, None, None,
                                                         None, 0.0, None, True, -1, -1, False, res64[5], res64[6]),
                                 calls, sync)))
    launch.RECORD_TRITON = default
    # Replays through the C launcher itself (launch.DIRECT_LAUNCH, on by default) or through Triton's
    # launcher wrapper: the rows above ran the default, these the other way.
    direct = launch.DIRECT_LAUNCH
    launch.DIRECT_LAUNCH = not direct
    other = f"DIRECT_LAUNCH={int(not direct)}"
    for causal in (False, True):
        fwd = lambda: pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)  # noqa: E731
        rows.append((f"pyflash.mha_fwd causal={causal}, {other}", per_call_us(fwd, calls, sync)))
        res = fwd()
        bwd = lambda: pyflash.mha_bwd(dout, q, k, v, res[0], res[4], None, None, None, None, 0.0, None,  # noqa: E731
                                      causal, -1, -1, False, res[5], res[6])
        rows.append((f"pyflash.mha_bwd causal={causal}, {other}", per_call_us(bwd, calls, sync)))
    rows.append(("flash_attn_with_kvcache (q (1, 1, 8, 128), cache 4000 of 4096, hk 2), " + other,
                 per_call_us(lambda: flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=cache_seqlens),
                             calls, sync)))
    launch.DIRECT_LAUNCH = direct
    print("| call (b=1, s=128, h=2, d=128, bf16) | host us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    if profile:
        fwd = lambda: pyflash.mha_fwd(q, k, v, None, None, 0.0, None, True, -1, -1, False, None)  # noqa: E731
        res = fwd()
        bwd = lambda: pyflash.mha_bwd(dout, q, k, v, res[0], res[4], None, None, None, None, 0.0, None,  # noqa: E731
                                      True, -1, -1, False, res[5], res[6])
        for name, call in (("mha_fwd", fwd), ("mha_bwd", bwd)):
            print(f"== cProfile of {name} (causal), 1000 calls")
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(1000):
                call()
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(45)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if args.cuda:
        cuda_main(args.calls, args.profile)
    else:
        cpu_main(args.calls)


if __name__ == "__main__":
    main()
