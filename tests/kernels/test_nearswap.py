"""NearSwap kernel against a float64 elementwise reference and reference.nearswap, for every dtype and shape."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, SHAPES, kernel_module, make

from tests.helpers import assert_close

from mergekit_safe.kernels import reference

nk = kernel_module("nearswap")


def nearswap64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    x, y = a.double(), b.double()
    w = torch.clamp(t / torch.clamp((x - y).abs(), min=1e-6), 0.0, 1.0)
    return w * y + (1 - w) * x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.05, 0.5, 10.0])
def test_matches_float64_and_reference(dtype: torch.dtype, shape: tuple[int, ...], t: float) -> None:
    a = make(shape, dtype)
    b = (a.float() + 0.2 * torch.randn(shape)).to(dtype)
    got = nk.nearswap(a, b, t, block_size=128)
    # fp32 math: the weight (one divide, two clamps) and the blend (3 roundings) each add ~EPS32 relative to
    # |a| + |b|; then one rounding to the output dtype.
    atol = 6 * EPS32 * (a.double().abs() + b.double().abs()) + OUT_ATOL[dtype]
    assert_close(got, nearswap64(a, b, t), atol=atol, rtol=OUT_RTOL[dtype], what="vs float64")
    assert_close(got, reference.nearswap(a, b, t), atol=2 * atol, rtol=OUT_RTOL[dtype], what="vs reference")


def test_equal_inputs_and_empty_and_out() -> None:
    a = make((1000,), torch.float32)
    assert torch.equal(nk.nearswap(a, a.clone(), 0.1), a)  # |a - b| = 0: the floor keeps w finite (w = 1)
    empty = torch.empty(0)
    assert nk.nearswap(empty, empty, 0.1).numel() == 0
    b = a + 1.0
    out = torch.empty_like(a)
    assert nk.nearswap(a, b, 0.25, out=out) is out
    assert_close(out, a + 0.25, atol=4 * EPS32 * (a.abs() + 1), what="moves t towards b when farther than t")


def test_dispatcher_uses_the_kernel_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_safe import kernels

    monkeypatch.setenv("MERGEKIT_SAFE_BACKEND", "triton")
    a, b = make((33, 65), torch.bfloat16), make((33, 65), torch.bfloat16)
    assert torch.equal(kernels.nearswap(a, b, 0.3), nk.nearswap(a, b, 0.3))
