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
