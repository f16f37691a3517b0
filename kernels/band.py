"""Band-masked combination of task vectors in one pass: breadcrumbs, DELLA's combine, and TIES' trim and merge.

:func:`_masked_merge_kernel` streams, per block, the base and the N inputs once through a pointer table (any N,
dtypes compile-time) and writes once. Per input ``i``: ``delta = x_i - base`` (or ``x_i``), kept where
``lo_i <= |delta| <= hi_i`` (every element when ``lo_i < 0``), times ``scale_i`` and the weight ``w_i``. The
weighted values are summed (linear), or, with ``CONSENSUS``, split into five fp32 accumulators as TIES does
(the weighted sum in input order, whose sign is the elected sign; the positive and the negative sums; and
for ``NORMALIZE`` the summed weights of each side) and the agreeing side's sum (divided by its weight) kept.
With a base the result is ``base + lam * merged``. TIES is the case ``lo = threshold, hi = inf, scale = 1``
without a base (:func:`mergekit_safe.kernels.ties.ties`). Bytes moved: (N + 1) reads + 1 write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference
from mergekit_safe.kernels._cast import to_dtype_rtne
from mergekit_safe.kernels._launch import (
    aligned16,
    check_inputs,
    check_out,
    check_out_dtype,
    device_table,
    launch_config,
    torch_to_tl,
)


@triton.jit
def _masked_merge_kernel(
    out_ptr, base_ptr, ptr_table, w_table, lo_table, hi_table, scale_table, n, lam,
    N: tl.constexpr, IN_DTYPE: tl.constexpr, HAS_BASE: tl.constexpr, SUB_BASE: tl.constexpr,
    CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.zeros((BLOCK,), tl.float32)
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK,), tl.float32)
    pos = tl.zeros((BLOCK,), tl.float32)
    neg = tl.zeros((BLOCK,), tl.float32)
    pos_w = tl.zeros((BLOCK,), tl.float32)
    neg_w = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(N):
        ptr = tl.load(ptr_table + i).to(tl.pointer_type(IN_DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        d = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SUB_BASE:
            d = d - b
        mag = tl.abs(d)
        lo = tl.load(lo_table + i) + tl.zeros((BLOCK,), tl.float32)  # a block: a scalar bool does not | a block
        keep = (lo < 0) | ((mag >= lo) & (mag <= tl.load(hi_table + i)))
        if CONSENSUS:  # TIES' trim at density 1 (|d| >= 0) drops NaN
            keep = keep & (mag == mag)
        w = tl.load(w_table + i)
        s = tl.where(keep, d * tl.load(scale_table + i), 0.0) * w
        total += s
        if CONSENSUS:
            pos += tl.where(s > 0, s, 0.0)
            neg += tl.where(s < 0, s, 0.0)
            if NORMALIZE:
                pos_w += tl.where(s > 0, w, 0.0)
                neg_w += tl.where(s < 0, w, 0.0)
    merged = total
    if CONSENSUS:
        merged = tl.where(total > 0, pos, tl.where(total < 0, neg, 0.0))
        if NORMALIZE:
            div = tl.where(total > 0, pos_w, tl.where(total < 0, neg_w, 0.0))
            merged = merged / tl.where(div == 0, 1.0, div)
    if HAS_BASE:
        merged = b + lam * merged
    tl.store(out_ptr + offs, to_dtype_rtne(merged, out_ptr.dtype.element_ty), mask=mask)


def _per_input(name: str, values: Sequence[float] | None, n: int, default: float) -> list[float]:
    if values is None:
        return [default] * n
    if len(values) != n:
        raise KernelError(f"masked_merge: needs one {name} per input, got {len(values)} for {n} inputs")
    return [float(v) for v in values]


def masked_merge(
    base: torch.Tensor | None,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    lo: Sequence[float] | None = None,
    hi: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    inputs_are_deltas: bool = False,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """``base + lam * combine_i(w_i * scale_i * band_i(delta_i))`` in one launch; see :func:`reference.masked_merge`.

    Args:
        base: the base tensor, or None (then ``inputs_are_deltas`` is required and the result is the combined
            task vector alone, without ``lam``: TIES).
        inputs: N >= 1 models (or task vectors) of one shape on one device (fp32, bf16, fp16).
        weights: N Python floats.
        lo: per input, the smallest kept magnitude (negative: keep every element); default all kept.
        hi: per input, the largest kept magnitude; default inf.
        scales: per input, a factor on the kept values; default 1.
        inputs_are_deltas: the inputs are task vectors (else ``delta_i = inputs_i - base``).
        consensus: TIES' sign election and disjoint sum.
        normalize: divide by the summed (agreeing, with ``consensus``) weights (:func:`reference.linear_weights`).
        lam: scale of the merged task vector.
        out_dtype: result dtype; defaults to ``base``'s (the first input's without a base).
        out: optional contiguous output.
        block_size: force the block size.

    Returns:
        ``out`` or a new tensor.

    Raises:
        KernelError: mismatched lengths, shape/device/dtype mismatch, or no base with model inputs.

    Example:
        >>> masked_merge(base, [m1, m2], [1.0, 1.0], lo=[0.01, 0.01], hi=[0.5, 0.5])  # doctest: +SKIP
    """
    n_in = len(inputs)
    if n_in == 0 or len(weights) != n_in:
        raise KernelError(f"masked_merge: needs one weight per input, got {n_in} inputs and {len(weights)} weights")
    if base is None and not inputs_are_deltas:
        raise KernelError("masked_merge: model inputs need a base (pass inputs_are_deltas=True for task vectors)")
    tables = [_per_input("lo", lo, n_in, -1.0), _per_input("hi", hi, n_in, math.inf),
              _per_input("scale", scales, n_in, 1.0)]
    xs = check_inputs("masked_merge", [*([base] if base is not None else []), *inputs], "input")
    b, xs = (xs[0], xs[1:]) if base is not None else (None, xs)
    if out is None:
        dtype = out_dtype or (b if b is not None else xs[0]).dtype
        check_out_dtype("masked_merge", dtype)
        out = torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device)
    else:
        check_out("masked_merge", out, xs[0])
    if out.numel() == 0:
        return out
    if len({x.dtype for x in xs}) > 1:  # rare: mixed dtypes; one fp32 copy keeps the kernel's dtype compile-time
        xs = [x.float() for x in xs]
    coeffs = [float(w) for w in weights] if consensus else reference.linear_weights(weights, normalize)
    device = xs[0].device
    cfg = launch_config(out.numel(), "masked_merge", block_size)
    lo_t, hi_t, scale_t = (device_table(t, torch.float32, device) for t in tables)
    _masked_merge_kernel[(cfg.grid,)](
        out, b if b is not None else out, device_table([x.data_ptr() for x in xs], torch.int64, device),
        device_table(coeffs, torch.float32, device), lo_t, hi_t, scale_t, out.numel(), float(lam),
        N=len(xs), IN_DTYPE=torch_to_tl(xs[0].dtype), HAS_BASE=b is not None, SUB_BASE=not inputs_are_deltas,
        CONSENSUS=bool(consensus), NORMALIZE=bool(normalize and consensus), ALIGNED=aligned16(xs),
        BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
