"""One configurable task-vector processor (mergekit's generalized task arithmetic).

A task vector ``delta_i = model_i - base`` is *sparsified* (by magnitude, at random as in DARE, by magnitude
with the largest outliers removed as in Model Breadcrumbs, or by DELLA's magnitude-ranked random drop),
optionally *rescaled* (mergekit's ``rescale``: the survivors are scaled so the L1 norm of the task vector is
kept), weighted, and *combined*: either summed, or summed over the entries that agree with the elected sign
(TIES' consensus). ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear`` and ``sce`` are option
sets of :func:`task_vector_merge` and :func:`sce_merge`; they follow mergekit's definitions and defaults.

Randomness is seeded: ``random`` and ``della_magprune`` compare the per-element uniform draws of DARE's
counter hash (:func:`mergekit_safe.kernels.reference.dare_hash`, keyed by the recipe's ``seed`` and the tensor
name and model index) with each element's keep probability, so a merge is the same on every run and device.
With ``epsilon = 0`` DELLA draws exactly DARE's mask.

Every function here needs whole tensors (a rank, a top-k or a norm over the tensor): the engine hands them
one tensor at a time, so memory is bounded by the largest tensor times the number of inputs, not the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import RecipeError
from mergekit_safe.kernels import reference

SPARSIFY_METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
# Norms below this are treated as zero when rescaling (mergekit's value).
_RESCALE_EPS = 1e-7
HASH_CHUNK = 1 << 20  # elements hashed at a time by the random masks (bounds their int64 temporaries)


def keep_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep mask of the ``max(1, int(density * n))`` largest magnitudes (all when density >= 1, none at 0).

    Ties at the threshold magnitude are all kept (the threshold is a k-th value, not an argsort).
    """
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0.0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    mag = delta.abs()
    return mag >= torch.kthvalue(mag.reshape(-1), n - k + 1).values


