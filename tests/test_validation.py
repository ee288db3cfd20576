"""Every bad input of SPEC.md section 1: the exception type, a message naming the argument, and the
output buffers (out_, dq_, dk_, dv_) left exactly as they were."""
import re

import pytest
import torch

import pyflash

ERRORS = (ValueError, TypeError, RuntimeError)
SENTINEL = 7.25
DTYPE = torch.bfloat16

FWD = ["q", "k", "v", "out_", "alibi_slopes_", "p_dropout", "softmax_scale", "is_causal",
       "window_size_left", "window_size_right", "return_softmax", "gen_"]
VARLEN_FWD = ["q", "k", "v", "out_", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "alibi_slopes_",
              "max_seqlen_q", "max_seqlen_k", "p_dropout", "softmax_scale", "zero_tensors", "is_causal",
              "window_size_left", "window_size_right", "return_softmax", "gen_"]
BWD = ["dout", "q", "k", "v", "out", "softmax_lse", "dq_", "dk_", "dv_", "alibi_slopes_", "p_dropout",
       "softmax_scale", "is_causal", "window_size_left", "window_size_right", "deterministic",
       "philox_seed", "philox_offset"]
VARLEN_BWD = ["dout", "q", "k", "v", "out", "softmax_lse", "dq_", "dk_", "dv_", "cu_seqlens_q",
              "cu_seqlens_k", "alibi_slopes_", "max_seqlen_q", "max_seqlen_k", "p_dropout", "softmax_scale",
              "zero_tensors", "is_causal", "window_size_left", "window_size_right", "deterministic",
              "philox_seed", "philox_offset"]
B, SQ, SK, H, HK, D = 2, 17, 33, 4, 2, 32


def _sentinel(shape, dtype=DTYPE):
    return torch.full(shape, SENTINEL, dtype=dtype)


def _dense_fwd_args():
    return dict(q=torch.randn(B, SQ, H, D).to(DTYPE), k=torch.randn(B, SK, HK, D).to(DTYPE),
                v=torch.randn(B, SK, HK, D).to(DTYPE), out_=_sentinel((B, SQ, H, D)), alibi_slopes_=None,
                p_dropout=0.0, softmax_scale=D ** -0.5, is_causal=False, window_size_left=-1,
                window_size_right=-1, return_softmax=False, gen_=None)


def _varlen_fwd_args():
    return dict(q=torch.randn(30, H, D).to(DTYPE), k=torch.randn(50, HK, D).to(DTYPE),
                v=torch.randn(50, HK, D).to(DTYPE), out_=_sentinel((30, H, D)),
                cu_seqlens_q=torch.tensor([0, 10, 30], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 20, 50], dtype=torch.int32), seqused_k=None,
                alibi_slopes_=None, max_seqlen_q=20, max_seqlen_k=30, p_dropout=0.0,
                softmax_scale=D ** -0.5, zero_tensors=False, is_causal=False, window_size_left=-1,
                window_size_right=-1, return_softmax=False, gen_=None)


def _bwd_args(fwd_args, varlen):
    fwd = pyflash.mha_varlen_fwd if varlen else pyflash.mha_fwd
    names = VARLEN_FWD if varlen else FWD
    fwd_args = dict(fwd_args, out_=None)
    out, _, _, _, lse, seed, offset, _ = fwd(*[fwd_args[n] for n in names])
    q, k, v = fwd_args["q"], fwd_args["k"], fwd_args["v"]
    args = dict(dout=torch.randn(q.shape).to(DTYPE), q=q, k=k, v=v, out=out, softmax_lse=lse,
                dq_=_sentinel(q.shape), dk_=_sentinel(k.shape), dv_=_sentinel(v.shape),
                alibi_slopes_=None, p_dropout=0.0, softmax_scale=D ** -0.5, is_causal=False,
                window_size_left=-1, window_size_right=-1, deterministic=False,
                philox_seed=seed, philox_offset=offset)
    if varlen:
        args.update(cu_seqlens_q=fwd_args["cu_seqlens_q"], cu_seqlens_k=fwd_args["cu_seqlens_k"],
                    max_seqlen_q=fwd_args["max_seqlen_q"], max_seqlen_k=fwd_args["max_seqlen_k"],
                    zero_tensors=False)
    return args


