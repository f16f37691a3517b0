"""SCE's elementwise step in one pass: variance cut, sign election, weighted disjoint mean, plus the base.

The per-tensor constants come from the host: the variance cut (the bit pattern ``var_key`` of the k-th
largest variance and the flat-index ``cutoff`` of the entries tied at it) and the models' energy weights.
The variances themselves are the torch values the prepare pass ranked (a different summation order would
move entries across the cut), read as a fp32 table. :func:`_sce_kernel` streams, per block, the base, the
variances and the N models once and writes once: ``tau_i = x_i - base`` times the cut mask, the unweighted
sum (whose sign, ``>= 0`` for +, is the elected one), and per side the weighted sum and the summed weights.
A disagreeing entry contributes ``tau * 0`` as in the torch product (an inf there becomes NaN), so each
side's sum also carries those terms. Bytes moved: (N + 2) reads + 1 write.
"""

from __future__ import annotations

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
def _sce_kernel(
    out_ptr, base_ptr, var_ptr, ptr_table, w_table, n, start, var_key, cutoff, min_weight,
    N: tl.constexpr, IN_DTYPE: tl.constexpr, CUT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kept = tl.full((BLOCK,), 1.0, tl.float32)
    if CUT:
        keys = tl.load(var_ptr + offs, mask=mask, other=0.0).to(tl.int32, bitcast=True)
        keep = (keys > var_key) | ((keys == var_key) & (offs + start < cutoff))
        kept = tl.where(keep, 1.0, 0.0)
    total = tl.zeros((BLOCK,), tl.float32)
    pos = tl.zeros((BLOCK,), tl.float32)
    neg = tl.zeros((BLOCK,), tl.float32)
    pos_w = tl.zeros((BLOCK,), tl.float32)
    neg_w = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(N):
        ptr = tl.load(ptr_table + i).to(tl.pointer_type(IN_DTYPE))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        t = (tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32) - b) * kept
        w = tl.load(w_table + i)
        total += t
        zero = t * 0.0  # what a disagreeing entry adds: 0, or NaN for an inf or NaN entry
        pos += tl.where(t > 0, t * w, zero)
        neg += tl.where(t < 0, t * w, zero)
        pos_w += tl.where(t > 0, w, 0.0)
        neg_w += tl.where(t < 0, w, 0.0)
    plus = total >= 0
    merged = tl.where(plus, pos, neg) / tl.maximum(tl.where(plus, pos_w, neg_w), min_weight)
    tl.store(out_ptr + offs, to_dtype_rtne(b + merged, out_ptr.dtype.element_ty), mask=mask)


def sce_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    variances: torch.Tensor | None = None,
    var_key: int = 0,
    cutoff: int = 0,
    start: int = 0,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """SCE's apply of N models in one launch; see :func:`reference.sce_merge` (the same arguments).

    Args:
        base: the base tensor (fp32, bf16, fp16).
        models: N >= 1 models of ``base``'s shape, on its device.
        weights: N Python floats.
        variances: fp32 variances of the task vectors per element (``base``'s shape), or None: no cut.
        var_key: int32 bit pattern of the k-th largest variance.
        cutoff: flat-index bound of the tied entries kept.
        start: flat index of the first element.
        out_dtype: result dtype; defaults to ``base``'s (ignored when ``out`` is given).
        out: optional contiguous output.
        block_size: force the block size.

    Returns:
        ``out`` or a new tensor of ``base``'s shape.

    Raises:
        KernelError: mismatched lengths, shape/device/dtype mismatch, variances not fp32 of ``base``'s shape.

    Example:
        >>> sce_merge(base, [m1, m2], [0.4, 0.6])  # doctest: +SKIP
    """
    if not models or len(models) != len(weights):
        raise KernelError(
            f"sce_merge: needs one weight per model, got {len(models)} models and {len(weights)} weights"
        )
    b, *xs = check_inputs("sce_merge", [base, *models], "input")
    if variances is not None and (variances.dtype != torch.float32 or variances.shape != base.shape
                                  or variances.device != base.device):
        raise KernelError(f"sce_merge: variances must be float32 of shape {tuple(base.shape)} on {base.device}, got "
                          f"{str(variances.dtype).removeprefix('torch.')} {tuple(variances.shape)} on {variances.device}")
    if out is None:
        dtype = out_dtype or base.dtype
        check_out_dtype("sce_merge", dtype)
        out = torch.empty(b.shape, dtype=dtype, device=b.device)
    else:
        check_out("sce_merge", out, b)
    if out.numel() == 0:
        return out
    if len({x.dtype for x in xs}) > 1:  # rare: mixed dtypes; one fp32 copy keeps the kernel's dtype compile-time
        xs = [x.float() for x in xs]
    var = variances.contiguous() if variances is not None else out
    cfg = launch_config(out.numel(), "sce_merge", block_size)
    _sce_kernel[(cfg.grid,)](
        out, b, var, device_table([x.data_ptr() for x in xs], torch.int64, b.device),
        device_table([float(w) for w in weights], torch.float32, b.device), out.numel(), int(start), int(var_key),
        int(cutoff), reference.SCE_MIN_WEIGHT,
        N=len(xs), IN_DTYPE=torch_to_tl(xs[0].dtype), CUT=variances is not None, ALIGNED=aligned16(xs),
        BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip
    return out
