"""Multi-tensor apply_ / foreach_weighted_sum_: a whole model's parameters in one launch."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import EPS32, OUT_RTOL, kernel_module, make
from tests.helpers import assert_close

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

ak = kernel_module("apply")


def tiny_model(dtype):
    """Embedding, two linears (one with a single-element bias), a LayerNorm: sizes 1 .. 800, none a block multiple."""
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 16), torch.nn.Linear(16, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 1)
    )
    return [p.detach().to(dtype) for p in model.parameters()]


class LaunchCounter:
    """Stands in for the @triton.jit kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def counter(monkeypatch):
    c = LaunchCounter(ak._foreach_weighted_sum_kernel)
    monkeypatch.setattr(ak, "_foreach_weighted_sum_kernel", c)
    return c


def fp32_atol(xs, cs):
    """(K + 1) fp32 roundings of at most EPS32 * sum_k |c_k x_k| each."""
    return (len(xs) + 1) * EPS32 * sum(abs(c) * x.double().abs() for x, c in zip(xs, cs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [None, 16])
def test_apply_whole_model_in_one_launch(dtype, block_size, counter):
    bases = tiny_model(dtype)
    deltas = [[torch.randn_like(b, dtype=torch.float32).to(dtype) for _ in range(3)] for b in bases]
    coeffs = [[float(c) for c in torch.randn(3)] for _ in bases]
    targets = [torch.empty_like(b) for b in bases]
    assert ak.apply_(targets, bases, deltas, coeffs, block_size=block_size) == 1
    assert counter.launches == 1
    expected = [torch.empty_like(b) for b in bases]
    reference.apply_(expected, bases, deltas, coeffs)
    for j, (got, b, ds, cs) in enumerate(zip(targets, bases, deltas, coeffs)):
        atol = fp32_atol([b, *ds], [1.0, *cs])
        exact = b.double() + sum(c * d.double() for d, c in zip(ds, cs))
        assert_close(got, exact, atol=atol, rtol=OUT_RTOL[dtype], what=f"tensor {j} vs float64")
        assert_close(got, expected[j], atol=2 * atol, rtol=OUT_RTOL[dtype], what=f"tensor {j} vs reference")


def test_online_ema_in_place_mixed_dtypes(counter):
    """EMA update ema = beta * ema + (1 - beta) * param, the output aliasing its first input; fp32 EMA of bf16
    params is one launch, and the fp32 LayerNorm params of a mixed model a second one."""
    params = tiny_model(torch.bfloat16)
    params[4], params[5] = params[4].float(), params[5].float()  # LayerNorm in fp32
    ema = [make(p.shape, torch.float32) for p in params]
    before = [e.clone() for e in ema]
    beta = 0.99
    n = ak.foreach_weighted_sum_(ema, [[e, p] for e, p in zip(ema, params)], [[beta, 1 - beta]] * len(ema))
    assert n == counter.launches == 2  # (fp32 <- fp32, bf16) and (fp32 <- fp32, fp32)
    for j, (e, b, p) in enumerate(zip(ema, before, params)):
        exact = beta * b.double() + (1 - beta) * p.double()
        assert_close(e, exact, atol=fp32_atol([b, p], [beta, 1 - beta]), rtol=OUT_RTOL[torch.float32], what=f"{j}")


def test_ragged_inputs_empty_and_non_contiguous(counter):
    outs = [torch.empty(5, 7), torch.empty(0), torch.empty(3)]
    ins = [[make((7, 5), torch.float32).t(), make((5, 7), torch.float32)], [torch.empty(0)], [make((3,), torch.float32)]]
    cs = [[0.5, 0.5], [2.0], [3.0]]
    assert ak.foreach_weighted_sum_(outs, ins, cs) == 2  # K = 2 and K = 1; the empty tensor is skipped
    expected = [torch.empty_like(o) for o in outs]
    reference.foreach_weighted_sum_(expected, ins, cs)
    for got, exp in zip(outs, expected):
        assert_close(got, exp, atol=1e-6, rtol=2.0**-22)  # same fp32 math, last-bit differences only


def test_errors():
    with pytest.raises(KernelError, match=r"^foreach_weighted_sum_: output 0 \(shape \(2, 3\), strides \(1, 2\)\) is"):
        ak.foreach_weighted_sum_([torch.empty(3, 2).t()], [[torch.zeros(2, 3)]], [[1.0]])
    with pytest.raises(KernelError, match=r"^foreach_weighted_sum_: output 0 has 1 inputs and 2 coefficients"):
        ak.foreach_weighted_sum_([torch.empty(3)], [[torch.zeros(3)]], [[1.0, 2.0]])
    with pytest.raises(KernelError, match=r"^foreach_weighted_sum_: input 0 of output 0 has shape \(4,\) on cpu, exp"):
        ak.foreach_weighted_sum_([torch.empty(3)], [[torch.zeros(4)]], [[1.0]])
    with pytest.raises(KernelError, match=r"^apply_: needs one base, one delta list and one coefficient list per t"):
        ak.apply_([torch.empty(3)], [], [], [])
