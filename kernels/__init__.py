"""Merge kernels: Triton on CUDA tensors, the torch reference on CPU. May import only mergekit_safe.errors.

This folder sits at the repository's top level (the design card names it) but ships, and is imported, as
``mergekit_safe.kernels`` (setuptools ``package-dir``): a top-level package named ``kernels`` would clash with
the ``kernels`` distribution that ``transformers`` looks for to load hub kernels. Inside a checkout,
``mergekit_safe/kernels`` is a symlink to it, so the same import works in editable and wheel installs.

The public functions here are what the rest of the package calls; each one dispatches to the Triton
launcher of its kernel family when the tensors live on a CUDA device and Triton is importable, and to
:mod:`mergekit_safe.kernels.reference` otherwise. A :func:`use_backend` scope forces one (the CLI opens it
from ``--backend`` / ``MERGEKIT_SAFE_BACKEND``, read once at the entry); :mod:`.runtime` also holds the one
device rule (:func:`resolve_device`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import cpu as _cpu
from mergekit_safe.kernels import reference
from mergekit_safe.kernels._launch import KERNEL_DTYPES
from mergekit_safe.kernels.runtime import BACKENDS, current_backend, resolve_device, use_backend

# The Triton launchers live in files named after the public functions below, and are imported only when a
# Triton path is taken: importing triton costs ~75 MB and ~0.2 s that a CPU merge never needs. Importing a
# submodule binds it as an attribute of this package, shadowing the function of the same name, so the loader
# puts the function back.
def kernel_module(stem: str) -> ModuleType:
    """The Triton launcher module ``mergekit_safe.kernels.<stem>``, imported on first use (needs triton)."""
    module = importlib.import_module(f"{__name__}.{stem}")
    # the import (and the launchers' imports of each other) bound modules over the public functions
    globals().update(_PUBLIC)
    return module



def triton_available() -> bool:
    """True when Triton imports (the kernels can run on CUDA, or anywhere under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(*tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for these tensors, honouring the :func:`use_backend` scope.

    Raises:
        KernelError: the triton backend is forced where it cannot run.
    """
    forced = current_backend()
    if forced == "torch":
        return "torch"
    on_cuda = any(t.is_cuda for t in tensors)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if forced == "triton":
        if not triton_available():
            raise KernelError("backend triton is forced but triton is not installed (pip install triton)")
        if not (on_cuda or interpret):
            raise KernelError(
                "backend triton is forced but needs CUDA tensors (or TRITON_INTERPRET=1 to run kernels on the CPU)"
            )
        return "triton"
    return "triton" if on_cuda and triton_available() else "torch"


def _use_triton(op: str, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None = None) -> bool:
    """Whether ``op`` runs its Triton kernel on these tensors.

    float64 (or any dtype other than fp32/bf16/fp16) goes to the torch reference under ``auto``; when the
    Triton backend is forced it is an error instead of a silent fallback.

    Raises:
        KernelError: see :func:`select_backend`, or a forced Triton backend with a dtype it cannot take.
    """
    if select_backend(*tensors) == "torch":
        return False
    dtypes = {t.dtype for t in tensors} | ({out_dtype} if out_dtype is not None else set())
    bad = sorted(str(d).removeprefix("torch.") for d in dtypes if d not in KERNEL_DTYPES)
    if not bad:
        return True
    if current_backend() == "triton":
        allowed = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        raise KernelError(f"{op}: backend triton is forced but the kernels take {allowed}, got {', '.join(bad)}")
    return False


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    with torch.no_grad():
        out.copy_(result)
    return out


def weighted_sum(
    inputs: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i coeffs[i] * inputs[i]`` with fp32 math; see :func:`reference.weighted_sum`.

    ``out`` (optional, contiguous) receives the result; it may be one of the inputs.
    """
    if _use_triton("weighted_sum", [*inputs, *([out] if out is not None else [])], out_dtype):
        return kernel_module("weighted_sum").weighted_sum(inputs, coeffs, out_dtype, out=out)
    if out is not None and out.device.type == "cpu" and out.is_contiguous():
        return _cpu.weighted_sum_into(out, inputs, coeffs)
    return _into(out, reference.weighted_sum(inputs, coeffs, out_dtype))


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
) -> torch.Tensor:
    """DARE drop-and-rescale with a counter-based mask; see :func:`reference.dare`.

    ``index_offset`` is the global index of ``delta``'s first element (a slice of a larger tensor).
    """
    if _use_triton("dare", [delta, *([out] if out is not None else [])], out_dtype):
        return kernel_module("dare").dare(delta, p, seed, tid, rescale, out_dtype, out=out, index_offset=index_offset)
    return _into(out, reference.dare(delta, p, seed, tid, rescale, out_dtype, index_offset))


def ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float | Sequence[float],
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES trim / elect / disjoint mean; see :func:`reference.ties`."""
    if _use_triton("ties", [*deltas, *([out] if out is not None else [])], out_dtype):
        return kernel_module("ties").ties(deltas, weights, density, normalize, out_dtype, out=out)
    return _into(out, reference.ties(deltas, weights, density, normalize, out_dtype))


def masked_merge(
    base: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lo: Sequence[float] | None = None,
    hi: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    inputs_are_deltas: bool = False,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``base + lam * combine_i(w_i * scale_i * band_i(delta_i))``; see :func:`reference.masked_merge`.

    On the Triton backend one launch reads the base and the N inputs once and writes once; the torch path
    runs the reference with this package's weighted sum (the CPU-blocked one on the CPU).
    """
    if _use_triton("masked_merge", [base, *inputs], out_dtype):
        return kernel_module("band").masked_merge(
            base, inputs, weights, lo, hi, scales, inputs_are_deltas, consensus, normalize, lam, out_dtype
        )
    return reference.masked_merge(base, inputs, weights, lo, hi, scales, inputs_are_deltas, consensus, normalize,
                                  lam, out_dtype, sum_into=weighted_sum)


def random_keep(
    delta: torch.Tensor,
    keep_prob: torch.Tensor | float,
    seed: int,
    tid: int,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    *,
    index_offset: int = 0,
) -> torch.Tensor:
    """Seeded keep with probability ``keep_prob`` (one or per element), survivors times ``scale``; see
    :func:`reference.random_keep` (DELLA's drop; a constant probability draws DARE's mask)."""
    if _use_triton("random_keep", [delta], out_dtype):
        return kernel_module("dare").random_keep(delta, keep_prob, seed, tid, scale, out_dtype,
                                                 index_offset=index_offset)
    return reference.random_keep(delta, keep_prob, seed, tid, scale, out_dtype, index_offset)


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
    """SCE's cut, sign election and weighted disjoint mean plus the base; see :func:`reference.sce_merge`."""
    if _use_triton("sce_merge", [base, *models, *([variances] if variances is not None else [])], out_dtype):
        return kernel_module("sce").sce_merge(base, models, weights, variances, var_key, cutoff, start, out_dtype)
    return reference.sce_merge(base, models, weights, variances, var_key, cutoff, start, out_dtype)


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spherical interpolation with lerp fallback; see :func:`reference.slerp`."""
    if _use_triton("slerp", [a, b, *([out] if out is not None else [])], out_dtype):
        return kernel_module("slerp").slerp(a, b, t, out_dtype, out=out)
    return _into(out, reference.slerp(a, b, t, out_dtype))


def nearswap(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    out_dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """NearSwap of base ``a`` and model ``b``; see :func:`reference.nearswap`."""
    if _use_triton("nearswap", [a, b, *([out] if out is not None else [])], out_dtype):
        return kernel_module("nearswap").nearswap(a, b, t, out_dtype, out=out)
    return _into(out, reference.nearswap(a, b, t, out_dtype))


def foreach_weighted_sum_(
    outs: Sequence[torch.Tensor],
    inputs: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[Sequence[float]],
) -> None:
    """In place ``outs[j] = sum_k coeffs[j][k] * inputs[j][k]``; see :func:`reference.foreach_weighted_sum_`.

    On the Triton backend all tensors go in one launch per (K, dtypes) group.
    """
    if _use_triton("foreach_weighted_sum_", [*outs, *(x for xs in inputs for x in xs)]):
        with torch.no_grad():
            kernel_module("apply").foreach_weighted_sum_(outs, inputs, coeffs)
        return
    reference.foreach_weighted_sum_(outs, inputs, coeffs)


def apply_(
    targets: Sequence[torch.Tensor],
    bases: Sequence[torch.Tensor],
    deltas: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[Sequence[float]],
) -> None:
    """In place ``targets[j] = bases[j] + sum_k coeffs[j][k] * deltas[j][k]``; see :func:`reference.apply_`.

    On the Triton backend all tensors go in one launch per (K, dtypes) group.
    """
    if _use_triton("apply_", [*targets, *bases, *(d for ds in deltas for d in ds)]):
        with torch.no_grad():
            kernel_module("apply").apply_(targets, bases, deltas, coeffs)
        return
    reference.apply_(targets, bases, deltas, coeffs)


_PUBLIC = {name: globals()[name] for name in ("weighted_sum", "dare", "ties", "slerp", "nearswap")}

__all__ = [
    "BACKENDS", "apply_", "current_backend", "dare", "foreach_weighted_sum_", "kernel_module", "masked_merge",
    "nearswap", "random_keep", "resolve_device", "sce_merge", "select_backend", "slerp", "ties",
    "triton_available", "use_backend", "weighted_sum",
]
