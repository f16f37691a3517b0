"""Band-masked combine kernel (breadcrumbs, DELLA's combine, TIES' merge) against an independent float64 combine
and the torch path; its masks equal the torch path's exactly."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, kernel_module, make
from tests.helpers import assert_close

import mergekit_safe.kernels as K
from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

bk = kernel_module("band")
# one element, and a 2-D shape whose 2145 elements are no multiple of the block (128)
SHAPES = [(1,), (33, 65)]


def masked_merge64(base, models, weights, lo, hi, scales, consensus, normalize, lam):
    """The combine from its definition, in float64. The band is decided on the fp32 task vector (the methods
    define the mask on the merge's fp32 values); the values kept are float64."""
    b64 = base.double()
    terms, weights64 = [], torch.tensor(weights, dtype=torch.float64)
    for m, l_, h, s, w in zip(models, lo, hi, scales, weights):
        mag = (m.float() - base.float()).abs()
        keep = torch.ones_like(mag, dtype=torch.bool) if l_ < 0 else (mag >= l_) & (mag <= h)
        terms.append(torch.where(keep, (m.double() - b64) * s * w, 0.0))
    t = torch.stack(terms)
    if consensus:
        elected = t.sum(0).sign()
        agree = (t.sign() == elected) & (t != 0)
        merged = (t * agree).sum(0)
        if normalize:
            wsum = (agree * weights64.view(-1, *[1] * base.dim())).sum(0)
            merged = torch.where(wsum == 0, merged, merged / wsum)
    else:
        merged = t.sum(0) / (weights64.sum() if normalize else 1.0)
    return b64 + lam * merged, t


def bands(base, models):
    """Per model a band between two of its fp32 |delta| values (elements sit exactly on both edges), one model
    kept whole (lo < 0) and, from four models on, one dropped whole (lo = inf > hi = -inf)."""
    lo, hi = [], []
    for i, m in enumerate(models):
        mag = (m.float() - base.float()).abs().reshape(-1).sort().values
        if i == 1:
            lo.append(-1.0), hi.append(math.inf)
        elif i == 3:
            lo.append(math.inf), hi.append(-math.inf)
        else:
            lo.append(float(mag[mag.numel() // 5])), hi.append(float(mag[(mag.numel() * 9) // 10]))
    return lo, hi


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("consensus,normalize", [(False, False), (False, True), (True, False), (True, True)])
def test_matches_float64_and_torch_path(dtype, shape, consensus, normalize):
    base = make(shape, dtype)
    models = [(base.float() + 0.1 * torch.randn(shape)).to(dtype) for _ in range(4)]
    weights = [float(w) for w in torch.rand(4) + 0.5]  # in [0.5, 1.5): a divisor >= 0.5 when any agree
    lo, hi = bands(base, models)
    scales, lam = [1.25, 1.0, 0.8, 2.0], 0.7
    got = bk.masked_merge(base, models, weights, lo, hi, scales, consensus=consensus, normalize=normalize,
                          lam=lam, block_size=128)
    expected, t = masked_merge64(base, models, weights, lo, hi, scales, consensus, normalize, lam)
    # fp32: each term rounds at the subtraction, the scale and the weight (3 EPS32 of |term|), the N-term sum
    # N more of sum|terms|, the division one and lam * merged + base two (of |lam * merged| + |base|); the
    # division by a summed weight >= 0.5 doubles the absolute error of the sum. Then the output rounding.
    div = 0.5 if normalize else 1.0
    atol = (len(models) + 6) * EPS32 * (lam * t.abs().sum(0) / div + base.double().abs()) + OUT_ATOL[dtype]
    assert_close(got, expected, atol=atol, rtol=OUT_RTOL[dtype], what="vs float64")
    torch_path = K.masked_merge(base, models, weights, lo=lo, hi=hi, scales=scales, consensus=consensus,
                                normalize=normalize, lam=lam)
    assert_close(got, torch_path, atol=2 * atol, rtol=OUT_RTOL[dtype], what="vs torch path")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_equal_the_torch_path_exactly(dtype):
    """One model, weight 1, base 0, fp32 out: the output is the kept delta itself, so out != 0 is the mask."""
    d = make((33, 65), dtype)
    d.view(-1)[:50] = d.view(-1)[50]  # many elements on one magnitude, which becomes both band edges below
    d.view(-1)[60] = float("nan")
    zero = torch.zeros_like(d)
    mag = d.float().abs()
    edge = float(mag.view(-1)[50])
    for lo, hi in [(edge, 1.0), (0.1, edge), (edge, edge), (-1.0, math.inf), (math.inf, -math.inf)]:
        got = bk.masked_merge(zero, [d], [1.0], [lo], [hi], out_dtype=torch.float32, block_size=64)
        kept = reference.band(d.float(), lo, hi) != 0  # NaN != 0: a kept NaN counts as kept
        assert torch.equal(got != 0, kept), f"band [{lo}, {hi}]: masks differ"
        assert torch.equal(got[kept].nan_to_num(7.0), d.float()[kept].nan_to_num(7.0)), "kept values changed"


def test_ties_is_the_band_kernel_with_a_threshold():
    """kernels.ties' launcher is masked_merge with lo = threshold, hi = inf, no base: equal bits."""
    deltas = [make((1000,), torch.bfloat16) for _ in range(3)]
    thr = [reference.magnitude_threshold(d, 0.4) for d in deltas]
    got = kernel_module("ties").ties(deltas, [0.5, 1.0, 1.5], 0.4, True)
    direct = bk.masked_merge(None, deltas, [0.5, 1.0, 1.5], thr, [math.inf] * 3, inputs_are_deltas=True,
                             consensus=True, normalize=True)
    assert torch.equal(got, direct)


def test_empty_non_contiguous_mixed_dtypes_and_errors():
    base = make((33, 65), torch.float32, contiguous=False)
    models = [make((33, 65), torch.bfloat16, contiguous=False), make((33, 65), torch.float16)]
    got = bk.masked_merge(base, models, [1.0, 2.0], lam=0.5)
    ref = reference.masked_merge(base.contiguous(), [m.contiguous() for m in models], [1.0, 2.0], lam=0.5)
    assert_close(got, ref, atol=1e-5, rtol=2.0**-22)  # fp32 both sides, O(1) values: last-bit differences
    assert bk.masked_merge(torch.empty(0), [torch.empty(0)], [1.0]).shape == (0,)
    with pytest.raises(KernelError, match=r"^masked_merge: needs one weight per input, got 2 inputs and 1 weights$"):
        bk.masked_merge(base, models, [1.0])
    with pytest.raises(KernelError, match=r"^masked_merge: needs one lo per input, got 1 for 2 inputs$"):
        bk.masked_merge(base, models, [1.0, 1.0], lo=[0.0])
    with pytest.raises(KernelError, match=r"^masked_merge: model inputs need a base"):
        bk.masked_merge(None, models, [1.0, 1.0])
