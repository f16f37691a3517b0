"""Merges that see tensors as points on a sphere or in a cone (model_stock, nuslerp, multislerp, karcher), and
the elementwise nearswap.

Each of them (in its default, whole-tensor form) needs only the inner products of its inputs: given the
Gram matrix ``G_ij = <x_i, x_j>`` (of the task vectors ``x_i = model_i - base`` when there is a base), the
result is a weighted sum ``sum_i c_i x_i`` whose few coefficients are computed on the host in float64. So every
method here is two passes over the tensors: one reduction (:func:`gram`, float64 accumulation in bounded
chunks, never materializing a task vector) and one weighted sum through the merge kernel (the Triton path on
CUDA). The Karcher mean's fixed-point iteration runs entirely in that coefficient space.

The row-wise variants (``model_stock`` with ``filter_wise``, ``nuslerp`` without ``nuslerp_flatten``) have one
set of coefficients per row and run in plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import MergeKitSafeError
from mergekit_safe.kernels import reference
from mergekit_safe.merge.streaming import Chunk, TensorStream, aligned_blocks

GRAM_CHUNK = 1 << 20  # elements per float64 slice: 8 MB of scratch per input, whatever the tensor's size


def gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """Gram matrix of ``tensors`` (of ``t - base`` when ``base`` is given), accumulated in float64.

    Args:
        tensors: N tensors of one shape.
        base: subtracted from each tensor first (exactly, in float64 per chunk), or None.
        chunk: elements converted to float64 at a time.

    Returns:
        An ``(N, N)`` float64 CPU tensor.
    """
    acc = torch.zeros(len(tensors), len(tensors), dtype=torch.float64, device=tensors[0].device)
    flats = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    for start in range(0, flats[0].numel(), chunk):
        piece = flat_base[start:start + chunk] if flat_base is not None else None
        _add_gram_block(acc, [f[start:start + chunk] for f in flats], piece)
    return acc.cpu()


def gram_stream(stream: TensorStream, subtract_base: bool, include_base: bool = False) -> torch.Tensor:
    """:func:`gram` of a stream's inputs, read chunk by chunk and bit-identical to :func:`gram` on the whole
    tensors: the float64 blocks are cut at the same flat offsets (multiples of :data:`GRAM_CHUNK`) whatever the
    chunk size, and added in the same order.

    Args:
        stream: the tensor's inputs.
        subtract_base: Gram of ``model_i - base`` (the stream has a base).
        include_base: the base is one more input (first), itself not subtracted.

    Returns:
        An ``(N, N)`` float64 CPU tensor.
    """
    acc: torch.Tensor | None = None
    for base, models in aligned_blocks(stream, GRAM_CHUNK):
        inputs = ([base] if include_base and base is not None else []) + models
        if acc is None:
            acc = torch.zeros(len(inputs), len(inputs), dtype=torch.float64, device=inputs[0].device)
        _add_gram_block(acc, inputs, base if subtract_base else None)
    assert acc is not None
    return acc.cpu()


def _add_gram_block(acc: torch.Tensor, pieces: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
    # one float64 buffer, filled in place: the only scratch that scales with the block
    rows = torch.empty(len(pieces), pieces[0].numel(), dtype=torch.float64, device=pieces[0].device)
    for row, p in zip(rows, pieces):
        row.copy_(p)
        if base is not None:
            row.sub_(base)  # computed in float64 (the exact widening of base), as base.to(float64) would be
    acc += rows @ rows.T


def _combine(base: torch.Tensor | None, models: Sequence[torch.Tensor], coeffs: Sequence[float],
             out_dtype: torch.dtype | None) -> torch.Tensor:
    """``base + sum_i c_i (m_i - base)`` (or ``sum_i c_i m_i``) as one weighted sum of the inputs."""
    first = base if base is not None else models[0]
    # an explicit output lets the CPU path work in cache-sized blocks, with no full-size temporary per input
    out = torch.empty(first.shape, dtype=out_dtype or first.dtype, device=first.device)
    cs = [float(c) for c in coeffs]
    if base is None:
        return kernels.weighted_sum(list(models), cs, out=out)
    return kernels.weighted_sum([base, *models], [1.0 - sum(cs), *cs], out=out)


def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor], filter_wise: bool = False,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Model Stock: move from the base towards the fine-tunes' average by ``t = N cos / (1 + (N - 1) cos)``.

    ``cos`` is the mean pairwise cosine of the task vectors (per row with ``filter_wise``); where the
    denominator vanishes the base is kept.

    Args:
        base: the pre-trained tensor.
        models: N >= 2 fine-tuned tensors.
        filter_wise: one ``t`` per row (the last dimension is a row) instead of one per tensor.
        out_dtype: result dtype (default: ``base``'s).

    Returns:
        ``t * mean(models) + (1 - t) * base``.
    """
    if filter_wise:
        return _model_stock_rows(base, models, out_dtype)
    return _combine(base, models, model_stock_coefficients(gram(models, base)), out_dtype)


