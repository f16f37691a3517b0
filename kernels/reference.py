"""Plain-torch reference implementations of the merge math.

This is the one copy of every reference: the CPU path of :mod:`mergekit_safe.kernels` calls it, the Triton
kernels are tested against it, and the benchmarks time it as the "torch eager" provider. All math runs in
float32 (or float64 when the inputs are float64, which is how tests obtain an exact reference) and the result
is cast to ``out_dtype`` once at the end.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import torch

_M32 = 0xFFFFFFFF
# Above this cosine the two directions are treated as parallel and SLERP falls back to lerp (mergekit's value).
SLERP_PARALLEL_DOT = 0.9995


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Return float64 if any input is float64, else float32: the dtype the merge math runs in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def weighted_sum(
    inputs: Sequence[torch.Tensor], coeffs: Sequence[float], out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``sum_i coeffs[i] * inputs[i]`` in fp32 (fp64 for fp64 inputs), cast to ``out_dtype``.

    Covers lerp, offline EMA, task arithmetic and the safety vector: each is a weighted sum of checkpoints.

    Args:
        inputs: N tensors of one shape (any float dtype).
        coeffs: N Python floats.
        out_dtype: dtype of the result; defaults to the first input's dtype.

    Returns:
        A new tensor of the inputs' shape.
    """
    if len(inputs) != len(coeffs) or not inputs:
        raise ValueError(f"weighted_sum needs as many coefficients as inputs, got {len(inputs)} and {len(coeffs)}")
    cd = compute_dtype(*inputs)
    acc = inputs[0].to(cd) * float(coeffs[0])
    for t, c in zip(inputs[1:], coeffs[1:]):
        acc.add_(t.to(cd), alpha=float(c))
    return acc.to(out_dtype or inputs[0].dtype)


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values (wrapping products masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def tensor_id(name: str, model_index: int = 0) -> int:
    """A stable 32-bit id for (tensor name, model index): the DARE mask key, the same on every machine."""
    return zlib.crc32(f"{model_index}:{name}".encode())


def dare_key(seed: int, tid: int) -> int:
    """Mix a seed and a tensor id into the 32-bit key of that tensor's DARE mask."""
    return _fmix32_int(_fmix32_int(seed) ^ (tid & _M32))


def dare_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped: ``floor(p * 2**32)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DARE drop probability must be in [0, 1), got {p}")
    return min(int(math.floor(p * 2.0**32)), _M32)


def dare_keep_mask(
    numel: int, p: float, seed: int, tid: int, device: torch.device | str = "cpu", index_offset: int = 0
) -> torch.Tensor:
    """Boolean keep mask of DARE, a pure function of (seed, tensor id, element index).

    ``index_offset`` is the global index of the first element, for a tensor processed in slices.

    Element ``i`` is kept when ``fmix32(fmix32(lo(i) ^ key) ^ hi(i)) >= floor(p * 2**32)``, with
    ``key = dare_key(seed, tid)``. Being counter-based, the mask does not depend on block sizes, launch order
    or device, and the Triton kernel reproduces it bit for bit.
    """
    return dare_hash(numel, seed, tid, device, start=index_offset) >= dare_threshold(p)


def dare_hash(numel: int, seed: int, tid: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """The uint32 counter hash behind the DARE mask, one per element (int64 tensor holding uint32 values).

    ``hash / 2**32`` is a uniform draw per element, a pure function of (seed, tensor id, index): DELLA's
    per-element keep probabilities compare against the same draws, so its masks are seeded the same way.
    ``start`` gives the hashes of elements ``[start, start + numel)`` (a tensor processed in slices).
    """
    idx = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    h = _fmix32((idx & _M32) ^ dare_key(seed, tid))
    return _fmix32(h ^ (idx >> 32))


def dare(
    delta: torch.Tensor, p: float, seed: int, tid: int, rescale: bool = True, out_dtype: torch.dtype | None = None,
    index_offset: int = 0,
) -> torch.Tensor:
    """DARE: drop each element of ``delta`` with probability ``p``, rescale survivors by ``1/(1-p)``.

    ``index_offset``: global index of ``delta``'s first element when a tensor is processed in slices.
    """
    cd = compute_dtype(delta)
    keep = dare_keep_mask(delta.numel(), p, seed, tid, delta.device, index_offset).view(delta.shape)
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    return torch.where(keep, delta.to(cd) * scale, torch.zeros((), dtype=cd, device=delta.device)).to(
        out_dtype or delta.dtype
    )


def magnitude_threshold(x: torch.Tensor, density: float) -> float:
    """The magnitude of the ``k = int(density * numel)``-th largest element of ``|x|`` (``inf`` when k = 0).

    TIES keeps the elements with ``|x| >= threshold``; ties at the threshold are all kept. Works in ``x``'s own
    dtype: ``|x|`` of a float is exact and order-preserving, so no wider temporary is needed.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"TIES density must be in [0, 1], got {density}")
    n = x.numel()
    k = int(density * n)
    if k <= 0:
        return math.inf
    if k >= n:
        return 0.0
    return float(torch.kthvalue(x.reshape(-1).abs(), n - k + 1).values)


def ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES merge of task vectors: trim to ``density`` by magnitude, elect sign, disjoint (weighted) mean.

    Args:
        deltas: task vectors ``m_i - base`` of one shape.
        weights: one weight per task vector, applied before sign election.
        density: fraction of elements each task vector keeps (one value, or one per task vector).
        normalize: divide by the summed weights of the models that agree with the elected sign (mergekit's
            ``normalize``); without it the agreeing weighted deltas are summed.
        out_dtype: result dtype; defaults to the first delta's.

    Returns:
        The merged delta (add it, scaled, to the base).
    """
    dens = [density] * len(deltas) if isinstance(density, (int, float)) else list(density)
    cd = compute_dtype(*deltas)
    weighted = []
    for d, w, rho in zip(deltas, weights, dens):
        d = d.to(cd)
        thr = magnitude_threshold(d, rho)
        weighted.append(torch.where(d.abs() >= thr, d, torch.zeros((), dtype=cd, device=d.device)) * float(w))
    stacked = torch.stack(weighted)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0)
    if normalize:
        w = torch.tensor([float(x) for x in weights], dtype=cd, device=stacked.device).view(-1, *[1] * sign.dim())
        divisor = (agree * w).sum(0)
        merged = merged / torch.where(divisor == 0, torch.ones((), dtype=cd, device=divisor.device), divisor)
    return merged.to(out_dtype or deltas[0].dtype)


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors (``t=0`` gives ``a``, ``t=1`` gives ``b``).

    The angle comes from the normalized vectors; the result combines the original vectors, so their norms
    interpolate too. Falls back to lerp when the vectors are nearly parallel (``|cos| > 0.9995``) or either is
    (near) zero.
    """
    cd = compute_dtype(a, b)
    a32, b32 = a.to(cd), b.to(cd)
    na, nb = float(torch.linalg.vector_norm(a32)), float(torch.linalg.vector_norm(b32))
    s0, s1 = slerp_coefficients(float((a32 * b32).sum()), na, nb, t, eps)
    return (a32 * s0 + b32 * s1).to(out_dtype or a.dtype)


def slerp_coefficients(dot: float, norm_a: float, norm_b: float, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """The two coefficients of SLERP from the reduction pass's dot product and norms (host-side, in fp64)."""
    if norm_a < eps or norm_b < eps:
        return 1.0 - t, t
    cos = dot / (norm_a * norm_b)
    if abs(cos) > SLERP_PARALLEL_DOT:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


# Distances below this count as this (mergekit's floor): w = t / distance stays finite where base == model.
NEARSWAP_MIN_DISTANCE = 1e-6


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NearSwap: ``w * b + (1 - w) * a`` with ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``, elementwise.

    Where the model ``b`` is within ``t`` of the base ``a`` its value is taken; farther away the result moves
    only ``t`` from the base towards it.
    """
    cd = compute_dtype(a, b)
    x, y = a.to(cd), b.to(cd)  # may be the inputs themselves: never modified below
    # in place on two full-size buffers (the whole-tensor path holds few copies of the largest tensor)
    w = torch.sub(x, y).abs_().clamp_(min=NEARSWAP_MIN_DISTANCE).reciprocal_().mul_(float(t)).clamp_(0.0, 1.0)
    out = torch.mul(w, y)
    out.addcmul_(w.neg_().add_(1.0), x)
    return out.to(out_dtype or a.dtype)


def foreach_weighted_sum_(
    outs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[Sequence[float]],
) -> None:
    """Multi-tensor weighted sum in place: ``outs[j] = sum_k coeffs[j][k] * inputs[j][k]`` for every j.

    ``outs[j]`` may be one of ``inputs[j]`` (an EMA update reads and writes the same tensor): every element is
    read before it is written. The Triton version does all tensors in one launch.
    """
    if not (len(outs) == len(inputs) == len(coeffs)):
        raise ValueError("foreach_weighted_sum_ needs one input list and one coefficient list per output")
    with torch.no_grad():
        for out, ins, cs in zip(outs, inputs, coeffs):
            out.copy_(weighted_sum(ins, cs, out_dtype=out.dtype))


def apply_(
    targets: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    deltas: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[Sequence[float]],
) -> None:
    """Write ``bases[j] + sum_k coeffs[j][k] * deltas[j][k]`` into ``targets[j]`` in place, for every j.

    This is what the repair search does per candidate: set a loaded model's parameters to a new mix without
    writing a checkpoint.
    """
    if not (len(targets) == len(bases) == len(deltas) == len(coeffs)):
        raise ValueError("apply_ needs one base, one delta list and one coefficient list per target")
    foreach_weighted_sum_(targets, [[b, *ds] for b, ds in zip(bases, deltas)], [[1.0, *cs] for cs in coeffs])


# --- the sparsifying methods' elementwise steps (breadcrumbs' band, DELLA's keep, SCE's apply) ---

HASH_CHUNK = 1 << 20  # elements hashed at a time by random_keep_mask (bounds its int64 temporaries)
# SCE's floor on the summed agreeing weights (mergekit's clamp): entries where no model agrees merge to 0.
SCE_MIN_WEIGHT = 1e-6


def band(d: torch.Tensor, lo: float, hi: float, scale: float = 1.0) -> torch.Tensor:
    """``d`` where ``lo <= |d| <= hi`` (else 0), times ``scale``: one model's breadcrumbs mask.

    A negative ``lo`` keeps every element unchanged (NaN included); ``lo = inf, hi = -inf`` keeps none. A
    ``scale`` of exactly 1 is not multiplied (the product would be the same bits).
    """
    if lo < 0:
        kept = d
    else:
        mag = d.abs()
        kept = torch.where((mag >= lo) & (mag <= hi), d, torch.zeros((), dtype=d.dtype, device=d.device))
    return kept if scale == 1.0 else kept * float(scale)


def linear_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """The coefficients of a linear (no consensus) combination: the weights, divided by their sum when
    ``normalize`` and that sum is not ~0 (mergekit's rule)."""
    total = sum(float(w) for w in weights)
    divisor = total if normalize and abs(total) >= 1e-8 else 1.0
    return [float(w) / divisor for w in weights]


def _weighted_sum_into(inputs: Sequence[torch.Tensor], coeffs: Sequence[float], *, out: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return out.copy_(weighted_sum(inputs, coeffs, out.dtype))


def masked_merge(
    base: torch.Tensor,
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
    sum_into: Callable[..., torch.Tensor] = _weighted_sum_into,
) -> torch.Tensor:
    """``base + lam * combine_i(w_i * band_i(delta_i))``: the last step of the task-vector methods.

    ``delta_i = inputs_i - base`` (or ``inputs_i`` itself with ``inputs_are_deltas``), masked and scaled by
    :func:`band` with ``lo[i], hi[i], scales[i]`` (``None``: keep all, scale 1). The combination is a weighted
    sum (coefficients :func:`linear_weights`), or with ``consensus`` TIES' elect-and-disjoint-mean
    (:func:`ties` at density 1, divided by the agreeing weights when ``normalize``).

    Args:
        base: the base tensor.
        inputs: N models (or task vectors) of ``base``'s shape.
        weights: N Python floats.
        lo: per input, the smallest kept magnitude (negative keeps all).
        hi: per input, the largest kept magnitude.
        scales: per input, a factor on the kept values (breadcrumbs' and DELLA's L1 rescale).
        inputs_are_deltas: the inputs are task vectors already.
        consensus: elect signs (TIES) before combining.
        normalize: divide by the (agreeing) summed weights.
        lam: scale of the merged task vector (mergekit's ``lambda``).
        out_dtype: result dtype (default: ``base``'s).
        sum_into: ``f(inputs, coeffs, out=buffer)``, the weighted sum used (same math, another memory plan).

    Returns:
        The merged tensor.
    """
    n = len(inputs)
    lo, hi, scales = lo or [-1.0] * n, hi or [math.inf] * n, scales or [1.0] * n
    if not (n == len(weights) == len(lo) == len(hi) == len(scales)) or n == 0:
        raise ValueError(f"masked_merge needs one weight, lo, hi and scale per input, got {n} inputs")
    cd = compute_dtype(base, *inputs)
    b = base.to(cd)
    deltas = [band(x.to(cd) if inputs_are_deltas else x.to(cd) - b, float(lo_), float(hi_), float(s))
              for x, lo_, hi_, s in zip(inputs, lo, hi, scales)]
    if consensus:
        # TIES at density 1 is the consensus step alone; it elects no sign where the weighted sum is exactly
        # zero, where mergekit elects + (only exact cancellations differ)
        merged = ties(deltas, [float(w) for w in weights], 1.0, normalize)
    else:
        merged = sum_into(deltas, linear_weights(weights, normalize), out=torch.empty_like(deltas[0]))
    del deltas
    out_dtype = out_dtype or base.dtype
    out = merged if merged.dtype == out_dtype else torch.empty(merged.shape, dtype=out_dtype, device=merged.device)
    return sum_into([b, merged], [1.0, float(lam)], out=out)  # out may be merged itself


def keep_thresholds(keep_prob: torch.Tensor) -> torch.Tensor:
    """Per element, the uint32 hash threshold ``floor((1 - p) * 2**32)`` (clamped to 2**32 - 1), in int64.

    Computed in float64 like :func:`dare_threshold` computes a constant one, so a constant ``p`` gives DARE's
    threshold for drop probability ``1 - p``.
    """
    return torch.floor((1.0 - keep_prob.to(torch.float64)) * 2.0**32).clamp_(max=2.0**32 - 1).to(torch.int64)


def random_keep_mask(keep_prob: torch.Tensor | float, numel: int, seed: int, tid: int,
                     device: torch.device | str = "cpu", index_offset: int = 0,
                     chunk: int = HASH_CHUNK) -> torch.Tensor:
    """Seeded Bernoulli keep mask (flat): element ``i`` is kept when ``hash_i >= floor((1 - p_i) * 2**32)``.

    ``hash`` is DARE's counter hash (:func:`dare_hash`), so a constant ``p`` reproduces
    :func:`dare_keep_mask` with drop probability ``1 - p`` exactly. ``keep_prob``: one float or a tensor of
    ``numel`` elements. The hashes are drawn ``chunk`` elements at a time (small int64 temporaries).
    """
    keep = torch.empty(numel, dtype=torch.bool, device=device)
    flat = keep_prob.reshape(-1) if isinstance(keep_prob, torch.Tensor) else None
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        h = dare_hash(stop - start, seed, tid, device, start=index_offset + start)
        if flat is None:
            keep[start:stop] = h >= dare_threshold(1.0 - float(keep_prob))
        else:
            keep[start:stop] = h >= keep_thresholds(flat[start:stop])
    return keep


def random_keep(delta: torch.Tensor, keep_prob: torch.Tensor | float, seed: int, tid: int, scale: float = 1.0,
                out_dtype: torch.dtype | None = None, index_offset: int = 0) -> torch.Tensor:
    """``delta * scale`` where :func:`random_keep_mask` keeps, else 0: DELLA's (and DARE's) seeded drop.

    ``keep_prob`` is one float or a tensor of ``delta``'s shape (DELLA's per-element probabilities);
    ``index_offset`` is the global index of ``delta``'s first element (a slice of a larger tensor).
    """
    cd = compute_dtype(delta)
    keep = random_keep_mask(keep_prob, delta.numel(), seed, tid, delta.device, index_offset).view(delta.shape)
    x = delta.to(cd)
    kept = torch.where(keep, x if scale == 1.0 else x * float(scale), torch.zeros((), dtype=cd, device=x.device))
    return kept.to(out_dtype or delta.dtype)


def float_key(x: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor as a same-width integer (orders like the floats for x >= 0, NaN top)."""
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def sce_cut_mask(variances: torch.Tensor, var_key: int, cutoff: int, start: int = 0) -> torch.Tensor:
    """SCE's top-variance mask: the variance's bit pattern above ``var_key``, or equal to it at a flat index
    (``start`` + position) below ``cutoff`` (ties at the k-th variance taken in index order)."""
    keys = float_key(variances)
    index = torch.arange(start, start + keys.numel(), device=keys.device).view(keys.shape)
    return (keys > var_key) | ((keys == var_key) & (index < cutoff))


def elect_signs(vectors: torch.Tensor) -> torch.Tensor:
    """TIES' sign consensus over the leading axis: True where an entry has the sign of the column's sum.

    A zero sum elects ``+`` (mergekit's rule); zero entries never agree.
    """
    majority = torch.where(vectors.sum(0) >= 0, 1.0, -1.0).to(vectors.dtype)
    return torch.sign(vectors) == majority


def sce_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    variances: torch.Tensor | None = None,
    var_key: int = 0,
    cutoff: int = 0,
    start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """SCE's elementwise step: variance cut, sign election, weighted disjoint mean, plus the base.

    ``tau_i = models_i - base``, multiplied by the cut mask (kept where the variance's bit pattern
    :func:`float_key` is above ``var_key``, or equal to it at a flat index below ``cutoff``; the element at
    position ``j`` has flat index ``start + j``; ``variances=None`` keeps every entry). Signs are elected on
    the unweighted sum (``>= 0`` elects +; zeros never agree) and the result is
    ``base + sum_i w_i a_i tau_i / max(sum_i w_i a_i, 1e-6)``, ``a_i`` marking agreeing entries.

    Args:
        base: the base tensor.
        models: N models of ``base``'s shape.
        weights: N Python floats (SCE's energy weights).
        variances: the variance of the task vectors across models per element, or None (no cut).
        var_key: the bit pattern of the k-th largest variance.
        cutoff: flat index bound of the entries tied at ``var_key`` that are kept.
        start: flat index of the first element (a chunk of a larger tensor).
        out_dtype: result dtype (default: ``base``'s).

    Returns:
        The merged tensor.
    """
    cd = compute_dtype(base, *models)
    b = base.to(cd)
    tvs = torch.stack([m.to(cd) - b for m in models])
    if variances is not None:
        tvs = tvs * sce_cut_mask(variances, var_key, cutoff, start)  # a product, like mergekit (inf becomes NaN)
    w = torch.tensor([float(x) for x in weights], dtype=cd, device=tvs.device).view(-1, *[1] * (tvs.dim() - 1))
    w = w * elect_signs(tvs)
    merged = (tvs * w).sum(0) / w.sum(0).clamp(min=SCE_MIN_WEIGHT)
    return (b + merged).to(out_dtype or base.dtype)
