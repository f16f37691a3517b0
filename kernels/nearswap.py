"""NearSwap in one elementwise pass: take the model's value where it is near the base, interpolate elsewhere.

``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, ``out = w * b + (1 - w) * a`` (``a`` the base, ``b`` the model),
with fp32 math: each input is read once and the output written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mergekit_safe.kernels._cast import to_dtype_rtne
from mergekit_safe.kernels._launch import check_inputs, check_out, check_out_dtype, launch_config
from mergekit_safe.kernels.reference import NEARSWAP_MIN_DISTANCE


@triton.jit
def _nearswap_kernel(a_ptr, b_ptr, out_ptr, n, t, min_dist, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dist = tl.maximum(tl.abs(a - b), tl.cast(min_dist, tl.float32))
    w = tl.minimum(tl.maximum(tl.cast(t, tl.float32) / dist, 0.0), 1.0)
    tl.store(out_ptr + offs, to_dtype_rtne(w * b + (1.0 - w) * a, out_ptr.dtype.element_ty), mask=mask)


def nearswap(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """NearSwap of base ``a`` and model ``b`` with threshold ``t``; see :func:`reference.nearswap`.

    Args:
        a: the base tensor (fp32, bf16 or fp16).
        b: the model tensor, same shape and device.
        t: distance below which ``b``'s value is taken.
        out_dtype: result dtype; defaults to ``a``'s (ignored when ``out`` is given).
        out: optional contiguous output (may be ``a`` or ``b``).
        block_size: force the block size.

    Returns:
        ``out`` or a new tensor of ``a``'s shape.

    Raises:
        KernelError: mismatched shapes or devices, bad dtypes, or a non-contiguous ``out``.

    Example:
        >>> nearswap(base, model, 1e-3)  # doctest: +SKIP
    """
    x, y = check_inputs("nearswap", [a, b])
    if out is None:
        dtype = out_dtype or a.dtype
        check_out_dtype("nearswap", dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        check_out("nearswap", out, x)
    n = x.numel()
    if n == 0:
        return out
    cfg = launch_config(n, "nearswap", block_size)
    _nearswap_kernel[(cfg.grid,)](
        x, y, out, n, float(t), float(NEARSWAP_MIN_DISTANCE), BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
