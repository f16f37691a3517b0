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

The functions of the first part work on whole tensors (a rank, a top-k or a norm over the tensor). The second
part runs ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear`` and ``sce`` as passes over chunks
for the engine (memory set by the chunk), bit-identical to the whole-tensor functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import RecipeError
from mergekit_safe.kernels import reference
from mergekit_safe.merge.streaming import (
    Chunk,
    Streamed,
    TensorStream,
    aligned_blocks,
    chunk_deltas,
    kth_smallest,
    run_whole,
)

SPARSIFY_METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
# Norms below this are treated as zero when rescaling (mergekit's value).
_RESCALE_EPS = 1e-7
HASH_CHUNK = reference.HASH_CHUNK  # elements hashed at a time by the random masks (bounds int64 temporaries)
REDUCE_BLOCK = 1 << 16  # elements per float64 partial sum of the per-tensor norms (fixed: chunk-independent bits)


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
    # stable: equal magnitudes (the zeros of an unchanged entry are common) are ranked in index order, so a
    # chunk of whole rows ranks them as the whole tensor does, on every device
    order = rows.abs().argsort(dim=1, stable=True)
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

    ``hash`` is DARE's counter hash, so a constant ``p`` reproduces :func:`reference.dare_keep_mask` exactly
    (:func:`reference.random_keep_mask`; the merge applies it through :func:`kernels.random_keep`).
    """
    return reference.random_keep_mask(probs, math.prod(shape), seed, tid, device, chunk=chunk).view(shape)


def della_unit(shape: Sequence[int]) -> int:
    """DELLA's block: whole rows (its rank is taken within a row), as many as fit in :data:`REDUCE_BLOCK`
    elements (at least one); a tensor that is not 2-D is ranked whole, so it is one block.

    DELLA's L1 norms are float64 sums per block, and the engine's chunks hold whole blocks
    (:attr:`Streamed.unit`), so the streamed merge gets the whole-tensor bits.
    """
    numel = math.prod(shape)
    if len(shape) != 2 or shape[1] == 0:
        return max(numel, 1)
    return shape[1] * max(1, REDUCE_BLOCK // shape[1])


def l1_norm(t: torch.Tensor, block: int = REDUCE_BLOCK) -> float:
    """L1 norm in float64, summed per flat block of ``block`` elements and the block sums added in order.

    The blocks sit at fixed offsets, so the chunked merges (:func:`streaming.aligned_blocks`) get the same bits.
    """
    flat = t.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), block):
        total += _l1_block(flat[start:start + block])
    return total


def _l1_block(x: torch.Tensor) -> float:
    return float(x.to(torch.float64).abs().sum())


def _rescale_factor(before: float, after: float) -> float | None:
    """mergekit's L1 rescale factor, or None (unscaled) when either norm is ~0."""
    return None if before < _RESCALE_EPS or after < _RESCALE_EPS else before / after


