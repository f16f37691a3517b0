"""TIES kernel against an independent float64 TIES and reference.ties."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, SHAPES, kernel_module, make
from tests.helpers import assert_close

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

tk = kernel_module("ties")


def ties64(deltas, weights, densities, normalize):
    """TIES in float64 from the paper's steps: keep the top-k |delta| (ties at the k-th kept), elect the sign
    of the weighted sum, average (or sum) the weighted values that agree with it."""
    kept = []
    for d, w, rho in zip(deltas, weights, densities):
        d = d.to(torch.float64).reshape(-1)
        k = int(rho * d.numel())
        thr = math.inf if k <= 0 else 0.0 if k >= d.numel() else d.abs().sort(descending=True).values[k - 1]
        kept.append(torch.where(d.abs() >= thr, d, 0.0) * w)
    s = torch.stack(kept)
    elected = s.sum(0).sign()
    agree = (s.sign() == elected) & (s != 0)
    merged = (s * agree).sum(0)
    wsum = (agree * torch.tensor(weights, dtype=torch.float64)[:, None]).sum(0)
    if normalize:
        merged = torch.where(wsum == 0, merged, merged / wsum)
    return merged, s


def tolerance(s, dtype, normalize):
    """fp32 sums of N terms: (N + 1) roundings of at most EPS32 * sum|terms|; the division adds one EPS32
    relative (and scales the absolute error by 1/|divisor|, which is >= 1/max|w| ... we divide it in)."""
    atol = (s.shape[0] + 1) * EPS32 * s.abs().sum(0)
    return atol, OUT_RTOL[dtype] + (2 * EPS32 if normalize else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_models", [1, 3, 9])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_and_reference(dtype, shape, n_models, normalize):
    deltas = [make(shape, dtype) for _ in range(n_models)]
    weights = [float(w) for w in torch.rand(n_models) + 0.5]  # in [0.5, 1.5): |divisor| >= 0.5 when any agree
    densities = [0.2, 0.5, 1.0, 0.0, 0.7, 0.3, 0.9, 0.4, 0.6][:n_models] if n_models > 1 else [0.5]
    got = tk.ties(deltas, weights, densities, normalize, block_size=128)
    expected, s = ties64(deltas, weights, densities, normalize)
    atol, rtol = tolerance(s, dtype, normalize)
    atol = atol / (0.5 if normalize else 1.0) + OUT_ATOL[dtype]  # the sum's error divided by a divisor >= 0.5
    assert_close(got.reshape(-1), expected, atol=atol, rtol=rtol, what="vs float64")
    ref = reference.ties(deltas, weights, densities, normalize)
    assert_close(got, ref, atol=2 * atol.view(shape), rtol=rtol, what="vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_threshold_equals_reference(dtype, density):
    x = make((33, 65), dtype)
    x.view(-1)[:40] = x.view(-1)[40]  # ties at many magnitudes
    assert tk.magnitude_threshold(x, density) == reference.magnitude_threshold(x, density)


def test_density_zero_gives_zeros_and_errors():
    d = [make((100,), torch.float32) for _ in range(2)]
    assert torch.equal(tk.ties(d, [1.0, 1.0], 0.0), torch.zeros(100))
    assert tk.ties([torch.empty(0)], [1.0], 0.5).shape == (0,)
    nc = [make((33, 65), torch.float32, contiguous=False) for _ in range(2)]
    assert_close(tk.ties(nc, [1.0, 2.0], 0.5), reference.ties([t.contiguous() for t in nc], [1.0, 2.0], 0.5),
                 atol=1e-6, rtol=2.0**-22)  # fp32 vs fp32, same order: last-bit differences only
    with pytest.raises(KernelError, match=r"^ties: needs one weight and one density per task vector, got 2 task"):
        tk.ties(d, [1.0], 0.5)
    with pytest.raises(KernelError, match=r"^ties: density must be in \[0, 1\], got 1.5$"):
        tk.ties(d, [1.0, 1.0], 1.5)
