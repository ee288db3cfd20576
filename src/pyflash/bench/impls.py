"""The contenders: pyflash (through ``pyflash.api``) and the peers a user would pick instead.

Each implementation turns a case's shared inputs into a :class:`Runner` (untimed setup: layouts,
masks, compilation) whose methods are the timed calls:

- ``forward()``: the forward alone (no autograd graph).
- ``make_backward()``: runs one forward that records what the backward needs (untimed) and returns
  the timed callable doing the backward alone.
- ``forward_backward()``: forward then backward.

A peer that cannot run a case raises; the harness shows it as '-' and goes on.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from pyflash.bench.cases import Case, Inputs


class Runner:
    notes: Dict[str, object]  # what the setup found out (goes into the JSON row)

    def forward(self):
        raise NotImplementedError

    def make_backward(self) -> Callable[[], object]:
        raise NotImplementedError

    def forward_backward(self):
        raise NotImplementedError

    def output(self) -> torch.Tensor:
        """Forward output in pyflash's layout ((b, s, h, d) or packed (total, h, d)), untimed."""
        raise NotImplementedError


class PyflashRunner(Runner):
    """``pyflash.api.mha_fwd``/``mha_bwd`` (or the varlen pair) with the seed's positional order."""

    def __init__(self, case: Case, inputs: Inputs):
        from pyflash import api

        self.api, self.case, self.inputs = api, case, inputs
        self.notes = {}

    def _fwd(self):
        case, x = self.case, self.inputs
        if case.is_varlen:
            return self.api.mha_varlen_fwd(
                x.q, x.k, x.v, None, x.cu_seqlens, x.cu_seqlens, None, None, case.seqlen, case.seqlen,
                case.dropout_p, case.softmax_scale, False, case.causal, case.window_left, case.window_right,
                False, None)
        return self.api.mha_fwd(x.q, x.k, x.v, None, None, case.dropout_p, case.softmax_scale, case.causal,
                                case.window_left, case.window_right, False, None)

    def _bwd(self, fwd_result):
        case, x = self.case, self.inputs
        out, softmax_lse, seed, offset = fwd_result[0], fwd_result[4], fwd_result[5], fwd_result[6]
        if case.is_varlen:
            return self.api.mha_varlen_bwd(
                x.dout, x.q, x.k, x.v, out, softmax_lse, None, None, None, x.cu_seqlens, x.cu_seqlens, None,
                case.seqlen, case.seqlen, case.dropout_p, case.softmax_scale, False, case.causal,
                case.window_left, case.window_right, False, seed, offset)
        return self.api.mha_bwd(x.dout, x.q, x.k, x.v, out, softmax_lse, None, None, None, None,
                                case.dropout_p, case.softmax_scale, case.causal, case.window_left,
                                case.window_right, False, seed, offset)

    def forward(self):
        return self._fwd()

    def make_backward(self):
        saved = self._fwd()
        return lambda: self._bwd(saved)

    def forward_backward(self):
        return self._bwd(self._fwd())

    def output(self):
        return self._fwd()[0]


