"""Seeded random keeps with a counter-based mask: DARE's drop-and-rescale and DELLA's per-element keep.

Element ``i`` (a global int64 index) is kept when ``fmix32(fmix32(lo32(i) ^ key) ^ hi32(i)) >= threshold``
where ``key = reference.dare_key(seed, tid)`` is computed on the host and ``threshold`` is one uint32
(``reference.dare_threshold``: DARE, or DELLA at a constant probability) or one per element
(``reference.keep_thresholds`` of DELLA's rank-based probabilities, read as a uint32 table). The hash runs
on uint32 lanes (wrapping multiplies, logical shifts), so the mask is a pure function of (seed, tensor id,
index): the same for every block size, launch order and device, and bit-identical to
:func:`reference.random_keep_mask`. One pass: read the delta (and the thresholds) once, write once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels._cast import to_dtype_rtne
from mergekit_safe.kernels import reference
from mergekit_safe.kernels._launch import check_inputs, check_out, check_out_dtype, launch_config


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on a uint32 tensor."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _random_keep_kernel(
    x_ptr, thr_ptr, out_ptr, n, index_offset, key, threshold, scale,
    PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = offs + index_offset  # the element's index in the whole tensor (int64)
    lo = idx.to(tl.uint32)  # truncation: the low 32 bits
    hi = (idx >> 32).to(tl.uint32)
    h = _fmix32(_fmix32(lo ^ tl.cast(key, tl.uint32)) ^ hi)
    if PER_ELEMENT:  # int32 storage of uint32 thresholds: reinterpret the bits
        keep = h >= tl.load(thr_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    else:
        keep = h >= tl.cast(threshold, tl.uint32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(keep, x * tl.cast(scale, tl.float32), 0.0)
    tl.store(out_ptr + offs, to_dtype_rtne(y, out_ptr.dtype.element_ty), mask=mask)


def dare(
    delta: torch.Tensor,
    p: float,
    seed: int,
    tid: int,
    rescale: bool = True,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    index_offset: int = 0,
    block_size: int | None = None,
) -> torch.Tensor:
    """Drop each element of ``delta`` with probability ``p`` and rescale survivors by ``1 / (1 - p)``.

    Args:
        delta: task vector (fp32, bf16 or fp16), any shape.
        p: drop probability in [0, 1).
        seed: the merge's seed.
        tid: the tensor's id (:func:`reference.tensor_id`).
        rescale: multiply survivors by ``1 / (1 - p)``.
        out_dtype: result dtype; defaults to ``delta``'s (ignored when ``out`` is given).
        out: optional contiguous output (may be ``delta``).
        index_offset: global index of ``delta``'s first element, for a tensor processed in slices (the mask
            of a slice equals the whole tensor's mask at those indices).
        block_size: force the block size; the mask does not depend on it.

    Returns:
        ``out`` or a new tensor of ``delta``'s shape.

    Raises:
        KernelError: ``p`` outside [0, 1), a negative ``index_offset``, bad dtype or non-contiguous ``out``.

    Example:
        >>> dare(delta, 0.9, seed=0, tid=reference.tensor_id("layers.0.mlp.up_proj.weight"))  # doctest: +SKIP
    """
    try:
        threshold = reference.dare_threshold(p)
    except ValueError as e:
        raise KernelError(f"dare: {e}") from e
    if index_offset < 0:
        raise KernelError(f"dare: index_offset must be >= 0, got {index_offset}")
    (x,) = check_inputs("dare", [delta], "delta")
    if out is None:
        dtype = out_dtype or delta.dtype
        check_out_dtype("dare", dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        check_out("dare", out, x)
    if x.numel() == 0:
        return out
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    _launch("dare", x, None, out, seed, tid, threshold, scale, index_offset, block_size)
    return out


def _launch(kernel: str, x: torch.Tensor, thresholds: torch.Tensor | None, out: torch.Tensor, seed: int, tid: int,
            threshold: int, scale: float, index_offset: int, block_size: int | None) -> None:
    cfg = launch_config(x.numel(), kernel, block_size)
    _random_keep_kernel[(cfg.grid,)](
        x, out if thresholds is None else thresholds, out, x.numel(), int(index_offset),
        reference.dare_key(seed, tid), int(threshold), float(scale),
        PER_ELEMENT=thresholds is not None, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip


def _uint32_table(thresholds: torch.Tensor) -> torch.Tensor:
    """int64 thresholds in [0, 2**32) as int32 holding the same 32 bits (half the bytes the kernel reads)."""
    return torch.where(thresholds >= 2**31, thresholds - 2**32, thresholds).to(torch.int32)


def random_keep(
    delta: torch.Tensor,
    keep_prob: torch.Tensor | float,
    seed: int,
    tid: int,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    index_offset: int = 0,
    block_size: int | None = None,
) -> torch.Tensor:
    """Keep each element of ``delta`` with probability ``keep_prob`` (seeded) and multiply survivors by ``scale``.

    Args:
        delta: task vector (fp32, bf16 or fp16), any shape.
        keep_prob: one probability, or one per element (a tensor of ``delta``'s shape, any float dtype;
            turned into uint32 thresholds on the device by :func:`reference.keep_thresholds`).
        seed: the merge's seed.
        tid: the tensor's id (:func:`reference.tensor_id`).
        scale: factor on the kept values.
        out_dtype: result dtype; defaults to ``delta``'s (ignored when ``out`` is given).
        out: optional contiguous output (may be ``delta``).
        index_offset: global index of ``delta``'s first element (a slice of a larger tensor).
        block_size: force the block size; the mask does not depend on it.

    Returns:
        ``out`` or a new tensor of ``delta``'s shape; its mask equals :func:`reference.random_keep_mask`'s.

    Raises:
        KernelError: a constant ``keep_prob`` outside (0, 1], a probability tensor of another shape, a negative
            ``index_offset``, bad dtype or non-contiguous ``out``.

    Example:
        >>> random_keep(delta, probs, seed=0, tid=reference.tensor_id("w", 1))  # doctest: +SKIP
    """
    if index_offset < 0:
        raise KernelError(f"random_keep: index_offset must be >= 0, got {index_offset}")
    (x,) = check_inputs("random_keep", [delta], "delta")
    thresholds, threshold = None, 0
    if isinstance(keep_prob, torch.Tensor):
        if keep_prob.shape != delta.shape or keep_prob.device != delta.device:
            raise KernelError(f"random_keep: keep_prob has shape {tuple(keep_prob.shape)} on {keep_prob.device}, "
                              f"expected {tuple(delta.shape)} on {delta.device}")
        thresholds = _uint32_table(reference.keep_thresholds(keep_prob.reshape(-1)))
    else:
        try:
            threshold = reference.dare_threshold(1.0 - float(keep_prob))
        except ValueError as e:
            raise KernelError(f"random_keep: keep probability must be in (0, 1], got {keep_prob}") from e
    if out is None:
        dtype = out_dtype or delta.dtype
        check_out_dtype("random_keep", dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    else:
        check_out("random_keep", out, x)
    if x.numel():
        _launch("random_keep", x, thresholds, out, seed, tid, threshold, scale, index_offset, block_size)
    return out
