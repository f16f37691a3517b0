"""SCE apply kernel against an independent float64 SCE step and the torch path; its cut mask is exact."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, kernel_module, make
from tests.helpers import assert_close

import mergekit_safe.kernels as K
from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

sk = kernel_module("sce")
# one element, and a 2-D shape whose 2145 elements are no multiple of the block (128)
SHAPES = [(1,), (33, 65)]


def cut64(var, k):
    """Keep the k largest variances, ties at the k-th taken in flat-index order (a stable sort, descending)."""
    order = sorted(range(var.numel()), key=lambda i: (-float(var.view(-1)[i]), i))
    keep = torch.zeros(var.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(var.shape)


def sce64(base, models, weights, keep):
    """SCE's step from its definition in float64: tau times the cut, sign of the unweighted sum (+ at zero),
    sum of w_i tau_i over the agreeing entries over max(sum of their w_i, 1e-6), plus the base."""
    tau = torch.stack([m.double() - base.double() for m in models]) * keep
    plus = tau.sum(0) >= 0
    agree = torch.where(plus, tau > 0, tau < 0)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.dim())
    num, den = (tau * w * agree).sum(0), (w * agree).sum(0)
    return base.double() + num / den.clamp(min=1e-6), tau


def inputs(shape, dtype, n=3):
    base = make(shape, dtype)
    models = [(base.float() + 0.1 * torch.randn(shape)).to(dtype) for _ in range(n)]
    var = torch.stack([m.float() - base.float() for m in models]).var(0, unbiased=False).abs()
    return base, models, var


def key_and_cutoff(var, k):
    """The cut's constants as sparsify computes them: the k-th largest variance's bits and the tie bound."""
    kth = var.reshape(-1).sort(descending=True).values[k - 1]
    key = int(reference.float_key(kth.reshape(1)))
    above = int((reference.float_key(var) > key).sum())
    ties = (reference.float_key(var).reshape(-1) == key).nonzero().reshape(-1)
    return key, int(ties[k - above - 1]) + 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cut", [False, True])
def test_matches_float64_and_torch_path(dtype, shape, cut):
    base, models, var = inputs(shape, dtype)
    weights = [0.2, 0.5, 0.3]
    k = max(1, var.numel() // 3)
    key, cutoff = key_and_cutoff(var, k) if cut else (0, 0)
    got = sk.sce_merge(base, models, weights, var if cut else None, key, cutoff, block_size=128)
    keep = cut64(var, k) if cut else torch.ones(shape, dtype=torch.bool)
    expected, tau = sce64(base, models, weights, keep)
    # fp32: tau rounds once, w * tau once, the N-term sums N times (of sum |w tau| and of sum w), the division
    # once and + base once; the summed agreeing weights are >= 0.2 (or the entry is 0), so the sum's absolute
    # error is divided by at most 0.2. Then the output rounding.
    atol = (len(models) + 4) * EPS32 * (tau.abs().sum(0) / 0.2 + base.double().abs()) + OUT_ATOL[dtype]
    assert_close(got, expected, atol=atol, rtol=OUT_RTOL[dtype], what="vs float64")
    torch_path = K.sce_merge(base, models, weights, var if cut else None, key, cutoff)
    assert_close(got, torch_path, atol=2 * atol, rtol=OUT_RTOL[dtype], what="vs torch path")


@pytest.mark.parametrize("start", [0, 700])
def test_cut_mask_equals_the_torch_path_exactly(start):
    """One model, weight 1, base 0: the output is the model where the cut keeps it; ties at the k-th variance
    are cut at a flat index, offset by the chunk's start."""
    var = torch.rand(1000)
    var[100:400] = var[50]  # 300 entries tied at one variance
    var[10] = float("inf")
    model = make((1000,), torch.float32)
    key = int(reference.float_key(var[50].reshape(1)))
    for cutoff in (start, start + 200, start + 1000):
        got = sk.sce_merge(torch.zeros(1000), [model], [1.0], var, key, cutoff, start, block_size=64)
        kept = reference.sce_cut_mask(var, key, cutoff, start)
        assert torch.equal(got != 0, kept), f"cutoff {cutoff}: masks differ"
        assert torch.equal(got[kept], model[kept])


def test_empty_and_errors():
    assert sk.sce_merge(torch.empty(0), [torch.empty(0)], [1.0]).shape == (0,)
    base, models, var = inputs((10,), torch.float32)
    with pytest.raises(KernelError, match=r"^sce_merge: needs one weight per model, got 3 models and 1 weights$"):
        sk.sce_merge(base, models, [1.0])
    with pytest.raises(KernelError, match=r"^sce_merge: variances must be float32 of shape \(10,\) on cpu, got "
                                          r"float64 \(10,\) on cpu$"):
        sk.sce_merge(base, models, [1.0] * 3, var.double())