class AutogradRunner(Runner):
    """A peer written as a differentiable ``attend(q, k, v)`` on its own layout of the inputs."""

    def __init__(self, attend: Callable, q, k, v, dout, to_pyflash_layout: Callable,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.attend, self.dout, self.to_pyflash_layout, self.context = attend, dout, to_pyflash_layout, context
        self.q, self.k, self.v = q, k, v
        self.q_grad, self.k_grad, self.v_grad = (t.detach().clone().requires_grad_() for t in (q, k, v))
        self.notes = {}

    def _attend(self, q, k, v):
        with self.context():
            return self.attend(q, k, v)

    def forward(self):
        with torch.no_grad():
            return self._attend(self.q, self.k, self.v)

    def make_backward(self):
        leaves = (self.q_grad, self.k_grad, self.v_grad)
        out = self._attend(*leaves)
        return lambda: torch.autograd.grad(out, leaves, self.dout, retain_graph=True)

    def forward_backward(self):
        leaves = (self.q_grad, self.k_grad, self.v_grad)
        return torch.autograd.grad(self._attend(*leaves), leaves, self.dout)

    def output(self):
        return self.to_pyflash_layout(self.forward())


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """(b, s, h, d) -> contiguous (b, h, s, d): the layout SDPA and FlexAttention are tuned for."""
    return t.transpose(1, 2).contiguous()


def _seq_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _window_mask(case: Case, device) -> Optional[torch.Tensor]:
    if case.window_left < 0:
        return None
    rows = torch.arange(case.seqlen, device=device)[:, None]
    cols = torch.arange(case.seqlen, device=device)[None, :]
    return (cols <= rows) & (cols >= rows - case.window_left)


def _packed_op(backend: Optional[str], case: Case, inputs: Inputs) -> Optional[Callable]:
    """The backend's own op on pyflash's layout where SDPA has no way to say what the case needs:
    varlen through ``cu_seqlens`` (as ``flash_attn_varlen_func`` users call it; SDPA's nested tensors
    allow no ``is_causal`` and add preprocessing) and FlashAttention-2's native sliding window.
    These are the ops SDPA itself dispatches to, differentiable. None: plain SDPA handles the case."""
    aten = torch.ops.aten
    scale, p, causal, length = case.softmax_scale, case.dropout_p, case.causal, case.seqlen
    if case.is_varlen:
        cu = inputs.cu_seqlens
        if backend == "FLASH_ATTENTION":
            return lambda q, k, v: aten._flash_attention_forward(
                q, k, v, cu, cu, length, length, p, causal, False, scale=scale)[0]
        if backend == "EFFICIENT_ATTENTION":  # batch of one packed sequence; mask type 1: causal
            return lambda q, k, v: aten._efficient_attention_forward(
                q[None], k[None], v[None], None, cu, cu, length, length, p, int(causal),
                q.requires_grad and torch.is_grad_enabled(), scale=scale)[0][0]
        if backend == "CUDNN_ATTENTION":
            return lambda q, k, v: aten._cudnn_attention_forward(
                q, k, v, None, cu, cu, length, length, q.requires_grad and torch.is_grad_enabled(), p,
                causal, False, scale=scale)[0]
    elif case.window_left >= 0 and backend == "FLASH_ATTENTION":
        return lambda q, k, v: aten._flash_attention_forward(
            q, k, v, None, None, length, length, p, causal, False, scale=scale,
            window_size_left=case.window_left, window_size_right=case.window_right)[0]
    return None


class SdpaPeer:
    """``F.scaled_dot_product_attention`` forced to one backend (None: PyTorch's own choice).

    GQA goes through ``enable_gqa``; sliding windows as a boolean ``attn_mask`` (what a user of SDPA
    has to do), except FlashAttention-2's native window; varlen through the backend's ``cu_seqlens``
    op (:func:`_packed_op`), or jagged nested tensors for the default and math backends."""

    def __init__(self, name: str, label: str, backend: Optional[str]):
        self.name, self.label, self.backend = name, label, backend

    def _context(self):
        if self.backend is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(getattr(SDPBackend, self.backend))

    def prepare(self, case: Case, inputs: Inputs) -> Runner:
        mask = _window_mask(case, inputs.q.device)
        # With an explicit mask the causal part is in the mask already.
        is_causal = case.causal and mask is None
        kwargs = dict(dropout_p=case.dropout_p, is_causal=is_causal, scale=case.softmax_scale)
        if case.num_heads != case.num_heads_k:
            kwargs["enable_gqa"] = True
        if mask is not None:
            kwargs["attn_mask"] = mask

        packed_op = _packed_op(self.backend, case, inputs)
        if packed_op is not None:
            return AutogradRunner(packed_op, inputs.q, inputs.k, inputs.v, inputs.dout, lambda t: t)
        if case.is_varlen:
            if case.causal:
                raise NotImplementedError("SDPA on nested (jagged) tensors has no is_causal")
            offsets = inputs.cu_seqlens.to(torch.int64)
            lengths = case.seqlens

            def nested(values):
                return torch.nested.nested_tensor_from_jagged(
                    values, offsets, min_seqlen=min(lengths), max_seqlen=max(lengths)).transpose(1, 2)

            def attend(q, k, v):
                out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), **kwargs)
                return out.transpose(1, 2).values()

            return AutogradRunner(attend, inputs.q, inputs.k, inputs.v, inputs.dout, lambda t: t,
                                  self._context)

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

        return AutogradRunner(attend, _heads_first(inputs.q), _heads_first(inputs.k), _heads_first(inputs.v),
                              _heads_first(inputs.dout), _seq_first, self._context)


UNFUSED_KERNEL_MARKS = ("gemm", "xmma", "nvjet", "cutlass", "softmax")


def _raise_dynamo_limits() -> None:
    """Every shape compiles its own graph: raise dynamo's recompile limits (named differently across
    torch versions) and make hitting one an error instead of a silent fall back to eager."""
    import torch._dynamo.config as dynamo_config

    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024),
                        ("accumulated_recompile_limit", 65536), ("accumulated_cache_size_limit", 65536),
                        ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True)):
        with contextlib.suppress(AttributeError, KeyError):
            setattr(dynamo_config, name, value)