def model_stock_coefficients(g: torch.Tensor) -> list[float]:
    """Model Stock's coefficient ``t / N`` of each task vector, from the task vectors' Gram matrix."""
    n = g.shape[0]
    norms = g.diagonal().sqrt()
    cos = [max(-1.0, min(1.0, float(g[i, j]) / max(float(norms[i] * norms[j]), 1e-6)))
           for i in range(n) for j in range(i + 1, n)]
    c = sum(cos) / len(cos)
    den = 1.0 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    return [t / n] * n


def _model_stock_rows(base: torch.Tensor, models: Sequence[torch.Tensor],
                      out_dtype: torch.dtype | None) -> torch.Tensor:
    cd = reference.compute_dtype(base, *models)
    b = base.to(cd).reshape(1, -1) if base.dim() < 2 else base.to(cd)
    ws = [m.to(cd).reshape(b.shape) for m in models]
    offsets = [w - b for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for o in offsets[i + 1:]:
            norm = (a.norm(dim=-1) * o.norm(dim=-1)).clamp(min=1e-6)
            cos.append(((a * o).sum(-1) / norm).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(models)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    out = t * (sum(ws) / n) + (1 - t) * b
    return out.reshape(base.shape).to(out_dtype or base.dtype)


def slerp_pair_coefficients(dot: float, norm0: float, norm1: float, t: float, eps: float = 1e-8) -> tuple[float, float]:
    """NuSLERP's two coefficients: ``sin((1-t) theta)/sin(theta)`` and ``sin(t theta)/sin(theta)``.

    Lerp's ``(1 - t, t)`` when the directions are colinear, ``1 - cos**2 <= eps**2`` (mergekit's test, tighter
    than SLERP's 0.9995 cut-off). Norms are clamped at 1e-7 like mergekit's normalization.
    """
    cos = max(-1.0, min(1.0, dot / (max(norm0, 1e-7) * max(norm1, 1e-7))))
    if 1.0 - cos * cos <= eps * eps:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def nuslerp(base: torch.Tensor | None, models: Sequence[torch.Tensor], weights: Sequence[float],
            row_wise: bool = False, flatten: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NuSLERP: SLERP between two models (or their task vectors when there is a base) at ``t = w1 / (w0 + w1)``.

    Args:
        base: optional base; with one, the task vectors are interpolated and added back to it.
        models: exactly two tensors.
        weights: their weights (``t = 0.5`` when they sum to ~0).
        row_wise: without ``flatten``, interpolate columns (dim 0) instead of rows (the last dim).
        flatten: interpolate the whole tensor as one vector (mergekit's default).
        out_dtype: result dtype.

    Returns:
        The interpolated tensor.
    """
    t = _nuslerp_t(weights)
    if flatten or models[0].dim() == 0:
        g = gram(models, base)
        c0, c1 = slerp_pair_coefficients(float(g[0, 1]), math.sqrt(g[0, 0]), math.sqrt(g[1, 1]), t)
        return _combine(base, models, [c0, c1], out_dtype)
    cd = reference.compute_dtype(*models, *([base] if base is not None else []))
    v0, v1 = (m.to(cd) - (base.to(cd) if base is not None else 0) for m in models)
    if row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise:
        out = out.transpose(0, -1)
    if base is not None:
        out = out + base.to(cd)
    return out.to(out_dtype or (base if base is not None else models[0]).dtype)


def _nuslerp_t(weights: Sequence[float]) -> float:
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


def multislerp_coefficients(g: torch.Tensor, weights: Sequence[float], normalize: bool = True,
                            eps: float = 1e-8) -> list[float]:
    """Multi-SLERP's coefficients over the inputs from their Gram matrix (all in float64).

    The inputs are projected on the unit sphere, the weighted mean direction ``m`` is taken, the points are
    mapped to the tangent space at ``m``, averaged there, mapped back by the exponential map and scaled by
    the weighted mean norm. Every step is a linear combination of the inputs, so it runs on coefficients.

    Raises:
        MergeKitSafeError: more than two inputs whose weighted unit vectors cancel (no mean direction).
    """
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = g.diagonal().sqrt()
    inv = 1.0 / (norms + eps)  # x_i -> unit_i
    mean = w * inv  # coefficients of sum_i w_i unit_i
    mean_norm = abs(float(mean @ g @ mean)) ** 0.5
    if mean_norm < eps:
        if len(weights) == 2:
            return w.tolist()
        raise MergeKitSafeError("multislerp: the weighted unit vectors cancel out (antipodal inputs with "
                                "balancing weights); use different weights")
    mean = mean / mean_norm
    dots = inv * (g @ mean)  # <unit_i, m>
    tangent = w * inv - float((w * dots).sum()) * mean
    tn = abs(float(tangent @ g @ tangent)) ** 0.5 + eps
    result = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    return (result * float((norms * w).sum())).tolist()


def multislerp(base: torch.Tensor | None, models: Sequence[torch.Tensor], weights: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Multi-SLERP: barycentric interpolation of N models (of their task vectors when there is a base).

    A single model is returned as it is.
    """
    if len(models) == 1:
        return models[0].to(out_dtype or models[0].dtype)
    coeffs = multislerp_coefficients(gram(models, base), weights, normalize_weights, eps)
    return _combine(base, models, coeffs, out_dtype)


def karcher_coefficients(g: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """Coefficients of the Karcher (Riemannian) mean of N inputs with equal weights, from their Gram matrix.

    The inputs' directions are averaged on the unit sphere by the fixed-point iteration
    ``m <- exp_m(sum_i a_i log_m(u_i))`` (at most ``max_iter`` steps, stopping when the tangent step is below
    ``tol``; inputs with norm <= ``tol`` take no part), then scaled by the mean norm. The iterate stays in the
    span of the inputs, so it is kept as coefficients over the unit vectors.
    """
    n = g.shape[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * n
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    gu = g / torch.outer(safe, safe)  # Gram of the unit vectors
    a = torch.zeros(n, dtype=torch.float64)
    a[valid] = 1.0 / len(valid)

    def norm(c: torch.Tensor) -> float:
        return abs(float(c @ gu @ c)) ** 0.5

    mean_norm = norm(a)
    mean = torch.zeros(n, dtype=torch.float64)
    if mean_norm < tol:
        mean[valid[0]] = 1.0
    else:
        mean = a / mean_norm
    for _ in range(max_iter):
        dots = (gu @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            step = (1.0 / len(valid)) * theta / math.sin(theta)
            tangent[i] += step
            tangent -= step * float(dots[i]) * mean
        tn = norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        unit = norm(mean)
        if unit > tol:
            mean = mean / unit
    scale = sum(al * float(nm) for al, nm in zip(alphas, norms))
    return (scale * mean / safe).tolist()


def karcher(inputs: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Karcher mean of the inputs (mergekit's ``karcher``: the base, if any, is one more input)."""
    if len(inputs) == 1:
        return inputs[0].to(out_dtype or inputs[0].dtype)
    return _combine(None, inputs, karcher_coefficients(gram(inputs), max_iter, tol), out_dtype)


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NearSwap: take the model's value where it is within ``t`` of the base, interpolate elsewhere.

    ``w = clamp(t / max(|base - model|, 1e-6), 0, 1)``; result ``w * model + (1 - w) * base``. Elementwise
    (the nearswap kernel: Triton on CUDA).
    """
    return kernels.nearswap(base, model, t, out_dtype=out_dtype)


# --- the same methods as passes over chunks (the engine's streamed path): one Gram pass, one weighted-sum pass ---
#
# prepare() returns the coefficients of one weighted sum over the chunk's inputs (base first when there is one),
# computed by the functions above from gram_stream(), which is bit-identical to gram() on whole tensors: so a
# streamed merge equals the whole-tensor function exactly. The row-wise options (model_stock's filter_wise,
# nuslerp without flatten) have one set of coefficients per row and are not streamed: their prepare gathers the
# whole tensors and computes the result once (memory as before, the largest tensor times the inputs).

COPY_FIRST_MODEL = "copy"  # state: the output is the first model, unchanged


def _with_base(cs: Sequence[float]) -> list[float]:
    """Coefficients over ``[base, *models]`` of ``base + sum_i c_i (m_i - base)`` (as :func:`_combine`)."""
    cs = [float(c) for c in cs]
    return [1.0 - sum(cs), *cs]


def apply_coefficients(chunk: Chunk, params: object, state: object, out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk of a geometric merge: the weighted sum ``prepare`` planned (or its precomputed slice)."""
    if isinstance(state, torch.Tensor):  # a row-wise option: computed whole in prepare, in the compute dtype
        return state[chunk.start:chunk.stop].to(out_dtype)
    if state == COPY_FIRST_MODEL:
        return chunk.models[0].to(out_dtype)
    inputs = ([chunk.base] if chunk.base is not None else []) + list(chunk.models)
    out = torch.empty(chunk.stop - chunk.start, dtype=out_dtype, device=inputs[0].device)
    return kernels.weighted_sum(inputs, [float(c) for c in state], out=out)  # type: ignore[union-attr]


def gather(stream: TensorStream) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The stream's whole tensors, in their shape (for the options that need whole rows)."""
    bases, models = [], []
    for chunk in stream.chunks():
        if chunk.base is not None:
            bases.append(chunk.base.clone())
        models.append([m.clone() for m in chunk.models])
    whole = [torch.cat(ms).view(stream.shape) for ms in zip(*models)]
    return (torch.cat(bases).view(stream.shape) if bases else None), whole


def model_stock_prepare(stream: TensorStream, p: Any) -> object:
    """Streamed :func:`model_stock`: ``p`` holds ``filter_wise``."""
    if bool(p["filter_wise"]):
        base, models = gather(stream)
        assert base is not None
        return _model_stock_rows(base, models, reference.compute_dtype(base, *models)).reshape(-1)
    return _with_base(model_stock_coefficients(gram_stream(stream, subtract_base=True)))


def nuslerp_prepare(stream: TensorStream, p: Any) -> object:
    """Streamed :func:`nuslerp`: ``p`` holds ``weight`` (per model), ``nuslerp_row_wise``, ``nuslerp_flatten``."""
    weights = p.per_model["weight"]
    if not bool(p["nuslerp_flatten"]) and len(stream.shape) > 0:
        base, models = gather(stream)
        cd = reference.compute_dtype(*models, *([base] if base is not None else []))
        return nuslerp(base, models, weights, bool(p["nuslerp_row_wise"]), False, out_dtype=cd).reshape(-1)
    has_base = next(iter(stream.chunks())).base is not None
    g = gram_stream(stream, subtract_base=has_base)
    cs = slerp_pair_coefficients(float(g[0, 1]), math.sqrt(g[0, 0]), math.sqrt(g[1, 1]), _nuslerp_t(weights))
    return _with_base(cs) if has_base else list(cs)


def multislerp_prepare(stream: TensorStream, p: Any) -> object:
    """Streamed :func:`multislerp`: ``p`` holds ``weight`` (per model), ``normalize_weights``, ``eps``."""
    weights = p.per_model["weight"]
    if len(weights) == 1:
        return COPY_FIRST_MODEL
    has_base = next(iter(stream.chunks())).base is not None
    cs = multislerp_coefficients(gram_stream(stream, subtract_base=has_base), weights,
                                 bool(p["normalize_weights"]), float(p["eps"]))
    return _with_base(cs) if has_base else cs


def karcher_prepare(stream: TensorStream, p: Any) -> object:
    """Streamed :func:`karcher` (a base is one more input): ``p`` holds ``max_iter`` and ``tol``."""
    g = gram_stream(stream, subtract_base=False, include_base=True)
    if g.shape[0] == 1:
        return COPY_FIRST_MODEL
    return karcher_coefficients(g, int(p["max_iter"]), float(p["tol"]))


def nearswap_apply(chunk: Chunk, p: Any, state: object, out_dtype: torch.dtype) -> torch.Tensor:
    """One chunk of :func:`nearswap` (elementwise): ``p`` holds ``t``."""
    assert chunk.base is not None
    return nearswap(chunk.base, chunk.models[0], float(p["t"]), out_dtype=out_dtype)