def _bad_last_dim(t):
    """Same shape and values, last dimension not contiguous."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _rank_up(t):
    return t.unsqueeze(0)


# (id, api, {argument: replacement(args) -> value}, names the message must contain (any of))
CASES = [
    # dtypes
    ("q_int", "fwd", {"q": lambda a: a["q"].to(torch.int32)}, ["q"]),
    ("q_float64", "fwd", {"q": lambda a: a["q"].double(), "k": lambda a: a["k"].double(),
                          "v": lambda a: a["v"].double(), "out_": lambda a: _sentinel(a["out_"].shape, torch.float64)},
     ["q"]),
    ("k_dtype", "fwd", {"k": lambda a: a["k"].half()}, ["k"]),
    ("v_dtype", "fwd", {"v": lambda a: a["v"].float()}, ["v"]),
    ("out_dtype", "fwd", {"out_": lambda a: _sentinel(a["out_"].shape, torch.float16)}, ["out_", "out"]),
    ("not_a_tensor", "fwd", {"k": lambda a: a["k"].tolist()}, ["k"]),
    # device
    ("k_device", "fwd", {"k": lambda a: a["k"].to("meta")}, ["k"]),
    ("alibi_device", "fwd", {"alibi_slopes_": lambda a: torch.rand(H, device="meta")}, ["alibi_slopes"]),
    ("cu_seqlens_device", "varlen_fwd", {"cu_seqlens_k": lambda a: a["cu_seqlens_k"].to("meta")}, ["cu_seqlens_k"]),
    # rank and shape
    ("q_rank", "fwd", {"q": lambda a: a["q"][0]}, ["q"]),
    ("k_rank", "fwd", {"k": lambda a: _rank_up(a["k"])}, ["k"]),
    ("varlen_q_rank", "varlen_fwd", {"q": lambda a: _rank_up(a["q"])}, ["q"]),
    ("k_batch", "fwd", {"k": lambda a: a["k"][:1], "v": lambda a: a["v"][:1]}, ["k"]),
    ("k_head_dim", "fwd", {"k": lambda a: a["k"][..., :16], "v": lambda a: a["v"][..., :16]}, ["k"]),
    ("v_shape", "fwd", {"v": lambda a: a["v"][:, :-1]}, ["v"]),
    ("out_shape", "fwd", {"out_": lambda a: _sentinel((B, SQ + 1, H, D))}, ["out_", "out"]),
    ("varlen_out_shape", "varlen_fwd", {"out_": lambda a: _sentinel((29, H, D))}, ["out_", "out"]),
    ("heads_not_divisible", "fwd", {"k": lambda a: torch.randn(B, SK, 3, D).to(DTYPE),
                                    "v": lambda a: torch.randn(B, SK, 3, D).to(DTYPE)}, ["num_heads", "hk", "k"]),
    ("more_kv_heads", "varlen_fwd", {"k": lambda a: torch.randn(50, 8, D).to(DTYPE),
                                     "v": lambda a: torch.randn(50, 8, D).to(DTYPE)}, ["num_heads", "hk", "k"]),
    ("head_dim_too_big", "fwd", {"q": lambda a: torch.randn(B, SQ, H, 264).to(DTYPE),
                                 "k": lambda a: torch.randn(B, SK, HK, 264).to(DTYPE),
                                 "v": lambda a: torch.randn(B, SK, HK, 264).to(DTYPE),
                                 "out_": lambda a: _sentinel((B, SQ, H, 264))}, ["head dim", "head_dim", "q"]),
    ("head_dim_zero", "fwd", {"q": lambda a: torch.randn(B, SQ, H, 0).to(DTYPE),
                              "k": lambda a: torch.randn(B, SK, HK, 0).to(DTYPE),
                              "v": lambda a: torch.randn(B, SK, HK, 0).to(DTYPE)}, ["head dim", "head_dim", "q"]),
    # contiguity
    ("q_last_dim", "fwd", {"q": lambda a: _bad_last_dim(a["q"])}, ["q"]),
    ("v_last_dim", "varlen_fwd", {"v": lambda a: _bad_last_dim(a["v"])}, ["v"]),
    ("out_last_dim", "fwd", {"out_": lambda a: _bad_last_dim(a["out_"])}, ["out_", "out"]),
    # cu_seqlens
    ("cu_seqlens_q_int64", "varlen_fwd", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].long()}, ["cu_seqlens_q"]),
    ("cu_seqlens_k_float", "varlen_fwd", {"cu_seqlens_k": lambda a: a["cu_seqlens_k"].float()}, ["cu_seqlens_k"]),
    ("cu_seqlens_q_decreasing", "varlen_fwd",
     {"cu_seqlens_q": lambda a: torch.tensor([0, 20, 10], dtype=torch.int32)}, ["cu_seqlens_q"]),
    ("cu_seqlens_k_decreasing", "varlen_fwd",
     {"cu_seqlens_k": lambda a: torch.tensor([0, 30, 25], dtype=torch.int32)}, ["cu_seqlens_k"]),
    ("cu_seqlens_k_length", "varlen_fwd",
     {"cu_seqlens_k": lambda a: torch.tensor([0, 20, 40, 50], dtype=torch.int32)}, ["cu_seqlens_k"]),
    ("cu_seqlens_q_rank", "varlen_fwd", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"][None]}, ["cu_seqlens_q"]),
    ("cu_seqlens_q_past_total", "varlen_fwd",
     {"cu_seqlens_q": lambda a: torch.tensor([0, 10, 31], dtype=torch.int32)}, ["cu_seqlens_q"]),
    ("cu_seqlens_k_not_from_zero", "varlen_fwd",
     {"cu_seqlens_k": lambda a: torch.tensor([3, 20, 50], dtype=torch.int32)}, ["cu_seqlens_k"]),
    ("seqused_k_dtype", "varlen_fwd", {"seqused_k": lambda a: torch.tensor([5, 5])}, ["seqused_k"]),
    ("seqused_k_shape", "varlen_fwd", {"seqused_k": lambda a: torch.tensor([5, 5, 5], dtype=torch.int32)},
     ["seqused_k"]),
    ("seqused_k_too_long", "varlen_fwd", {"seqused_k": lambda a: torch.tensor([21, 5], dtype=torch.int32)},
     ["seqused_k"]),
    ("max_seqlen_q_too_small", "varlen_fwd", {"max_seqlen_q": lambda a: 10}, ["max_seqlen_q"]),
    # dropout
    ("p_dropout_negative", "fwd", {"p_dropout": lambda a: -0.1}, ["p_dropout"]),
    ("p_dropout_one", "fwd", {"p_dropout": lambda a: 1.0}, ["p_dropout"]),
    ("varlen_p_dropout", "varlen_fwd", {"p_dropout": lambda a: 1.5}, ["p_dropout"]),
    ("return_softmax_without_dropout", "fwd", {"return_softmax": lambda a: True}, ["return_softmax"]),
    ("varlen_return_softmax_without_dropout", "varlen_fwd", {"return_softmax": lambda a: True},
     ["return_softmax"]),
    # ALiBi
    ("alibi_fp16", "fwd", {"alibi_slopes_": lambda a: torch.rand(H).half()}, ["alibi_slopes"]),
    ("alibi_fp64", "fwd", {"alibi_slopes_": lambda a: torch.rand(B, H).double()}, ["alibi_slopes"]),
    ("alibi_wrong_heads", "fwd", {"alibi_slopes_": lambda a: torch.rand(H + 1)}, ["alibi_slopes"]),
    ("alibi_kv_heads", "fwd", {"alibi_slopes_": lambda a: torch.rand(HK)}, ["alibi_slopes"]),
    ("alibi_wrong_batch", "fwd", {"alibi_slopes_": lambda a: torch.rand(B + 1, H)}, ["alibi_slopes"]),
    ("alibi_rank3", "varlen_fwd", {"alibi_slopes_": lambda a: torch.rand(1, 2, H)}, ["alibi_slopes"]),
    # windows
    ("window_left", "fwd", {"window_size_left": lambda a: -2}, ["window_size_left"]),
    ("window_right", "fwd", {"window_size_right": lambda a: -5}, ["window_size_right"]),
    ("varlen_window_right", "varlen_fwd", {"window_size_right": lambda a: -3}, ["window_size_right"]),
    # backward
    ("dout_shape", "bwd", {"dout": lambda a: a["dout"][:, :-1]}, ["dout"]),
    ("dout_dtype", "bwd", {"dout": lambda a: a["dout"].float()}, ["dout"]),
    ("dout_last_dim", "bwd", {"dout": lambda a: _bad_last_dim(a["dout"])}, ["dout"]),
    ("out_bwd_shape", "bwd", {"out": lambda a: a["out"][:, :-1]}, ["out"]),
    ("lse_dtype", "bwd", {"softmax_lse": lambda a: a["softmax_lse"].half()}, ["softmax_lse"]),
    ("lse_shape", "bwd", {"softmax_lse": lambda a: a["softmax_lse"][:, :, :-1]}, ["softmax_lse"]),
    ("dq_shape", "bwd", {"dq_": lambda a: _sentinel((B, SQ, H, D + 8))}, ["dq_", "dq"]),
    ("dk_dtype", "bwd", {"dk_": lambda a: _sentinel(a["dk_"].shape, torch.float32)}, ["dk_", "dk"]),
    ("dv_shape", "bwd", {"dv_": lambda a: _sentinel((B, SK, H, D))}, ["dv_", "dv"]),
    ("bwd_heads_not_divisible", "bwd", {"k": lambda a: torch.randn(B, SK, 3, D).to(DTYPE),
                                        "v": lambda a: torch.randn(B, SK, 3, D).to(DTYPE)},
     ["num_heads", "hk", "k"]),
    ("bwd_p_dropout", "bwd", {"p_dropout": lambda a: 1.0}, ["p_dropout"]),
    ("bwd_dropout_without_seed", "bwd", {"p_dropout": lambda a: 0.1, "philox_seed": lambda a: None}, ["philox_seed"]),
    ("varlen_bwd_dropout_without_offset", "varlen_bwd", {"p_dropout": lambda a: 0.1, "philox_offset": lambda a: None},
     ["philox_offset"]),
    ("bwd_alibi_shape", "bwd", {"alibi_slopes_": lambda a: torch.rand(H, 1)}, ["alibi_slopes"]),
    ("bwd_window", "bwd", {"window_size_left": lambda a: -7}, ["window_size_left"]),
    ("varlen_bwd_cu_seqlens", "varlen_bwd", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].long()}, ["cu_seqlens_q"]),
    ("varlen_bwd_lse_shape", "varlen_bwd", {"softmax_lse": lambda a: a["softmax_lse"].t().contiguous()},
     ["softmax_lse"]),
    ("varlen_bwd_dk_shape", "varlen_bwd", {"dk_": lambda a: _sentinel((49, HK, D))}, ["dk_", "dk"]),
    ("varlen_bwd_dout_rank", "varlen_bwd", {"dout": lambda a: _rank_up(a["dout"])}, ["dout"]),
]


def _call(api):
    if api == "fwd":
        return pyflash.mha_fwd, FWD, _dense_fwd_args()
    if api == "varlen_fwd":
        return pyflash.mha_varlen_fwd, VARLEN_FWD, _varlen_fwd_args()
    if api == "bwd":
        return pyflash.mha_bwd, BWD, _bwd_args(_dense_fwd_args(), False)
    return pyflash.mha_varlen_bwd, VARLEN_BWD, _bwd_args(_varlen_fwd_args(), True)


def _names_argument(message, names):
    return any(re.search(r"(?<![A-Za-z0-9])" + re.escape(n) + r"(?![A-Za-z0-9])", message) for n in names)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, api, replacements, names = case
    torch.manual_seed(0)
    fn, order, args = _call(api)
    for name, make in replacements.items():
        args[name] = make(args)
    buffers = {n: args[n] for n in ("out_", "dq_", "dk_", "dv_") if isinstance(args.get(n), torch.Tensor)}
    before = {n: b.clone() for n, b in buffers.items()}
    with pytest.raises(ERRORS) as info:
        fn(*[args[n] for n in order])
    message = str(info.value)
    assert _names_argument(message, names), f"message {message!r} names none of {names}"
    for n, b in buffers.items():
        if b.device.type != "meta":
            assert torch.equal(b, before[n]), f"{n} was written although validation failed"


@pytest.mark.parametrize("api", ["fwd", "varlen_fwd", "bwd", "varlen_bwd"])
def test_good_input_passes(api):
    """The baseline arguments the bad cases start from are themselves valid, and fill the buffers."""
    torch.manual_seed(0)
    fn, order, args = _call(api)
    res = fn(*[args[n] for n in order])
    for n in ("out_", "dq_", "dk_", "dv_"):
        if n in args:
            assert not torch.equal(args[n], _sentinel(args[n].shape)), f"{n} was not written"
    assert all(isinstance(t, torch.Tensor) for t in res)


@pytest.mark.parametrize("api", ["bwd", "varlen_bwd"])
def test_backward_without_rng_state_when_no_dropout(api):
    """philox_seed / philox_offset may be None without dropout (flash_attn passes no rng state then): the same
    gradients as with the forward's."""
    torch.manual_seed(0)
    fn, order, args = _call(api)
    with_state = [t.clone() for t in fn(*[args[n] for n in order])[:3]]
    args.update(philox_seed=None, philox_offset=None)
    without = fn(*[args[n] for n in order])[:3]
    for a, b in zip(with_state, without):
        assert torch.equal(a, b)


def test_unknown_keyword_rejected():
    args = _dense_fwd_args()
    with pytest.raises(TypeError):
        pyflash.mha_fwd(*[args[n] for n in FWD], not_an_option=1)


@pytest.mark.parametrize("softcap", [-1.0, float("inf"), float("nan")])
def test_bad_softcap(softcap):
    args = _dense_fwd_args()
    before = args["out_"].clone()
    with pytest.raises(ERRORS, match="softcap"):
        pyflash.mha_fwd(*[args[n] for n in FWD], softcap=softcap)
    assert torch.equal(args["out_"], before)
