"""``python -m pyflash.selfcheck`` (what ``make run`` calls): which backend runs here, a self-check of
``mha_fwd``/``mha_bwd`` against a naive float64 attention, then the benchmark for this device.

The naive attention below materialises the scores and shares no code with pyflash (an oracle must
not reuse what it checks); only the Philox generator is borrowed to rebuild the dropout mask from
the returned seed/offset, with the mask layout of DEVELOPERS.md written out again here.

Error rule (flash_attn's): ``|ours - ref64| <= 2 * |naive_lowp - ref64| + atol`` (max abs), where
``naive_lowp`` is the naive attention run in the input dtype. The table shows err / bound per
tensor: below 1 passes. Arguments after ``--`` go to ``python -m pyflash.bench``.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@dataclass(frozen=True)
class Check:
    name: str
    lengths_q: Tuple[int, ...]  # one entry per sequence
    lengths_k: Tuple[int, ...]
    num_heads: int = 4
    num_heads_k: int = 4
    head_dim: int = 32
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    dropout_p: float = 0.0
    varlen: bool = False


CHECKS = (
    Check("plain", (67, 67), (67, 67)),
    Check("causal sq>sk", (75, 75), (50, 50), causal=True),  # rows that see no key: out 0, lse +inf
    Check("causal sq<sk", (33,), (80,), head_dim=64, causal=True),
    Check("gqa 6/2", (64, 64), (64, 64), num_heads=6, num_heads_k=2, causal=True),
    Check("window (16, 8)", (90,), (90,), window=(16, 8)),
    Check("varlen causal", (17, 40, 1), (30, 40, 9), num_heads_k=2, causal=True, varlen=True),
    Check("dropout 0.17", (48, 48), (48, 48), dropout_p=0.17),
)


def naive_attention(q, k, v, scale: float, left: int, right: int, keep=None, p_dropout=0.0):
    """One sequence: q (sq, h, d), k/v (sk, hk, d), computed in q's dtype. keep (h, sq, sk) bool.
    Returns out (sq, h, d) and lse (h, sq) with +inf where a row sees no key."""
    seqlen_q, num_heads, _ = q.shape
    seqlen_k, num_heads_k, _ = k.shape
    k = k.repeat_interleave(num_heads // num_heads_k, dim=1)
    v = v.repeat_interleave(num_heads // num_heads_k, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    diag = i + seqlen_k - seqlen_q  # bottom-right alignment
    seen = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        seen &= j >= diag - left
    if right >= 0:
        seen &= j <= diag + right
    scores = scores.masked_fill(~seen, -math.inf)
    any_seen = seen.any(-1)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    row_max = torch.where(any_seen, scores.amax(-1), zero).detach()
    exp = torch.exp(scores - row_max[..., None])
    total = torch.where(any_seen, exp.sum(-1), zero + 1)
    probs = exp / total[..., None]
    lse = torch.where(any_seen, row_max + torch.log(total), zero + math.inf)
    if keep is not None:
        probs = probs * keep.to(q.dtype) / (1 - p_dropout)
    return torch.einsum("hij,jhd->ihd", probs, v), lse


def keep_mask(seed: int, offset: int, p_dropout: float, batch_index: int, num_heads: int, seqlen_q: int,
              seqlen_k: int, device) -> torch.Tensor:
    """Kept iff uniform >= p, uniform = 16 bits of Philox4x32-10 with counter (j // 8, i, b * h + head, offset)
    over 2**16: output word (j % 8) // 2, its low half for even j, its high half for odd (one call serves 8
    consecutive keys)."""
    from pyflash.philox import philox4x32

    head = torch.arange(num_heads, dtype=torch.int64)[:, None, None]
    i = torch.arange(seqlen_q, dtype=torch.int64)[None, :, None]
    j = torch.arange(seqlen_k, dtype=torch.int64)[None, None, :]
    shape = (num_heads, seqlen_q, seqlen_k)
    words = torch.stack([w.expand(shape) for w in philox4x32(seed, j // 8, i, batch_index * num_heads + head,
                                                              offset)])
    word = torch.gather(words, 0, ((j % 8) // 2).expand(shape).unsqueeze(0)).squeeze(0)
    uniform = (torch.bitwise_right_shift(word, 16 * (j % 2)) % 65536).to(torch.float32) / 65536
    return (uniform >= torch.tensor(p_dropout, dtype=torch.float32)).to(device)


def _split(t: torch.Tensor, check: Check, lengths: Sequence[int]) -> List[torch.Tensor]:
    """Per-sequence (s, h, d) views of a dense (b, s, h, d) or packed (total, h, d) tensor."""
    return list(t.split(list(lengths))) if check.varlen else list(t.unbind(0))


def _reference(check: Check, q, k, v, dout, dtype, seed_offset):
    """Naive out, lse, dq, dk, dv in ``dtype`` (float64 reference or the input dtype)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    left, right = check.window
    if check.causal:
        right = 0
    outs, lses = [], []
    for index, (qs, ks, vs) in enumerate(zip(_split(leaves[0], check, check.lengths_q),
                                             _split(leaves[1], check, check.lengths_k),
                                             _split(leaves[2], check, check.lengths_k))):
        keep = None
        if check.dropout_p > 0:
            keep = keep_mask(*seed_offset, check.dropout_p, index, check.num_heads, qs.shape[0],
                             ks.shape[0], q.device)
        out, lse = naive_attention(qs, ks, vs, check.head_dim ** -0.5, left, right, keep, check.dropout_p)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, 0) if check.varlen else torch.stack(outs, 0)
    lse = torch.cat(lses, 1) if check.varlen else torch.stack(lses, 0)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [out.detach(), lse.detach(), *grads]


