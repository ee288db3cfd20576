"""The Triton backend: ``forward`` and ``backward`` per the backend contract (DEVELOPERS.md)."""


def forward(q, k, v, out, softmax_lse, p, params, seqlens) -> None:
    from pyflash.kernels.forward import forward as run

    run(q, k, v, out, softmax_lse, p, params, seqlens)


def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, deterministic) -> None:
    from pyflash.kernels.backward import backward as run

    run(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_d, params, seqlens, deterministic)
