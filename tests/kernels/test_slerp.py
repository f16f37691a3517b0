"""SLERP: reduction pass + host coefficients + weighted sum, against float64 SLERP and reference.slerp."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, kernel_module, make
from tests.helpers import assert_close

from mergekit_safe.kernels import reference

sk = kernel_module("slerp")


def slerp64(a, b, t):
    a, b = a.to(torch.float64), b.to(torch.float64)
    na, nb = a.norm().item(), b.norm().item()
    if na < 1e-8 or nb < 1e-8:
        return (1 - t) * a + t * b
    cos = (a * b).sum().item() / (na * nb)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def atol_for(a, b):
    """Block sums in fp32 are tree sums (12 levels for 4096 elements): |error| <= 12 * EPS32 * sum|terms|, so cos
    is off by <= ~3 * 12 * EPS32 ~ 2**-19; for cos ~ 0.6 (sin ~ 0.8) the coefficients move by <= ~2.5x that,
    2**-17.7. Allow 2**-16 * (|a| + |b|) elementwise, plus the fp32 combine (3 roundings)."""
    mag = a.to(torch.float64).abs() + b.to(torch.float64).abs()
    return (2.0**-16 + 3 * EPS32) * mag


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1000,), (2048,), (33, 65)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_matches_float64_and_reference(dtype, shape, t):
    a = make(shape, torch.float32)
    b = (0.6 * a + 0.8 * torch.randn(shape)).to(dtype)
    a = a.to(dtype)
    got = sk.slerp(a, b, t, block_size=128)
    atol = atol_for(a, b) + OUT_ATOL[dtype]
    assert_close(got, slerp64(a, b, t), atol=atol, rtol=OUT_RTOL[dtype], what="vs float64")
    assert_close(got, reference.slerp(a, b, t), atol=2 * atol, rtol=OUT_RTOL[dtype], what="vs reference")


def test_stats_match_float64():
    a, b = make((3000,), torch.bfloat16), make((3000,), torch.bfloat16)
    dot, na, nb = sk.slerp_stats(a, b, block_size=256)
    a64, b64 = a.double(), b.double()
    bound = 8 * EPS32 * (a64 * b64).abs().sum().item()  # tree of 8 levels per 256-element block
    assert abs(dot - (a64 * b64).sum().item()) <= bound
    assert abs(na - a64.norm().item()) <= 8 * EPS32 * a64.norm().item()
    assert abs(nb - b64.norm().item()) <= 8 * EPS32 * b64.norm().item()


@pytest.mark.parametrize("case", ["parallel", "zero", "single"])
def test_lerp_fallbacks(case):
    a = make((1,) if case == "single" else (500,), torch.float32)
    b = 2 * a if case in ("parallel", "single") else torch.zeros_like(a)
    expected = 0.7 * a.double() + 0.3 * b.double()
    assert_close(sk.slerp(a, b, 0.3), expected, atol=3 * EPS32 * (a.double().abs() + b.double().abs()), rtol=0)


def test_empty_and_non_contiguous():
    assert sk.slerp(torch.empty(0), torch.empty(0), 0.5).shape == (0,)
    a, b = make((33, 65), torch.float32, contiguous=False), make((33, 65), torch.float32, contiguous=False)
    assert_close(sk.slerp(a, b, 0.4), slerp64(a, b, 0.4), atol=atol_for(a, b), rtol=OUT_RTOL[torch.float32])