def _inputs(check: Check, device, dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    if check.varlen:
        lead_q, lead_k = (sum(check.lengths_q),), (sum(check.lengths_k),)
    else:
        lead_q, lead_k = (len(check.lengths_q), check.lengths_q[0]), (len(check.lengths_k), check.lengths_k[0])

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    return (randn(*lead_q, check.num_heads, check.head_dim), randn(*lead_k, check.num_heads_k, check.head_dim),
            randn(*lead_k, check.num_heads_k, check.head_dim), randn(*lead_q, check.num_heads, check.head_dim))


def _run_pyflash(check: Check, q, k, v, dout, gen=None):
    import pyflash

    scale = check.head_dim ** -0.5
    left, right = check.window
    if check.varlen:
        def cumulative(lengths):
            return torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)

        cu_q, cu_k = cumulative(check.lengths_q), cumulative(check.lengths_k)
        max_q, max_k = max(check.lengths_q), max(check.lengths_k)
        fwd = pyflash.mha_varlen_fwd(q, k, v, None, cu_q, cu_k, None, None, max_q, max_k, check.dropout_p,
                                     scale, False, check.causal, left, right, False, gen)
        out, lse, seed, offset = fwd[0], fwd[4], fwd[5], fwd[6]
        grads = pyflash.mha_varlen_bwd(dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, None, max_q,
                                       max_k, check.dropout_p, scale, False, check.causal, left, right, False,
                                       seed, offset)
    else:
        fwd = pyflash.mha_fwd(q, k, v, None, None, check.dropout_p, scale, check.causal, left, right, False, gen)
        out, lse, seed, offset = fwd[0], fwd[4], fwd[5], fwd[6]
        grads = pyflash.mha_bwd(dout, q, k, v, out, lse, None, None, None, None, check.dropout_p, scale,
                                check.causal, left, right, False, seed, offset)
    return [out, lse, *grads[:3]], (int(seed), int(offset))


def _error_ratio(ours: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor, atol: float) -> float:
    """max |ours - ref| / (2 max |lowp - ref| + atol); inf where +inf entries disagree or NaN."""
    ours, ref, lowp = ours.double(), ref.double(), lowp.double()
    if torch.isnan(ours).any() or not torch.equal(torch.isinf(ours), torch.isinf(ref)):
        return math.inf
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    err = (ours - ref)[finite].abs().max().item()
    bound = 2 * (lowp - ref)[finite].abs().max().item() + atol
    return err / bound


def run_check(check: Check, device, dtype, seed: int) -> Dict[str, object]:
    q, k, v, dout = _inputs(check, device, dtype, seed)
    gen = torch.Generator(device=device).manual_seed(seed) if check.dropout_p > 0 else None
    ours, seed_offset = _run_pyflash(check, q, k, v, dout, gen)
    ref = _reference(check, q, k, v, dout, torch.float64, seed_offset)
    lowp = _reference(check, q, k, v, dout, dtype, seed_offset)
    names = ("out", "lse", "dq", "dk", "dv")
    result: Dict[str, object] = {name: _error_ratio(o, r, lp, ATOL[dtype])
                                 for name, o, r, lp in zip(names, ours, ref, lowp)}
    if check.dropout_p > 0:
        again, _ = _run_pyflash(check, q, k, v, dout, torch.Generator(device=device).manual_seed(seed))
        later, _ = _run_pyflash(check, q, k, v, dout, gen)  # the generator advanced: another mask
        result["same seed, same out"] = torch.equal(again[0], ours[0])
        result["next call differs"] = not torch.equal(later[0], ours[0])
    return result


def self_check(device: torch.device, dtype: torch.dtype) -> bool:
    print(f"self-check: pyflash.mha_fwd/mha_bwd vs naive float64 attention ({str(dtype)[6:]} inputs), "
          "err/bound per tensor (< 1 passes)")
    header = f"{'case':<16}{'out':>8}{'lse':>8}{'dq':>8}{'dk':>8}{'dv':>8}  result"
    print(header)
    print("-" * len(header))
    all_ok = True
    for index, check in enumerate(CHECKS):
        try:
            result = run_check(check, device, dtype, seed=index)
        except Exception as error:  # report and go on: the benchmark still runs
            print(f"{check.name:<16}{'error':>8}  FAIL {type(error).__name__}: {str(error)[:120]}")
            all_ok = False
            continue
        ratios = [result[name] for name in ("out", "lse", "dq", "dk", "dv")]
        flags = [name for name, value in result.items() if value is False]
        ok = all(r < 1 for r in ratios) and not flags
        all_ok &= ok
        cells = "".join(f"{r:>8.3f}" if math.isfinite(r) else f"{'inf':>8}" for r in ratios)
        extra = "" if check.dropout_p == 0 else ("; mask reproducible, advances" if not flags
                                                 else f"; failed: {', '.join(flags)}")
        print(f"{check.name:<16}{cells}  {'ok' if ok else 'FAIL'}{extra}")
    return all_ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    import pyflash.backend
    from pyflash.bench import runner

    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else argv
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"pyflash on {name}: backend '{pyflash.backend.name_for(device)}' "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    started = time.perf_counter()
    ok = self_check(device, dtype)
    print(f"self-check {'passed' if ok else 'FAILED'} in {time.perf_counter() - started:.1f}s\n")
    started = time.perf_counter()
    runner.main(bench_args)
    print(f"benchmark done in {time.perf_counter() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
