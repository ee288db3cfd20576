"""Ring attention (pyflash.distributed) on N GPUs with NCCL: correctness against one GPU, then time per
step (forward, forward + backward) and scaling over 1, 2, 4, ..., N GPUs at a fixed global seqlen.

    PYTHONPATH=src torchrun --nproc-per-node 8 scripts/ring_attention_bench.py
    PYTHONPATH=src torchrun --nproc-per-node 4 scripts/ring_attention_bench.py --seqlens 32768 65536 --modes causal
    PYTHONPATH=src torchrun --nproc-per-node 2 scripts/ring_attention_bench.py --device cpu   # gloo smoke test

Workload: bf16, batch 1, 16 heads of dim 128 (heads * head_dim = 2048), global seqlen 32k..256k split
over the ring (zigzag shards, so causal work is balanced). Correctness: every rank runs the whole
sequence on its own GPU (bf16 and fp32) and checks its shard of the ring's out/lse/dq/dk/dv with the
flash_attn rule ``|ring - ref32| <= 2 |single_gpu_bf16 - ref32| + atol``.

Rows go to stdout (rank 0) and, as JSON lines, to $OUT/ring_attention_bench.jsonl when OUT is set.
NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is set here before NCCL starts.
"""
import os

os.environ["NCCL_NVLS_ENABLE"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pyflash import api  # noqa: E402
from pyflash.distributed import ring_flash_attn_func, zigzag_split  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: NCCL, bf16 (the benchmark); cpu: gloo, fp32, tiny shapes (a smoke test)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None,
                        help="global seqlens to time (default 32768 65536 131072 262144; cpu: 256 512)")
    parser.add_argument("--check-seqlen", type=int, default=None,
                        help="global seqlen of the correctness check (default 16384; cpu: 128)")
    parser.add_argument("--modes", nargs="+", choices=("causal", "full"), default=("causal", "full"))
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--heads-k", type=int, default=None, help="kv heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    if args.seqlens is None:
        args.seqlens = [256, 512] if cpu else [32768, 65536, 131072, 262144]
    if args.check_seqlen is None:
        args.check_seqlen = 128 if cpu else 16384
    if cpu:
        args.heads, args.head_dim = min(args.heads, 2), min(args.head_dim, 32)
    args.heads_k = args.heads_k or args.heads
    args.dtype = torch.float32 if cpu else torch.bfloat16
    return args


def setup(args):
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", 1))))
    dist.init_process_group("gloo")
    return torch.device("cpu")


def log(row, rank):
    if rank != 0:
        return
    print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "ring_attention_bench.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def ring_sizes(world_size):
    sizes, n = [], 1
    while n < world_size:
        sizes.append(n)
        n *= 2
    return sizes + [world_size]


