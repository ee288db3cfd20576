"""Test setup. Without a GPU the Triton kernels run under the interpreter, which must be switched
on before any kernel is defined, so this happens before pyflash is imported anywhere."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `pytest -n N` already runs one worker per core: torch's intra-op threads on top only oversubscribe
# (and spin), which makes the small CPU tests an order of magnitude slower on a busy machine.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.py on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class _SmallSharedMemory:
    """Stands in for a Triton kernel on a part with little shared memory: a launch whose tiles
    (the product of its BLOCK_* sizes times num_stages) exceed ``max_tile`` elements raises
    OutOfResources before running, as Triton does; the others run the real kernel."""

    def __init__(self, kernel, max_tile):
        self.kernel, self.max_tile, self.launched = kernel, max_tile, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def run(*args, **kwargs):
            tile = kwargs.get("num_stages", 1)
            for name in ("BLOCK_M", "BLOCK_N"):
                tile *= kwargs.get(name, 1)
            if tile > self.max_tile:
                raise OutOfResources(tile, self.max_tile, "shared memory")
            self.launched.append({name: kwargs.get(name) for name in ("BLOCK_M", "BLOCK_N", "num_stages")})
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.fixture
def small_shared_memory(monkeypatch):
    """small_shared_memory(module, kernel_name, max_tile): that kernel as on a part with little shared
    memory (see _SmallSharedMemory); returns the stand-in, whose ``launched`` lists what ran."""
    from pyflash.kernels import common

    monkeypatch.setattr(common, "_FITTING", {})

    def limit(module, name, max_tile):
        stand_in = _SmallSharedMemory(getattr(module, name), max_tile)
        monkeypatch.setattr(module, name, stand_in)
        return stand_in

    return limit
