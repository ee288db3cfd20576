"""Host-side helpers of kernels/common.py: the same values as Triton's own, the table lookup rule."""
import triton

from pyflash.kernels.common import cdiv, next_power_of_2, tuned_generation


def test_int_helpers_match_triton():
    for n in range(0, 2100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_tuned_generation():
    generations = [8, 9]
    assert tuned_generation(0, generations) == 0  # the interpreter's rows
    assert tuned_generation(7, generations) == 8  # older GPUs: the oldest tuned rows
    assert tuned_generation(8, generations) == 8
    assert tuned_generation(9, generations) == 9
    assert tuned_generation(12, generations) == 9  # newer GPUs: the newest tuned rows
