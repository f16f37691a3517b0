"""DARE kernel: the mask is bit-identical to reference.dare_keep_mask whatever the block size; values match."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DTYPES, EPS32, OUT_ATOL, OUT_RTOL, SHAPES, kernel_module, make
from tests.helpers import assert_close

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

dk = kernel_module("dare")
M32 = 0xFFFFFFFF


def fmix32(x: int) -> int:
    """MurmurHash3 fmix32 in plain Python, written from the published constants (independent of reference.py)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def kernel_mask(n, p, seed, tid, **kw):
    return dk.dare(torch.ones(n), p, seed, tid, rescale=False, **kw) != 0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("block_size", [16, 128, 1024, None])
def test_mask_bit_identical_to_reference_for_every_block_size(p, block_size):
    n, seed, tid = 3001, 17, reference.tensor_id("model.layers.0.mlp.up_proj.weight", 1)
    assert torch.equal(kernel_mask(n, p, seed, tid, block_size=block_size), reference.dare_keep_mask(n, p, seed, tid))


def test_mask_matches_plain_python_hash():
    seed, tid, p = 3, 12345, 0.3
    key = fmix32(fmix32(seed) ^ tid)
    thr = math.floor(p * 2**32)
    expected = torch.tensor([fmix32(fmix32((i & M32) ^ key) ^ (i >> 32)) >= thr for i in range(257)])
    assert torch.equal(kernel_mask(257, p, seed, tid), expected)


def test_high_index_word_and_slices():
    """Indices past 2**32 use the high word; a slice with index_offset reproduces the whole tensor's mask."""
    start, n, seed, tid, p = 2**32 - 100, 300, 5, 77, 0.5
    idx = torch.arange(start, start + n, dtype=torch.int64)
    h = reference._fmix32((idx & M32) ^ reference.dare_key(seed, tid))
    expected = reference._fmix32(h ^ (idx >> 32)) >= reference.dare_threshold(p)
    assert torch.equal(kernel_mask(n, p, seed, tid, index_offset=start, block_size=64), expected)
    x = make((1000,), torch.float32)
    whole = dk.dare(x, p, seed, tid)
    assert torch.equal(dk.dare(x[600:], p, seed, tid, index_offset=600), whole[600:])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_five_sigma(p):
    n = 1 << 15
    kept = int(kernel_mask(n, p, seed=11, tid=reference.tensor_id("w")).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma, f"kept {kept} of {n}, expected {n * (1 - p):.0f} +- {5 * sigma:.0f}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", [True, False])
def test_values_match_float64_and_reference(dtype, shape, rescale):
    p, seed, tid = 0.7, 1, 2
    x = make(shape, dtype)
    got = dk.dare(x, p, seed, tid, rescale, block_size=128)
    keep = reference.dare_keep_mask(x.numel(), p, seed, tid).view(shape)
    scale = 1 / (1 - p) if rescale else 1.0
    expected = torch.where(keep, x.to(torch.float64) * scale, torch.zeros((), dtype=torch.float64))
    # One fp32 multiply (<= EPS32 relative, and 1/(1-p) rounded to fp32: another EPS32) then the output rounding.
    assert_close(got, expected, atol=OUT_ATOL[dtype], rtol=OUT_RTOL[dtype] + 2 * EPS32, what="vs float64")
    # The reference does the same single fp32 multiply and a round-to-nearest-even cast: bit-identical.
    assert torch.equal(got, reference.dare(x, p, seed, tid, rescale)), "differs from reference.dare"


def test_non_contiguous_empty_out_and_errors():
    x = make((33, 65), torch.bfloat16, contiguous=False)
    assert torch.equal(dk.dare(x, 0.5, 1, 2), reference.dare(x.contiguous(), 0.5, 1, 2))
    assert dk.dare(torch.empty(0, 3), 0.5, 1, 2).shape == (0, 3)
    out = torch.empty(33, 65, dtype=torch.float32)
    assert dk.dare(x, 0.5, 1, 2, out=out) is out
    with pytest.raises(KernelError, match=r"^dare: DARE drop probability must be in \[0, 1\), got 1.0$"):
        dk.dare(torch.zeros(3), 1.0, 1, 2)


# --- random_keep: DELLA's per-element keep probabilities through the same hash ---


def test_random_keep_constant_probability_draws_dares_mask():
    n, seed, tid = 3001, 17, reference.tensor_id("w", 2)
    for keep in (1.0, 0.7, 0.3):
        got = dk.random_keep(torch.ones(n), keep, seed, tid, block_size=128) != 0
        assert torch.equal(got, reference.dare_keep_mask(n, 1.0 - keep, seed, tid))
        per_element = dk.random_keep(torch.ones(n), torch.full((n,), keep, dtype=torch.float64), seed, tid) != 0
        assert torch.equal(per_element, got), f"a constant tensor of {keep} differs from the scalar"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (33, 65)])
def test_random_keep_per_element_mask_and_values(dtype, shape):
    """Per-element probabilities (DELLA's ranks) give the mask of the plain-Python hash against
    floor((1 - p) * 2**32), element by element; kept values are x * scale."""
    seed, tid, scale = 4, reference.tensor_id("layers.1.w", 1), 1.7
    x = make(shape, dtype)
    x.view(-1)[x.view(-1) == 0] = 1.0  # the mask is read off as out != 0
    probs = torch.linspace(0.05, 0.95, x.numel(), dtype=torch.float64).view(shape)
    k = min(3, x.numel())
    probs.view(-1)[:k] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)[:k]  # never, always, half
    got = dk.random_keep(x, probs, seed, tid, scale, block_size=64)
    key = fmix32(fmix32(seed) ^ tid)
    flat = probs.reshape(-1).tolist()
    expected_keep = torch.tensor([
        fmix32(fmix32(i ^ key)) >= min(math.floor((1.0 - p) * 2**32), M32) for i, p in enumerate(flat)
    ]).view(shape)
    assert torch.equal(got != 0, expected_keep)
    assert torch.equal(got != 0, reference.random_keep_mask(probs, x.numel(), seed, tid).view(shape))
    expected = torch.where(expected_keep, x.double() * scale, 0.0)
    # one fp32 multiply (scale rounded to fp32: another EPS32), then the output rounding
    assert_close(got, expected, atol=OUT_ATOL[dtype], rtol=OUT_RTOL[dtype] + 2 * EPS32, what="vs float64")
    assert torch.equal(got, reference.random_keep(x, probs, seed, tid, scale)), "differs from the torch path"


def test_random_keep_slices_and_errors():
    x, probs = make((1000,), torch.float32), torch.rand(1000, dtype=torch.float64)
    whole = dk.random_keep(x, probs, 5, 6)
    assert torch.equal(dk.random_keep(x[600:], probs[600:], 5, 6, index_offset=600), whole[600:])
    with pytest.raises(KernelError, match=r"^random_keep: keep probability must be in \(0, 1\], got 0.0$"):
        dk.random_keep(x, 0.0, 1, 2)
    with pytest.raises(KernelError, match=r"^random_keep: keep_prob has shape \(3,\) on cpu, expected \(1000,\)"):
        dk.random_keep(x, torch.rand(3), 1, 2)
