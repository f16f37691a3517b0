"""Multi-tensor weighted sums in one launch: the repair search's ``apply_`` and the online EMA update.

``outs[j] = sum_k c_jk * x_jk`` for many tensors ``j`` at once. The host packs, per tensor, the output and
input addresses into an int64 pointer table, the coefficients into an fp32 table, the sizes and the
prefix sum of block counts into int64 tables. Program ``pid`` finds its tensor by a binary search over the
prefix sums (``ceil(log2 T)`` scalar loads), then handles one block of that tensor. Tensors are grouped by
(K, out dtype, first-input dtype, other-inputs dtype, 16-byte alignment) because dtypes are compile-time;
a model whose parameters share one dtype is one launch whatever its number of tensors.

Full blocks load and store without masks and, when every address is 16-byte aligned, with a
``tl.multiple_of`` hint, so loads through the pointer table vectorize like direct arguments.
The output may be one of its own inputs (EMA in place): a program reads its block of every input before it
writes; an output must not overlap another tensor's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels._cast import to_dtype_rtne
from mergekit_safe.kernels._launch import (
    MAX_GRID,
    aligned16,
    check_dtype,
    check_out,
    device_table,
    launch_config,
    torch_to_tl,
)


@triton.jit
def _find_tensor(block_start_ptr, pid, T, LOG_T: tl.constexpr):
    """The tensor ``t`` with ``block_start[t] <= pid < block_start[t + 1]`` (binary search, LOG_T steps)."""
    lo = pid * 0
    hi = lo + T
    for _ in tl.static_range(LOG_T):
        mid = (lo + hi) // 2
        go = tl.load(block_start_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _load_slot(row, slot, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    ptr = tl.load(row + slot).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _foreach_tile(
    row, crow, offs, mask,
    K: tl.constexpr, OUT_DTYPE: tl.constexpr, FIRST_DTYPE: tl.constexpr, REST_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    acc = _load_slot(row, 1, offs, mask, FIRST_DTYPE, ALIGNED, MASKED) * tl.load(crow)
    for k in tl.static_range(1, K):
        acc += _load_slot(row, 1 + k, offs, mask, REST_DTYPE, ALIGNED, MASKED) * tl.load(crow + k)
    out = tl.load(row).to(tl.pointer_type(OUT_DTYPE))
    if ALIGNED:
        out = tl.multiple_of(out, 16)
    if MASKED:
        tl.store(out + offs, to_dtype_rtne(acc, OUT_DTYPE), mask=mask)
    else:
        tl.store(out + offs, to_dtype_rtne(acc, OUT_DTYPE))


@triton.jit
def _foreach_weighted_sum_kernel(
    ptr_table, coef_table, numel_table, block_start, T,
    K: tl.constexpr, OUT_DTYPE: tl.constexpr, FIRST_DTYPE: tl.constexpr, REST_DTYPE: tl.constexpr,
    LOG_T: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    t = _find_tensor(block_start, pid, T, LOG_T)
    start = (pid - tl.load(block_start + t)) * BLOCK
    n = tl.load(numel_table + t)
    row = ptr_table + t * (K + 1)  # [out, x_0, ..., x_{K-1}]
    crow = coef_table + t * K
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _foreach_tile(row, crow, offs, offs < n, K, OUT_DTYPE, FIRST_DTYPE, REST_DTYPE, ALIGNED, False)
    else:
        _foreach_tile(row, crow, offs, offs < n, K, OUT_DTYPE, FIRST_DTYPE, REST_DTYPE, ALIGNED, True)


def _foreach_groups(
    outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[Sequence[float]],
) -> tuple[dict[tuple, list[tuple[torch.Tensor, list[torch.Tensor], list[float]]]], torch.device | None]:
    """Check :func:`foreach_weighted_sum_`'s arguments and group the non-empty outputs by launch signature.

    Returns:
        ``(groups, device)``: members per ``(K, out dtype, first dtype, rest dtype, aligned)`` key.
    """
    groups: dict[tuple, list[tuple[torch.Tensor, list[torch.Tensor], list[float]]]] = {}
    device = None
    for j, (out, ins, cs) in enumerate(zip(outs, inputs, coeffs)):
        if len(ins) != len(cs) or not ins:
            raise KernelError(
                f"foreach_weighted_sum_: output {j} has {len(ins)} inputs and {len(cs)} coefficients; "
                "give as many (>= 1) of each"
            )
        if device is None:
            device = out.device
        if out.device != device:
            raise KernelError(f"foreach_weighted_sum_: output {j} is on {out.device} but output 0 is on {device}")
        xs = []
        for k, x in enumerate(ins):
            check_dtype("foreach_weighted_sum_", f"input {k} of output {j}", x)
            if x.shape != out.shape or x.device != out.device:
                raise KernelError(
                    f"foreach_weighted_sum_: input {k} of output {j} has shape {tuple(x.shape)} on {x.device}, "
                    f"expected {tuple(out.shape)} on {out.device}"
                )
            xs.append(x if x.is_contiguous() else x.contiguous())
        check_out("foreach_weighted_sum_", out, xs[0], name=f"output {j}")
        if out.numel() == 0:
            continue
        rest = {x.dtype for x in xs[1:]}
        if len(rest) > 1:  # rare: mixed delta dtypes; one fp32 copy keeps the kernel's dtypes compile-time
            xs = [xs[0], *(x.float() for x in xs[1:])]
        rest_dtype = xs[1].dtype if len(xs) > 1 else xs[0].dtype
        key = (len(xs), out.dtype, xs[0].dtype, rest_dtype, aligned16([out, *xs]))
        groups.setdefault(key, []).append((out, xs, [float(c) for c in cs]))

    return groups, device


def foreach_weighted_sum_(
    outs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[Sequence[float]],
    *,
    block_size: int | None = None,
) -> int:
    """In place ``outs[j] = sum_k coeffs[j][k] * inputs[j][k]`` for every j, one launch per dtype group.

    Args:
        outs: contiguous output tensors (fp32, bf16, fp16); ``outs[j]`` may be one of ``inputs[j]``.
        inputs: per output, K_j >= 1 tensors of its shape on its device (non-contiguous ones are copied).
        coeffs: per output, K_j Python floats.
        block_size: force the block size (a power of two); ``None`` picks it from the largest tensor.

    Returns:
        The number of kernel launches (1 when all tensors share K and dtypes; 0 when all are empty).

    Raises:
        KernelError: mismatched lengths, shapes, devices, dtypes, or a non-contiguous output.

    Example:
        >>> foreach_weighted_sum_(ema, [[e, p] for e, p in zip(ema, params)], [[b, 1 - b]] * len(ema))  # doctest: +SKIP
    """
    if not (len(outs) == len(inputs) == len(coeffs)):
        raise KernelError(
            f"foreach_weighted_sum_: needs one input list and one coefficient list per output, got {len(outs)} "
            f"outputs, {len(inputs)} input lists and {len(coeffs)} coefficient lists"
        )
    groups, device = _foreach_groups(outs, inputs, coeffs)
    for (k, out_dtype, first_dtype, rest_dtype, aligned), members in groups.items():
        cfg = launch_config(max(o.numel() for o, _, _ in members), "foreach_weighted_sum_", block_size)
        ptrs: list[int] = []
        coefs: list[float] = []
        numels: list[int] = []
        starts = [0]
        for out, xs, cs in members:
            ptrs += [out.data_ptr(), *(x.data_ptr() for x in xs)]
            coefs += cs
            numels.append(out.numel())
            starts.append(starts[-1] + -(-out.numel() // cfg.block))
        grid = starts[-1]
        if grid > MAX_GRID:
            raise KernelError(f"foreach_weighted_sum_: {grid} blocks of {cfg.block} exceed the grid limit {MAX_GRID}")
        t = len(members)
        ints = device_table(ptrs + numels + starts, torch.int64, device)
        ptr_table, numel_table, block_start = ints[: len(ptrs)], ints[len(ptrs) : len(ptrs) + t], ints[len(ptrs) + t :]
        coef_table = device_table(coefs, torch.float32, device)
        _foreach_weighted_sum_kernel[(grid,)](
            ptr_table, coef_table, numel_table, block_start, t,
            K=k, OUT_DTYPE=torch_to_tl(out_dtype), FIRST_DTYPE=torch_to_tl(first_dtype),
            REST_DTYPE=torch_to_tl(rest_dtype), LOG_T=(t - 1).bit_length(), BLOCK=cfg.block,
            ALIGNED=aligned, num_warps=cfg.num_warps,
        )  # fmt: skip
    return len(groups)


def apply_(
    targets: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    deltas: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[Sequence[float]],
    *,
    block_size: int | None = None,
) -> int:
    """In place ``targets[j] = bases[j] + sum_g coeffs[j][g] * deltas[j][g]`` for every j, in one launch.

    The repair search's inner step: set a loaded model's parameters to a new mix. ``targets[j]`` may be
    ``bases[j]``. Returns the number of launches (see :func:`foreach_weighted_sum_`).

    Raises:
        KernelError: mismatched lengths or any check of :func:`foreach_weighted_sum_`.
    """
    if not (len(targets) == len(bases) == len(deltas) == len(coeffs)):
        raise KernelError(
            f"apply_: needs one base, one delta list and one coefficient list per target, got {len(targets)} "
            f"targets, {len(bases)} bases, {len(deltas)} delta lists and {len(coeffs)} coefficient lists"
        )
    return foreach_weighted_sum_(
        targets, [[b, *ds] for b, ds in zip(bases, deltas)], [[1.0, *cs] for cs in coeffs], block_size=block_size
    )
