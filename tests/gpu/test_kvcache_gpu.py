"""flash_attn_with_kvcache on the GPU: the decode kernel against the float64 oracle of
tests/test_kvcache.py at serving shapes (h=32, hk=8, d=128, long caches, 256-token and small pages)."""
import pytest
import torch

from test_kvcache import make_case, run_and_check

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 16, 256])
@pytest.mark.parametrize("num_splits", [0, 1, 7])
def test_decode_serving_shapes(monkeypatch, dtype, page_size, num_splits):
    case = make_case(batch=3, num_heads=32, num_heads_k=8, head_dim=128, capacity=4096, page_size=page_size,
                     seqlens=[4096, 1, 3000], dtype=dtype, device="cuda")
    run_and_check(monkeypatch, "triton", case, num_splits=num_splits)


@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_append_rotary_paged_head_dims(monkeypatch, head_dim):
    case = make_case(batch=2, seqlen_q=1, seqlen_new=1, num_heads=8, num_heads_k=2, head_dim=head_dim,
                     capacity=1024, page_size=64, rotary_dim=32, seqlens=[63, 700], device="cuda")
    run_and_check(monkeypatch, "triton", case, causal=True)


def test_every_feature_at_once(monkeypatch):
    case = make_case(batch=3, seqlen_q=4, seqlen_new=4, num_heads=16, num_heads_k=4, head_dim=128,
                     capacity=2048, batch_idx=True, leftpad=True, alibi=True, rotary_dim=64,
                     seqlens=[2000, 17, 1024], device="cuda")
    run_and_check(monkeypatch, "triton", case, window=(300, 0), softcap=20.0, interleaved=False)


def test_fp32(monkeypatch):
    case = make_case(batch=2, num_heads=8, num_heads_k=8, head_dim=64, capacity=999, seqlens=[999, 500],
                     dtype=torch.float32, device="cuda")
    run_and_check(monkeypatch, "triton", case)


def test_cuda_graph_capture():
    from pyflash.kvcache import flash_attn_with_kvcache

    case = make_case(batch=2, num_heads=32, num_heads_k=8, head_dim=128, capacity=8192, page_size=256,
                     seqlens=[8192, 5000], device="cuda")
    call = lambda: flash_attn_with_kvcache(case["q"], case["k_cache"], case["v_cache"],  # noqa: E731
                                           cache_seqlens=case["cache_seqlens"], block_table=case["block_table"])
    expected = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(3):  # the split kernels' arrival counters must be back at zero after each call
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