def _masked(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(kept, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``delta * kept`` scaled so its L1 norm equals ``delta``'s (unscaled when either norm is ~0)."""
    return _rescaled(delta, _masked(delta, kept))


def _rescaled(delta: torch.Tensor, masked: torch.Tensor, block: int = REDUCE_BLOCK) -> torch.Tensor:
    """``masked`` (a fresh tensor) scaled in place so its L1 norm equals ``delta``'s."""
    factor = _rescale_factor(l1_norm(delta, block), l1_norm(masked, block))
    return masked if factor is None else masked.mul_(factor)


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
    index_offset: int = 0,
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
        index_offset: flat index of ``delta``'s first element in its tensor (random methods on a slice; DELLA's
            slice must hold whole rows).

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
    if method in ("random", "della_magprune"):  # the seeded keep, a Triton kernel on CUDA
        probs = float(density) if method == "random" else della_probabilities(delta, density, epsilon)
        masked = kernels.random_keep(delta, probs, seed, tid, index_offset=index_offset)
        if not rescale:
            return masked
        return _rescaled(delta, masked, della_unit(delta.shape) if method == "della_magprune" else REDUCE_BLOCK)
    if method == "magnitude":
        kept = keep_magnitude(delta, density)
    else:
        kept = keep_outliers_removed(delta, density, gamma)
    if rescale:
        return rescale_l1(delta, kept)
    return torch.where(kept, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


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
    return combine_task_vectors(b, deltas, weights, consensus, normalize, lam, out_dtype or base.dtype)


def combine_task_vectors(b: torch.Tensor, deltas: list[torch.Tensor], weights: Sequence[float], consensus: bool,
                         normalize: bool, lam: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``b + lam * combine_i(weight_i * delta_i)`` (the last step of :func:`task_vector_merge`), elementwise:
    :func:`kernels.masked_merge` (one launch on CUDA; TIES' consensus elects no sign where the weighted sum is
    exactly zero, where mergekit elects +: only exact cancellations differ).

    Consumes ``deltas`` (the list is emptied so the task vectors can be freed early).
    """
    merged = kernels.masked_merge(b, deltas, [float(w) for w in weights], inputs_are_deltas=True,
                                  consensus=consensus, normalize=normalize, lam=float(lam), out_dtype=out_dtype)
    deltas.clear()
    return merged


def sce_merge(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float = 1.0,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SCE: Select the top-variance entries, Calculate per-model weights, Erase minority signs.

    ``tau_i = model_i - base`` restricted to the ``k = int(select_topk * nnz(var))`` entries with the largest
    variance across models (ties at the k-th variance taken in index order); weights ``w_i ~ mean(tau_i**2)``
    (summing to 1, uniform when all are ~0); signs elected on the unweighted sum; result
    ``base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)`` where ``m_i`` marks agreeing entries. The whole
    tensor goes through the streamed implementation (:data:`SCE`) as one chunk.

    Args:
        base: the base tensor.
        models: the fine-tuned tensors.
        select_topk: fraction of entries kept (1 keeps all).
        out_dtype: result dtype (default: ``base``'s).

    Returns:
        The merged tensor.
    """
    params = {"select_topk": float(select_topk)}
    return run_whole(SCE, "sce", base, list(models), params, out_dtype or base.dtype)


# --- breadcrumbs and SCE as passes over chunks (the engine's streamed path; memory set by the chunk) ---
#
# Both are exact over chunks: the magnitude and variance ranks are exact order statistics (radix selection,
# streaming.kth_smallest, the value torch.kthvalue picks), and the per-tensor sums (L1 norms, SCE's energies) are
# float64 sums per fixed flat block added in order (streaming.aligned_blocks), so any chunk size gives the bits
# of the whole-tensor run. DELLA's keep probability is the element's magnitude rank within its row, so its
# chunks hold whole rows (Streamed.unit = della_unit): each chunk is ranked, drawn (the hash keyed by the flat
# index) and L1-summed per block exactly as the whole tensor is.


@dataclass(frozen=True)
class _Crumb:
    """One model's breadcrumbs mask: keep ``lo <= |delta| <= hi`` (``keep``: all / none), then scale."""

    keep: str  # "all", "none" or "band"
    lo: float = 0.0
    hi: float = 0.0
    scale: float | None = None


    def band(self) -> tuple[float, float, float]:
        """``(lo, hi, scale)`` of :func:`reference.band` (a negative ``lo`` keeps all, ``lo > hi`` none)."""
        if self.keep == "all":
            return -1.0, math.inf, 1.0
        if self.keep == "none":
            return math.inf, -math.inf, 1.0
        return self.lo, self.hi, 1.0 if self.scale is None else self.scale


def _crumbs(d: torch.Tensor, crumb: _Crumb) -> torch.Tensor:
    return reference.band(d, *crumb.band())


def breadcrumbs_prepare(stream: TensorStream, p: Any) -> list[_Crumb]:
    """Per model, the band of ranks :func:`keep_outliers_removed` keeps (two exact order statistics) and, with
    ``rescale``, the L1 factor of :func:`rescale_l1` (one more pass)."""
    n = stream.numel
    crumbs: list[_Crumb] = []
    queries: list[tuple[int, int]] = []
    for i, (density, gamma) in enumerate(zip(p.per_model["density"], p.per_model["gamma"])):
        target = int(float(density) * n)
        if float(density) >= 1.0:
            crumbs.append(_Crumb("all"))
        elif float(density) <= 0.0 or target <= 0:
            crumbs.append(_Crumb("none"))
        else:
            n_bot = max(0, n - target - int(float(gamma) * n))
            queries += [(i, n_bot + 1), (i, n_bot + target)]
            crumbs.append(_Crumb("band"))
    values = kth_smallest(stream, lambda c: [d.abs() for d in chunk_deltas(c)], queries)
    for (i, _), lo, hi in zip(queries[::2], values[::2], values[1::2]):
        crumbs[i] = _Crumb("band", lo, hi)
    if not bool(p["rescale"]) or not queries:
        return crumbs
    before, after = [0.0] * len(crumbs), [0.0] * len(crumbs)
    for base, models in aligned_blocks(stream, REDUCE_BLOCK):
        cd = reference.compute_dtype(base, *models)
        for i, m in enumerate(models):
            if crumbs[i].keep == "band":
                d = m.to(cd) - base.to(cd)
                before[i] += _l1_block(d)
                after[i] += _l1_block(_crumbs(d, crumbs[i]))
    return [_Crumb("band", c.lo, c.hi, _rescale_factor(before[i], after[i])) if c.keep == "band" else c
            for i, c in enumerate(crumbs)]


def _breadcrumbs_apply(consensus: bool) -> Callable[[Chunk, Any, list[_Crumb], torch.dtype], torch.Tensor]:
    def apply(chunk: Chunk, p: Any, crumbs: list[_Crumb], out_dtype: torch.dtype) -> torch.Tensor:
        assert chunk.base is not None
        lo, hi, scales = zip(*(c.band() for c in crumbs))
        return kernels.masked_merge(chunk.base, chunk.models, [float(w) for w in p.per_model["weight"]], lo=lo,
                                    hi=hi, scales=scales, consensus=consensus, normalize=bool(p["normalize"]),
                                    lam=float(p["lambda"]), out_dtype=out_dtype)

    return apply


BREADCRUMBS = Streamed(_breadcrumbs_apply(consensus=False), breadcrumbs_prepare)
BREADCRUMBS_TIES = Streamed(_breadcrumbs_apply(consensus=True), breadcrumbs_prepare)


@dataclass(frozen=True)
class _SceState:
    """SCE's per-tensor constants: which entries the variance cut keeps, and the model weights."""

    keep: str  # "all", "none" or "cut": variance above ``var_key``, or equal to it below flat index ``cutoff``
    var_key: int = 0  # bit pattern of the k-th largest variance
    cutoff: int = 0
    weights: tuple[float, ...] = ()


def _variances(chunk: Chunk) -> torch.Tensor:
    # abs: a NaN variance may carry a sign bit; the keys must order like kthvalue (NaN above inf)
    return torch.stack(chunk_deltas(chunk)).var(0, unbiased=False).abs()


_key_view = reference.float_key


def _chunk_cut(chunk: Chunk, state: _SceState) -> tuple[torch.Tensor | None, int, int]:
    """The variances and the ``(var_key, cutoff)`` of :func:`reference.sce_cut_mask` for a chunk (None: keep
    all; "none" is a key above every variance's)."""
    if state.keep == "all":
        return None, 0, 0
    var = _variances(chunk)
    if state.keep == "none":
        return var, torch.iinfo(_key_view(var).dtype).max, 0
    return var, state.var_key, state.cutoff


def _sce_keep(chunk: Chunk, state: _SceState) -> torch.Tensor | None:
    var, key, cutoff = _chunk_cut(chunk, state)
    return None if var is None else reference.sce_cut_mask(var, key, cutoff, chunk.start)


def _sce_cut(stream: TensorStream, topk: float) -> _SceState:
    """The top-variance cut: the exact k-th largest variance (radix selection), ties taken in index order."""
    if topk >= 1.0:
        return _SceState("all")
    k = int(sum(int(torch.count_nonzero(_variances(c))) for c in stream.chunks()) * topk) if topk > 0 else 0
    if k <= 0:
        return _SceState("none")
    kth = kth_smallest(stream, lambda c: [_variances(c)], [(0, stream.numel - k + 1)])[0]
    dtype = _variances(next(iter(stream.chunks()))).dtype
    key = int(_key_view(torch.tensor([kth], dtype=dtype)))
    above = sum(int((_key_view(_variances(c)) > key).sum()) for c in stream.chunks())
    return _SceState("cut", key, _tie_cutoff(stream, key, k - above))


def sce_prepare(stream: TensorStream, p: Any) -> _SceState:
    """SCE's cut and its energy weights ``w_i ~ mean(tau_i**2)`` (float64 block sums, chunk-independent)."""
    cut = _sce_cut(stream, float(p["select_topk"]))
    sums = [0.0] * len(next(iter(stream.chunks())).models)
    start = 0
    for base, models in aligned_blocks(stream, REDUCE_BLOCK):
        assert base is not None
        block = Chunk(stream.name, start, start + base.numel(), base, models)
        start = block.stop
        tvs = _sce_task_vectors(block, cut)
        sums = [s + float(t.to(torch.float64).square().sum()) for s, t in zip(sums, tvs)]
    energy = [s / max(stream.numel, 1) for s in sums]
    total = sum(energy)
    w = [e / total for e in energy] if abs(total) >= 1e-6 else [1.0 / len(energy)] * len(energy)
    return _SceState(cut.keep, cut.var_key, cut.cutoff, tuple(w))


def _tie_cutoff(stream: TensorStream, key: int, wanted: int) -> int:
    """One past the flat index of the ``wanted``-th entry whose variance has bit pattern ``key``."""
    seen = 0
    for chunk in stream.chunks():
        hits = (_key_view(_variances(chunk)) == key).nonzero().reshape(-1)
        if seen + hits.numel() >= wanted:
            return chunk.start + int(hits[wanted - seen - 1]) + 1
        seen += hits.numel()
    return stream.numel


def _sce_task_vectors(chunk: Chunk, state: _SceState) -> torch.Tensor:
    tvs = torch.stack(chunk_deltas(chunk))
    keep = _sce_keep(chunk, state)
    return tvs if keep is None else tvs * keep  # a product, like mergekit (an inf outside the cut becomes NaN)


def sce_apply(chunk: Chunk, p: Any, state: _SceState, out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk of SCE: the cut, the sign election and the weighted disjoint mean (:func:`kernels.sce_merge`)."""
    assert chunk.base is not None
    var, key, cutoff = _chunk_cut(chunk, state)
    return kernels.sce_merge(chunk.base, chunk.models, state.weights, var, key, cutoff, chunk.start, out_dtype)


SCE = Streamed(sce_apply, sce_prepare)


@dataclass(frozen=True)
class _DellaState:
    """DELLA's per-tensor constants: the row view of a chunk and each model's L1 rescale factor."""

    rows: tuple[int, ...]
    factors: tuple[float | None, ...]


def _della_rows(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (-1, shape[1]) if len(shape) == 2 else shape


def _della_masked(chunk: Chunk, p: Any, rows: tuple[int, ...], deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each model's task vector of a chunk of whole rows after DELLA's seeded drop (flat, not rescaled)."""
    return [sparsify(d.view(rows), float(density), "della_magprune", epsilon=float(eps), seed=int(p["seed"]),
                     tid=reference.tensor_id(chunk.name, i), index_offset=chunk.start).reshape(-1)
            for i, (d, density, eps) in enumerate(zip(deltas, p.per_model["density"], p.per_model["epsilon"]))]


def della_prepare(stream: TensorStream, p: Any) -> _DellaState:
    """With ``rescale``, each model's L1 factor of :func:`rescale_l1`: one pass drawing the masks, summing
    ``|delta|`` and ``|kept|`` in float64 per :func:`della_unit` block (the whole-tensor blocks)."""
    rows, unit = _della_rows(stream.shape), della_unit(stream.shape)
    densities = [float(d) for d in p.per_model["density"]]
    factors: list[float | None] = [None] * len(densities)
    if not bool(p["rescale"]) or all(d >= 1.0 or d <= 0.0 for d in densities):
        return _DellaState(rows, tuple(factors))
    before, after = [0.0] * len(densities), [0.0] * len(densities)
    for chunk in stream.chunks():
        if chunk.start % unit:
            raise ValueError(f"della: chunk at {chunk.start} of {stream.name} cuts a block of {unit} elements")
        deltas = chunk_deltas(chunk)
        for i, (d, m) in enumerate(zip(deltas, _della_masked(chunk, p, rows, deltas))):
            for s in range(0, d.numel(), unit):
                before[i] += _l1_block(d[s:s + unit])
                after[i] += _l1_block(m[s:s + unit])
    for i, density in enumerate(densities):
        if 0.0 < density < 1.0:
            factors[i] = _rescale_factor(before[i], after[i])
    return _DellaState(rows, tuple(factors))


def _della_apply(consensus: bool) -> Callable[[Chunk, Any, _DellaState, torch.dtype], torch.Tensor]:
    def apply(chunk: Chunk, p: Any, state: _DellaState, out_dtype: torch.dtype) -> torch.Tensor:
        assert chunk.base is not None
        deltas = chunk_deltas(chunk)
        masked = _della_masked(chunk, p, state.rows, deltas)
        del deltas
        for m, factor in zip(masked, state.factors):
            if factor is not None:
                m.mul_(factor)
        base = chunk.base.to(reference.compute_dtype(chunk.base, *chunk.models))
        return combine_task_vectors(base, masked, p.per_model["weight"], consensus, bool(p["normalize"]),
                                    float(p["lambda"]), out_dtype)

    return apply


DELLA = Streamed(_della_apply(consensus=True), della_prepare, della_unit)
DELLA_LINEAR = Streamed(_della_apply(consensus=False), della_prepare, della_unit)
