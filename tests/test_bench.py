"""CPU smoke test of the benchmark harness (``python -m pyflash.bench``): tiny shapes, every mode,
the extra rows; checks the FLOP counts, the JSON written and the table's columns. Also
``make run``'s self-check (``pyflash.selfcheck``) on the reference backend."""
import json

import pytest

from pyflash.bench import runner
from pyflash.bench.cases import Case, extra_rows, main_workload, random_lengths


def test_flops_follow_benchmark_md():
    full = Case("bf16", 2, 1024, 16, 16, 128, causal=False)
    assert full.flops("fwd") == 4 * 2 * 16 * 1024 * 1024 * 128
    assert Case("bf16", 2, 1024, 16, 16, 128, causal=True).flops("fwd") == full.flops("fwd") / 2
    assert full.flops("bwd") == 2.5 * full.flops("fwd")
    assert full.flops("fwd+bwd") == 3.5 * full.flops("fwd")
    # a causal window of 2 on 4 rows sees 1 + 2 + 3 + 3 keys
    assert Case("bf16", 1, 4, 1, 1, 8, causal=True, window_left=2).flops("fwd") == 4 * 8 * 9
    varlen = Case("bf16", 2, 30, 2, 2, 8, causal=False, seqlens=(30, 10))
    assert varlen.flops("fwd") == 4 * 2 * 8 * (30 * 30 + 10 * 10)


def test_workload_shapes():
    cases = main_workload(["bf16"], [64, 128], [512, 16384], [False, True], tokens=16384, hidden=2048)
    assert len(cases) == 8
    assert all(c.batch * c.seqlen == 16384 and c.num_heads * c.head_dim == 2048 for c in cases)
    lengths = random_lengths(16384, 16)
    assert len(lengths) == 16 and sum(lengths) == 16384 and min(lengths) > 0
    tags = {c.tag for c in extra_rows(["bf16"], [False, True], 16384, 2048)}
    assert tags == {"gqa", "varlen", "window", "dropout"}


def test_bench_cli_writes_table_and_json(tmp_path, capsys):
    result = runner.main(["--device", "cpu", "--dtypes", "fp32", "--head-dims", "16", "--seqlens", "16", "32",
                          "--tokens", "64", "--hidden", "32", "--mode", "all", "--peers", "math",
                          "--extras", "--no-ceilings", "--cpu-budget", "0", "--threads", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.lstrip().startswith("dtype"))
    for column in ("seqlen", "causal", "mode", "pyflash GFLOP/s", "Math", "pf/Math"):
        assert column in header
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["backend"] == "reference"
    rows = data["rows"]
    assert rows == json.loads(json.dumps(result["rows"]))
    ours = [r for r in rows if r["impl"] == "pyflash"]
    # 2 seqlens x 2 causal + gqa/varlen/dropout x 2 causal + window = 11 cases, 3 modes each
    assert len(ours) == 33
    assert {r["mode"] for r in ours} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["error"] is None and r["tflops"] > 0 for r in ours), [r["error"] for r in ours]
    dense = [r for r in rows if r["impl"] == "math" and r["tag"] == "main" and r["mode"] == "fwd"]
    assert all(r["max_abs_diff_vs_pyflash"] < 1e-4 for r in dense)


def test_peer_errors_show_as_dash(tmp_path, capsys):
    # cuDNN attention needs CUDA: on the CPU every row of that peer is '-' and the run goes on
    runner.main(["--device", "cpu", "--dtypes", "fp32", "--head-dims", "16", "--seqlens", "16",
                 "--tokens", "16", "--hidden", "16", "--causal", "on", "--mode", "fwd", "--peers", "cudnn",
                 "--no-ceilings", "--no-plot", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.lstrip().startswith("fp32"))
    assert line.split()[-2:] == ["-", "-"]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    cudnn = [r for r in rows if r["impl"] == "cudnn"]
    assert cudnn and all(r["tflops"] is None and r["error"] for r in cudnn)


def test_selfcheck_passes_on_cpu(capsys):
    """``make run``'s self-check: every case within the error rule on the reference backend."""
    import torch

    from pyflash import selfcheck

    assert selfcheck.self_check(torch.device("cpu"), torch.float32)
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "mask reproducible" in printed


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
