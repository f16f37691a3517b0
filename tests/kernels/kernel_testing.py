"""Helpers shared by the kernel tests: tolerances with their reasons and input makers (the close-check is the
suite's one :func:`tests.helpers.assert_close`). (conftest.py sets TRITON_INTERPRET=1 before anything imports triton.)
"""

from __future__ import annotations


import torch

# float32 unit roundoff: the error of one fp32 add or multiply, relative to its result.
EPS32 = 2.0**-24
# Relative error of rounding the exact (or fp32) result to the output dtype: half an ulp is 2**-8 for bf16,
# 2**-11 for fp16, 2**-24 for fp32; an fp32 result near a rounding boundary may round to the neighbour of the
# correctly rounded value, so allow one full ulp (2**-7 bf16, 2**-10 fp16, 2**-23 fp32).
OUT_RTOL = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# fp16 flushes to subnormals below 2**-14, where the spacing is 2**-24 (absolute); bf16/fp32 share fp32's range.
OUT_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-24}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Shapes: a single element, a size that is not a multiple of any block (1000 = 2**3 * 125), a power of two
# spanning several blocks at block size 128, and a 2-D one.
SHAPES = [(1,), (1000,), (2048,), (33, 65)]


def kernel_module(name: str):
    """The kernel file ``mergekit_safe.kernels.<name>`` (the package attribute of that name is the dispatcher)."""
    from mergekit_safe.kernels import kernel_module as load

    return load(name)


def make(shape, dtype, *, contiguous=True, scale=1.0):
    """A random tensor; ``contiguous=False`` returns a transposed (2-D) or strided (1-D) view of the same shape."""
    if contiguous:
        return (torch.randn(shape) * scale).to(dtype)
    if len(shape) == 2:
        return (torch.randn(shape[::-1]) * scale).to(dtype).t()
    return (torch.randn((*shape[:-1], shape[-1] * 2)) * scale).to(dtype)[..., ::2]