class FlexPeer:
    """FlexAttention under ``torch.compile``, compiled once per shape.

    How we know it did not fall back to the unfused path (14 TFLOP/s on an H100): (1) compiled with
    ``fullgraph=True`` and ``fail_on_recompile_limit_hit``, so a graph break or a hit recompile limit
    raises instead of running eager; (2) dynamo is reset before each shape and its graph counter must
    grow when the shape is first called; (3) on CUDA one profiled forward must launch Triton kernels
    and no GEMM/softmax kernel (the unfused path is bmm + softmax + bmm). The kernel names go into
    the JSON (``notes``)."""

    name, label = "flex", "Flex"

    def __init__(self):
        _raise_dynamo_limits()
        from torch.nn.attention.flex_attention import flex_attention

        self.compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)

    def _block_mask(self, case: Case, inputs: Inputs):
        from torch.nn.attention.flex_attention import create_block_mask

        device = inputs.q.device
        left = case.window_left
        if case.is_varlen:
            lengths = torch.tensor(case.seqlens, device=device)
            document = torch.repeat_interleave(torch.arange(len(case.seqlens), device=device), lengths)
            causal = case.causal

            def mask_mod(b, h, q_idx, kv_idx):
                same = document[q_idx] == document[kv_idx]
                return same & (q_idx >= kv_idx) if causal else same

            length = int(lengths.sum())
        elif case.causal:
            def mask_mod(b, h, q_idx, kv_idx):
                seen = q_idx >= kv_idx
                return seen & (q_idx - kv_idx <= left) if left >= 0 else seen

            length = case.seqlen
        else:
            return None
        return create_block_mask(mask_mod, None, None, length, length, device=device)

    def prepare(self, case: Case, inputs: Inputs) -> Runner:
        if case.dropout_p > 0:
            raise NotImplementedError("flex_attention has no dropout")
        if case.window_left >= 0 and not case.causal:
            raise NotImplementedError("non-causal windows are not benchmarked with flex")
        from torch._dynamo.utils import counters

        torch._dynamo.reset()  # this shape compiles afresh, whatever ran before
        block_mask = self._block_mask(case, inputs)
        kwargs = dict(block_mask=block_mask, scale=case.softmax_scale,
                      enable_gqa=case.num_heads != case.num_heads_k)

        if case.is_varlen:
            def packed(values):  # (total, h, d) -> (1, h, total, d)
                return values.transpose(0, 1).unsqueeze(0).contiguous()

            def attend(q, k, v):
                return self.compiled(q, k, v, **kwargs)

            runner = AutogradRunner(attend, packed(inputs.q), packed(inputs.k), packed(inputs.v),
                                    packed(inputs.dout), lambda t: t[0].transpose(0, 1))
        else:
            def attend(q, k, v):
                return self.compiled(q, k, v, **kwargs)

            runner = AutogradRunner(attend, _heads_first(inputs.q), _heads_first(inputs.k),
                                    _heads_first(inputs.v), _heads_first(inputs.dout), _seq_first)

        graphs_before = counters["stats"]["unique_graphs"]
        runner.forward()
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        if graphs < 1:
            raise RuntimeError("flex_attention was not compiled for this shape (eager fallback)")
        runner.notes = {"flex_graphs_compiled": graphs}
        if inputs.q.is_cuda:
            names = _cuda_kernel_names(runner.forward)
            unfused = sorted({n for n in names if any(m in n.lower() for m in UNFUSED_KERNEL_MARKS)})
            if unfused or not any(n.startswith("triton") for n in names):
                raise RuntimeError(f"flex_attention fell back to the unfused path: {unfused or names}")
            runner.notes["flex_kernels"] = sorted(set(names))
        return runner


def _cuda_kernel_names(fn: Callable) -> List[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


class PyflashImpl:
    name, label = "pyflash", "pyflash"

    def prepare(self, case: Case, inputs: Inputs) -> Runner:
        return PyflashRunner(case, inputs)


PEERS = {
    "fa2": lambda: SdpaPeer("fa2", "FA2", "FLASH_ATTENTION"),
    "cudnn": lambda: SdpaPeer("cudnn", "cuDNN", "CUDNN_ATTENTION"),
    "efficient": lambda: SdpaPeer("efficient", "Efficient", "EFFICIENT_ATTENTION"),
    "flex": FlexPeer,
    "sdpa": lambda: SdpaPeer("sdpa", "SDPA", None),
    "math": lambda: SdpaPeer("math", "Math", "MATH"),
}
GPU_PEERS = ("fa2", "cudnn", "efficient", "flex")
CPU_PEERS = ("sdpa",)
