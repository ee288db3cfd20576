"""Benchmark harness: ``python -m pyflash.bench`` (see benchmarks/README.md).

Modules: ``cases`` (the workload and its FLOPs), ``impls`` (pyflash and its peers), ``timing``
(do_bench / CPU timer, card ceilings), ``report`` (table, JSON, plot, progress), ``runner`` (the CLI).
"""
from pyflash.bench.runner import main

__all__ = ["main"]
