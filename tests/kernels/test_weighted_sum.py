"""weighted_sum kernel (direct arguments for N <= 8, pointer table beyond) against a float64 sum and the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, SHAPES, kernel_module, make
from tests.helpers import assert_close

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

ws = kernel_module("weighted_sum")


def fp32_sum_atol(xs, cs):
    """Error bound of an fp32 sum of N products: (N + 1) roundings, each <= EPS32 * sum_i |c_i x_i|."""
    terms = sum(abs(c) * x.to(torch.float64).abs() for x, c in zip(xs, cs))
    return (len(xs) + 1) * EPS32 * terms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_inputs", [1, 2, 3, 8, 11])
@pytest.mark.parametrize("block_size", [None, 128])
def test_matches_float64_and_reference(dtype, shape, n_inputs, block_size):
    xs = [make(shape, dtype) for _ in range(n_inputs)]
    cs = [float(c) for c in torch.randn(n_inputs)]
    got = ws.weighted_sum(xs, cs, block_size=block_size)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    expected = sum(c * x.to(torch.float64) for x, c in zip(xs, cs))
    atol = fp32_sum_atol(xs, cs) + OUT_ATOL[dtype]
    assert_close(got, expected, atol=atol, rtol=OUT_RTOL[dtype], what="vs float64")
    # Two fp32 evaluations (ours, the reference) each within the bound above of the exact value.
    assert_close(got, reference.weighted_sum(xs, cs), atol=2 * atol, rtol=OUT_RTOL[dtype], what="vs reference")


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_out_dtype_and_mixed_inputs(in_dtype, out_dtype):
    xs = [make((1000,), torch.float32), make((1000,), in_dtype), make((1000,), torch.float16)]
    cs = [0.5, -0.25, 2.0]
    got = ws.weighted_sum(xs, cs, out_dtype)
    assert got.dtype == out_dtype
    expected = sum(c * x.to(torch.float64) for x, c in zip(xs, cs))
    assert_close(got, expected, atol=fp32_sum_atol(xs, cs), rtol=OUT_RTOL[out_dtype], what="mixed dtypes")


@pytest.mark.parametrize("shape", [(33, 65), (1000,)])
def test_non_contiguous_inputs(shape):
    xs = [make(shape, torch.float32, contiguous=False) for _ in range(3)]
    assert not xs[0].is_contiguous()
    cs = [0.3, 0.3, 0.4]
    expected = sum(c * x.to(torch.float64) for x, c in zip(xs, cs))
    assert_close(ws.weighted_sum(xs, cs), expected, atol=fp32_sum_atol(xs, cs), rtol=OUT_RTOL[torch.float32])


def test_out_aliases_first_input():
    """The EMA pattern: write the result over an input (every element is read before it is written)."""
    x, y = make((1000,), torch.float32), make((1000,), torch.float32)
    expected = 0.9 * x.to(torch.float64) + 0.1 * y.to(torch.float64)
    atol = fp32_sum_atol([x, y], [0.9, 0.1])
    got = ws.weighted_sum([x, y], [0.9, 0.1], out=x, block_size=128)
    assert got is x
    assert_close(x, expected, atol=atol, rtol=OUT_RTOL[torch.float32])


@pytest.mark.parametrize("shape", [(0,), (0, 7)])
def test_empty_tensor_launches_nothing(shape, monkeypatch):
    monkeypatch.setattr(ws, "_weighted_sum_kernel", None)  # a launch would fail
    got = ws.weighted_sum([torch.empty(shape), torch.empty(shape)], [1.0, 2.0])
    assert got.shape == torch.Size(shape)


def test_errors_name_the_problem():
    x = torch.zeros(4)
    with pytest.raises(KernelError, match=r"^weighted_sum: needs as many coefficients as inputs, got 2 inputs and 1"):
        ws.weighted_sum([x, x], [1.0])
    with pytest.raises(KernelError, match=r"^weighted_sum: input 1 has shape \(5,\) but input 0 has \(4,\)$"):
        ws.weighted_sum([x, torch.zeros(5)], [1.0, 1.0])
    with pytest.raises(KernelError, match=r"^weighted_sum: input 1 has dtype float64; the Triton kernels take"):
        ws.weighted_sum([x, x.double()], [1.0, 1.0])
    with pytest.raises(KernelError, match=r"^weighted_sum: out \(shape \(2, 3\), strides \(1, 2\)\) is not contig"):
        ws.weighted_sum([torch.zeros(2, 3)], [1.0], out=torch.zeros(3, 2).t())
    with pytest.raises(KernelError, match=r"^weighted_sum: BLOCK_SIZE=100 must be a power of two in \[16, 65536\]$"):
        ws.weighted_sum([x], [1.0], block_size=100)
