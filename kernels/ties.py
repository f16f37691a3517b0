"""TIES merging: per-tensor magnitude trim, sign election and disjoint mean.

Pass 1 (host-driven, one per task vector): the magnitude threshold, the ``k``-th largest ``|delta|``
(``torch.kthvalue`` on the device in the input dtype, bit-equal to :func:`reference.magnitude_threshold`,
which upcasts). Pass 2 (one launch) is the band-masked combine of :mod:`.band` with ``lo = threshold``,
``hi = inf``, scale 1, consensus and no base: every program streams its block of the N task vectors once
and keeps TIES' five fp32 accumulators. Bytes moved by pass 2: N reads + 1 write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import band, reference
from mergekit_safe.kernels._launch import check_inputs, check_out, check_out_dtype


def magnitude_threshold(x: torch.Tensor, density: float) -> float:
    """:func:`reference.magnitude_threshold` (on the device, in ``x``'s dtype), with the kernels' error type.

    Raises:
        KernelError: ``density`` outside [0, 1].
    """
    if not 0.0 <= density <= 1.0:
        raise KernelError(f"ties: density must be in [0, 1], got {density}")
    return reference.magnitude_threshold(x, density)


def ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """TIES merge of N task vectors: trim to ``density`` by magnitude, elect sign, disjoint (weighted) mean.

    Args:
        deltas: N >= 1 task vectors of one shape on one device (fp32, bf16, fp16).
        weights: N Python floats, applied before sign election.
        density: fraction each task vector keeps, one value or one per task vector.
        normalize: divide by the summed weights of the agreeing task vectors.
        out_dtype: result dtype; defaults to the first delta's (ignored when ``out`` is given).
        out: optional contiguous output.
        block_size: force the block size.

    Returns:
        ``out`` or a new tensor: the merged delta.

    Raises:
        KernelError: mismatched lengths, density outside [0, 1], shape/device/dtype mismatch.

    Example:
        >>> ties([d1, d2], [1.0, 1.0], density=0.2)  # doctest: +SKIP
    """
    dens = [density] * len(deltas) if isinstance(density, (int, float)) else list(density)
    if not deltas or not (len(deltas) == len(weights) == len(dens)):
        raise KernelError(
            f"ties: needs one weight and one density per task vector, got {len(deltas)} task vectors, "
            f"{len(weights)} weights and {len(dens)} densities"
        )
    xs = check_inputs("ties", deltas, "task vector")
    if out is None:
        dtype = out_dtype or deltas[0].dtype
        check_out_dtype("ties", dtype)
        out = torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device)
    else:
        check_out("ties", out, xs[0])
    n = out.numel()
    if n == 0:
        return out
    thresholds = [magnitude_threshold(x, float(rho)) for x, rho in zip(xs, dens)]
    return band.masked_merge(None, xs, weights, lo=thresholds, hi=[math.inf] * len(xs), inputs_are_deltas=True,
                             consensus=True, normalize=normalize, out=out, block_size=block_size)