def random_inputs(shape_q, shape_kv, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, dout = (torch.randn(shape_q, device=device, dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(shape_kv, device=device, dtype=dtype, generator=gen) for _ in range(2))
    return q, k, v, dout


def single_gpu(q, k, v, dout, causal):
    """out, lse, dq, dk, dv of the whole sequence on this GPU (pyflash.api)."""
    out, _, _, _, lse, *_ = api.mha_fwd(q, k, v, None, None, 0.0, None, causal, -1, -1, False, None)
    dq, dk, dv, _ = api.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, 0.0, None, causal, -1, -1, False, 0, 0)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def check(args, device, causal):
    """The ring against the whole sequence on one GPU; every rank checks its own shard."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seqlen = args.check_seqlen
    shape_q = (1, seqlen, args.heads, args.head_dim)
    shape_kv = (1, seqlen, args.heads_k, args.head_dim)
    q, k, v, dout = random_inputs(shape_q, shape_kv, args.dtype, device, seed=0)
    single = single_gpu(q, k, v, dout, causal)
    ref = single_gpu(*(t.float() for t in (q, k, v, dout)), causal)
    local = [zigzag_split(t, world_size, rank).requires_grad_() for t in (q, k, v)]
    local_dout = zigzag_split(dout, world_size, rank)
    out, lse, _ = ring_flash_attn_func(*local, causal=causal, return_attn_probs=True)
    out.backward(local_dout)
    ring = {"out": out.detach(), "lse": lse, "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad}

    ok = True
    for name in ("out", "lse", "dq", "dk", "dv"):
        dim = 2 if name == "lse" else 1
        want = zigzag_split(ref[name], world_size, rank, dim)
        got = ring[name].float()
        base = zigzag_split(single[name], world_size, rank, dim).float()
        # flash_attn's rule; atol: twice the rounding of the reference to the input dtype
        rounding = ((want.to(args.dtype) + 0.3 - 0.3).float() - want).abs().max()
        errors = torch.stack([(got - want).abs().max(), (base - want).abs().max(), 2 * rounding + 1e-5])
        errors[0] = torch.where(torch.isnan(got).any(), torch.tensor(float("inf"), device=device), errors[0])
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        ring_err, single_err, atol = errors.tolist()
        passed = ring_err <= 2 * single_err + atol
        ok &= passed
        log({"check": name, "causal": causal, "seqlen": seqlen, "gpus": world_size, "ring_err": ring_err,
             "single_gpu_err": single_err, "atol": atol, "pass": passed}, rank)
    return ok


def attention_flops(seqlen, args, causal):
    forward = 4 * seqlen * seqlen * args.heads * args.head_dim * (0.5 if causal else 1.0)
    return forward, 3.5 * forward  # backward: 2.5x the forward's matmuls


def time_ring(args, device, group, seqlen, causal):
    """Median seconds per forward and per forward + backward over this group's ranks (max over ranks)."""
    size = dist.get_world_size(group)
    shape_q = (1, seqlen // size, args.heads, args.head_dim)
    shape_kv = (1, seqlen // size, args.heads_k, args.head_dim)
    q, k, v, dout = random_inputs(shape_q, shape_kv, args.dtype, device, seed=dist.get_rank(group))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            ring_flash_attn_func(q, k, v, group=group, causal=causal)

    def step():
        q.grad = k.grad = v.grad = None
        ring_flash_attn_func(q, k, v, group=group, causal=causal).backward(dout)

    results = []
    for fn in (forward, step):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.iters):
            sync(device)
            dist.barrier(group)
            begin = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - begin)
        median = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64, device=device)
        dist.all_reduce(median, op=dist.ReduceOp.MAX, group=group)
        results.append(median.item())
    return results


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    args = parse_args()
    device = setup(args)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    log({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gpus": world_size,
         "dtype": str(args.dtype).replace("torch.", ""), "heads": args.heads, "heads_k": args.heads_k,
         "head_dim": args.head_dim, "NCCL_NVLS_ENABLE": os.environ["NCCL_NVLS_ENABLE"]}, rank)

    ok = all([check(args, device, mode == "causal") for mode in args.modes])
    log({"correct": ok}, rank)

    sizes = ring_sizes(world_size)
    groups = {n: dist.new_group(list(range(n))) for n in sizes}  # every rank creates every group
    for seqlen in args.seqlens:
        for mode in args.modes:
            causal = mode == "causal"
            fwd_flops, step_flops = attention_flops(seqlen, args, causal)
            baseline = None
            for n in sizes:
                if seqlen % (2 * n):
                    continue
                if rank < n:
                    fwd_s, step_s = time_ring(args, device, groups[n], seqlen, causal)
                    baseline = baseline or (n, step_s)
                    speedup = baseline[1] / step_s * baseline[0]
                    log({"seqlen": seqlen, "causal": causal, "gpus": n, "fwd_ms": 1e3 * fwd_s, "step_ms": 1e3 * step_s,
                         "fwd_TFLOPs_per_gpu": fwd_flops / fwd_s / n / 1e12,
                         "step_TFLOPs_per_gpu": step_flops / step_s / n / 1e12,
                         "speedup": speedup, "efficiency": speedup / n}, rank)
                dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit("ring attention does not match the single-GPU result (see the check rows)")


if __name__ == "__main__":
    main()
