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
