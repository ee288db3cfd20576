"""Host time that pyflash.mha_fwd spends outside the backend (validation, padding, allocation),
with the backend replaced by a no-op: `PYTHONPATH=src python scripts/api_overhead.py`."""
import time

import torch

import pyflash
from pyflash import backend


class _NoBackend:
    @staticmethod
    def forward(*args):
        pass


def main(calls: int = 2000) -> None:
    backend.get = lambda device: _NoBackend
    q = torch.randn(16, 1024, 16, 128, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    for causal in (False, True):
        for _ in range(100):
            pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
        start = time.perf_counter()
        for _ in range(calls):
            pyflash.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
        print(f"causal={causal}: {(time.perf_counter() - start) / calls * 1e6:.1f} us per mha_fwd outside the backend")


if __name__ == "__main__":
    main()