def keep_outliers_removed(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' keep mask: drop the ``int(gamma * n)`` largest and then the smallest magnitudes.

    In ascending order of magnitude, the kept ranks are ``[n_bot, n_bot + int(density * n))`` with
    ``n_bot = max(0, n - int(density * n) - int(gamma * n))``: when density and gamma together exceed 1, fewer
    outliers are removed so that the density is met (mergekit's rule).
    """
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    target = int(density * n)
    if target <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    n_bot = max(0, n - target - int(gamma * n))
    mag = delta.abs()
    flat = mag.reshape(-1)
    lo = torch.kthvalue(flat, n_bot + 1).values
    hi = torch.kthvalue(flat, n_bot + target).values
    return (mag >= lo) & (mag <= hi)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability per element: ``density - epsilon + 2 * epsilon * r``, ``r`` the rank in [0, 1].

    Elements are ranked by magnitude within each row (along dim 1; a 1-D tensor is one row), the smallest
    getting ``density - epsilon`` and the largest ``density + epsilon``. A row of one element gets
    ``density - epsilon``.

    Raises:
        RecipeError: ``density +- epsilon`` is not inside (0, 1).
    """
    if density + epsilon >= 1.0 or density - epsilon <= 0.0:
        raise RecipeError(f"della: density {density} +- epsilon {epsilon} must stay inside (0, 1); "
                          "lower epsilon or move density away from 0 and 1")
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = rows.abs().argsort(dim=1)
    # rank = position in the sorted order: one scatter instead of a second argsort
    positions = torch.arange(rows.shape[1], dtype=torch.float64, device=delta.device)
    shape = [1] * rows.dim()
    shape[1] = -1
    probs = torch.empty(order.shape, dtype=torch.float64, device=delta.device)
    probs.scatter_(1, order, positions.view(shape).expand(order.shape))  # the ranks, turned into probs in place
    del order
    width = rows.shape[1] - 1
    if width > 0:
        probs.mul_(2.0 * epsilon / width)
    else:
        probs.zero_()
    return probs.add_(density - epsilon).reshape(delta.shape)


def keep_random(probs: torch.Tensor | float, shape: torch.Size, seed: int, tid: int,
                device: torch.device, chunk: int = HASH_CHUNK) -> torch.Tensor:
    """Seeded Bernoulli keep mask: element ``i`` is kept when ``hash_i >= floor((1 - p_i) * 2**32)``.

    ``hash`` is DARE's counter hash, so a constant ``p`` reproduces :func:`reference.dare_keep_mask` exactly.
    The hashes are drawn ``chunk`` elements at a time, so their int64 temporaries stay small.
    """
    numel = math.prod(shape)
    keep = torch.empty(numel, dtype=torch.bool, device=device)
    flat = probs.reshape(-1) if isinstance(probs, torch.Tensor) else None
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        h = reference.dare_hash(stop - start, seed, tid, device, start=start)
        if flat is None:
            keep[start:stop] = h >= reference.dare_threshold(1.0 - float(probs))
        else:
            p = flat[start:stop].to(torch.float64)
            keep[start:stop] = h >= torch.floor((1.0 - p) * 2.0**32).clamp_(max=2.0**32 - 1).to(torch.int64)
    return keep.view(shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``delta * kept`` scaled so its L1 norm equals ``delta``'s (unscaled when either norm is ~0)."""
    masked = torch.where(kept, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    before = float(torch.linalg.vector_norm(delta, ord=1))
    after = float(torch.linalg.vector_norm(masked, ord=1))
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: str,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    seed: int = 0,
    tid: int = 0,
) -> torch.Tensor:
    """Sparsify one task vector (mergekit's ``sparsify``), computing in ``delta``'s dtype.

    Args:
        delta: the task vector.
        density: fraction of elements kept (in expectation for the random methods); >= 1 keeps everything.
        method: one of :data:`SPARSIFY_METHODS`.
        rescale: scale the survivors so the L1 norm is unchanged (mergekit's ``rescale``).
        gamma: ``magnitude_outliers``: fraction of largest magnitudes removed.
        epsilon: ``della_magprune``: half-width of the keep-probability range.
        seed: the merge's seed (random methods).
        tid: the tensor id, :func:`reference.tensor_id` of (name, model index) (random methods).

    Returns:
        The processed task vector, same shape and dtype.

    Raises:
        RecipeError: unknown method, or DELLA's density and epsilon out of range.

    Example:
        >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5, "magnitude")
        tensor([ 0., -3.,  2.,  0.])
    """
    if method not in SPARSIFY_METHODS:
        raise RecipeError(f"unknown sparsification {method!r}; choose one of {', '.join(SPARSIFY_METHODS)}")
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    if method == "magnitude":
        kept = keep_magnitude(delta, density)
    elif method == "magnitude_outliers":
        kept = keep_outliers_removed(delta, density, gamma)
    elif method == "random":
        kept = keep_random(float(density), delta.shape, seed, tid, delta.device)
    else:
        kept = keep_random(della_probabilities(delta, density, epsilon), delta.shape, seed, tid, delta.device)
    if rescale:
        return rescale_l1(delta, kept)
    return torch.where(kept, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def elect_signs(vectors: torch.Tensor) -> torch.Tensor:
    """TIES' sign consensus over the leading axis: True where an entry has the sign of the column's sum.

    A zero sum elects ``+`` (mergekit's rule); zero entries never agree.
    """
    majority = torch.where(vectors.sum(0) >= 0, 1.0, -1.0).to(vectors.dtype)
    return torch.sign(vectors) == majority


def task_vector_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    *,
    name: str,
    sparsification: str | None,
    consensus: bool,
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool,
    rescale: bool,
    lam: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    seed: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``base + lambda * combine_i(weight_i * sparsify(model_i - base))``: mergekit's generalized task arithmetic.

    The combination is a weighted sum, divided by the summed weights when ``normalize``; with ``consensus``
    only the entries agreeing with the elected sign count, in the sum and in the divisor (TIES).

    Args:
        base: the base tensor.
        models: the fine-tuned tensors, same shape as ``base``.
        name: the tensor's name (keys the random masks).
        sparsification: one of :data:`SPARSIFY_METHODS`, or None to keep whole task vectors.
        consensus: elect signs (TIES) before combining.
        weights: one weight per model.
        densities: one density per model.
        normalize: divide by the (agreeing) summed weights.
        rescale: keep each sparsified task vector's L1 norm.
        lam: scale of the merged task vector (mergekit's ``lambda``).
        gammas: per-model ``gamma`` for ``magnitude_outliers``.
        epsilons: per-model ``epsilon`` for ``della_magprune``.
        seed: seed of the random masks.
        out_dtype: result dtype (default: ``base``'s).

    Returns:
        The merged tensor.
    """
    cd = reference.compute_dtype(base, *models)
    b = base.to(cd)
    deltas = []
    for i, m in enumerate(models):
        d = m.to(cd, copy=True).sub_(b)  # one allocation per task vector (inputs are read-only file views)
        if sparsification is not None:
            d = sparsify(d, float(densities[i]), sparsification, rescale=rescale,
                         gamma=float(gammas[i]) if gammas else 0.0, epsilon=float(epsilons[i]) if epsilons else 0.0,
                         seed=seed, tid=reference.tensor_id(name, i))
        deltas.append(d)
    if consensus:
        # the TIES kernel with density 1 is the consensus step alone (a Triton path on CUDA); it elects no sign
        # where the weighted sum is exactly zero, where mergekit elects + (only exact cancellations differ)
        merged = kernels.ties(deltas, [float(w) for w in weights], 1.0, normalize)
    else:
        total = sum(float(w) for w in weights)
        divisor = total if normalize and abs(total) >= 1e-8 else 1.0
        merged = kernels.weighted_sum(deltas, [float(w) / divisor for w in weights], out=torch.empty_like(deltas[0]))
    del deltas
    dtype = out_dtype or base.dtype
    out = merged if merged.dtype == dtype else torch.empty(merged.shape, dtype=dtype, device=merged.device)
    return kernels.weighted_sum([b, merged], [1.0, float(lam)], out=out)  # out may be merged itself


def sce_merge(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float = 1.0,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SCE: Select the top-variance entries, Calculate per-model weights, Erase minority signs.

    ``tau_i = model_i - base`` restricted to the ``int(select_topk * nnz(var))`` entries with the largest
    variance across models; weights ``w_i ~ mean(tau_i**2)`` (summing to 1, uniform when all are ~0); signs
    elected on the unweighted sum; result ``base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)`` where
    ``m_i`` marks agreeing entries.

    Args:
        base: the base tensor.
        models: the fine-tuned tensors.
        select_topk: fraction of entries kept (1 keeps all).
        out_dtype: result dtype (default: ``base``'s).

    Returns:
        The merged tensor.
    """
    cd = reference.compute_dtype(base, *models)
    b = base.to(cd)
    tvs = torch.stack([m.to(cd) - b for m in models])
    if select_topk < 1.0:
        tvs = tvs * _top_variance(tvs, select_topk)
    agree = elect_signs(tvs)
    energy = tvs.square().reshape(len(models), -1).mean(1)
    total = float(energy.sum())
    w = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1.0 / len(models))
    w = (w.view(-1, *[1] * (tvs.dim() - 1)) * agree)
    merged = (tvs * w).sum(0) / w.sum(0).clamp(min=1e-6)
    return (b + merged).to(out_dtype or base.dtype)


def _top_variance(tvs: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0.0:
        return torch.zeros_like(tvs[0], dtype=torch.bool)
    var = tvs.var(0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    keep = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
    if k > 0:
        keep[torch.topk(var.reshape(-1), k).indices] = True
    return keep.view(var.shape)
