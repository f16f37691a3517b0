"""Non-linear merge methods in chunks: memory set by the chunk size, not by the largest tensor.

A streamed method is two plain functions (:class:`Streamed`): ``prepare`` makes as many passes over a
tensor's chunks as it needs to compute per-tensor constants (SLERP's dot product and norms, TIES' magnitude
thresholds), and ``apply`` turns one chunk of the inputs into that chunk of the output, elementwise. The
engine feeds chunks read from memory-mapped files; :func:`run_whole` feeds in-memory tensors, so a method has
one implementation whether it sees a 16 GiB tensor from disk or a test's float64 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mergekit_safe.kernels import reference

# Radix selection digit: 16 bits make 65536 histogram bins (512 KB of int64 counts), two passes for fp32 keys.
_DIGIT_BITS = 16
_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class Chunk:
    """Flat elements ``[start, stop)`` of one output tensor's inputs.

    Attributes:
        name: the tensor's name.
        start: first flat element.
        stop: one past the last.
        base: the base model's piece, or None.
        models: the other inputs' pieces, in recipe order.
    """

    name: str
    start: int
    stop: int
    base: torch.Tensor | None
    models: list[torch.Tensor]


class TensorStream(Protocol):
    """The inputs of one output tensor, readable any number of times as a sequence of :class:`Chunk`."""

    name: str
    numel: int

    def chunks(self) -> Iterator[Chunk]:
        """The chunks in order, covering ``[0, numel)``; each call starts a new pass."""
        ...


@dataclass(frozen=True)
class Streamed:
    """A non-linear method as passes over chunks.

    Attributes:
        apply: ``(chunk, params, state, out_dtype) -> flat piece`` of the output, elementwise.
        prepare: ``(stream, params) -> state``: per-tensor constants from passes over the chunks (None: no
            constants needed).
    """

    apply: Callable[[Chunk, Any, Any, torch.dtype], torch.Tensor]
    prepare: Callable[[TensorStream, Any], Any] | None = None


class TensorsStream:
    """A :class:`TensorStream` over tensors already in memory (whole-tensor callers and tests).

    Args:
        name: the tensor's name.
        base: the base tensor, or None.
        models: the other inputs, of one shape.
        chunk_elems: elements per chunk; None: one chunk.
    """

    def __init__(self, name: str, base: torch.Tensor | None, models: list[torch.Tensor],
                 chunk_elems: int | None = None) -> None:
        self.name = name
        self.base = base.reshape(-1) if base is not None else None
        self.models = [m.reshape(-1) for m in models]
        self.numel = self.models[0].numel() if self.models else 0
        self.step = max(1, chunk_elems or self.numel or 1)

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, max(self.numel, 1), self.step):
            stop = min(self.numel, start + self.step)
            base = self.base[start:stop] if self.base is not None else None
            yield Chunk(self.name, start, stop, base, [m[start:stop] for m in self.models])


def run_whole(method: Streamed, name: str, base: torch.Tensor | None, models: list[torch.Tensor], params: Any,
              out_dtype: torch.dtype, chunk_elems: int | None = None) -> torch.Tensor:
    """Run a streamed method on whole in-memory tensors (optionally in chunks) and return the merged tensor."""
    like = models[0]
    stream = TensorsStream(name, base, models, chunk_elems)
    state = method.prepare(stream, params) if method.prepare is not None else None
    out = torch.empty(stream.numel, dtype=out_dtype, device=like.device)
    for chunk in stream.chunks():
        out[chunk.start:chunk.stop] = method.apply(chunk, params, state, out_dtype)
    return out.view(like.shape)


def chunk_deltas(chunk: Chunk) -> list[torch.Tensor]:
    """``model - base`` for each model of a chunk, in the merge's compute dtype (fp32, fp64 for fp64 inputs)."""
    assert chunk.base is not None
    cd = reference.compute_dtype(chunk.base, *chunk.models)
    base = chunk.base.to(cd)
    return [m.to(cd) - base for m in chunk.models]


def magnitude_thresholds(stream: TensorStream, deltas: Callable[[Chunk], list[torch.Tensor]],
                         densities: list[float]) -> list[float]:
    """:func:`reference.magnitude_threshold` of each task vector, computed in passes over the chunks.

    The k-th largest ``|delta|`` is found by an exact radix selection: a non-negative float orders like its
    bit pattern read as an integer, so a histogram of the top 16 bits over all chunks says which bucket holds
    the k-th value, and each further pass narrows the next 16 bits inside that bucket (two passes for fp32,
    four for fp64). The result is the same number ``torch.kthvalue`` picks (NaN sorts above inf in both), while
    memory stays at one chunk. A tensor that fits in one chunk goes to ``kthvalue`` directly.

    Args:
        stream: the tensor's inputs.
        deltas: the task vectors of one chunk (one per density).
        densities: fraction each task vector keeps, in [0, 1].

    Returns:
        One threshold per task vector.
    """
    n = stream.numel
    first = next(iter(stream.chunks()))
    if first.stop - first.start >= n:  # the whole tensor is one chunk: no passes needed
        return [reference.magnitude_threshold(d, rho) for d, rho in zip(deltas(first), densities)]
    # rank (1-based, ascending) of the k-th largest magnitude; None when the answer needs no pass
    ranks: list[int | None] = []
    out: list[float] = []
    for rho in densities:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"TIES density must be in [0, 1], got {rho}")
        k = int(rho * n)
        out.append(math.inf if k <= 0 else 0.0)
        ranks.append(n - k + 1 if 0 < k < n else None)
    if not any(r is not None for r in ranks):
        return out
    value_dtype = deltas(first)[0].dtype
    key_dtype = _KEY_DTYPES.get(value_dtype)
    if key_dtype is None:
        raise ValueError(f"magnitude_thresholds: task vectors must be float32 or float64, got {value_dtype}")
    bits = torch.iinfo(key_dtype).bits
    prefixes = [0] * len(ranks)
    for shift in range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hists = _digit_histograms(stream, deltas, ranks, prefixes, shift, key_dtype)
        for i, (rank, hist) in enumerate(zip(ranks, hists)):
            if rank is None:
                continue
            cum = torch.cumsum(hist, 0)
            digit = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)))
            ranks[i] = rank - (int(cum[digit - 1]) if digit else 0)
            prefixes[i] = (prefixes[i] << _DIGIT_BITS) | digit
    for i, rho in enumerate(densities):
        if ranks[i] is not None:
            key = torch.tensor([prefixes[i]], dtype=key_dtype)
            out[i] = float(key.view(value_dtype))
    return out


def _digit_histograms(stream: TensorStream, deltas: Callable[[Chunk], list[torch.Tensor]],
                      ranks: list[int | None], prefixes: list[int], shift: int,
                      key_dtype: torch.dtype) -> list[torch.Tensor]:
    """One pass: per task vector, counts of the 16-bit digit at ``shift`` among keys matching the prefix."""
    bins = 1 << _DIGIT_BITS
    hists = [torch.zeros(bins, dtype=torch.int64) for _ in ranks]
    for chunk in stream.chunks():
        for i, d in enumerate(deltas(chunk)):
            if ranks[i] is None:
                continue
            keys = d.abs().reshape(-1).view(key_dtype)
            if shift + _DIGIT_BITS < torch.iinfo(key_dtype).bits:
                keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefixes[i]]
            digits = ((keys >> shift) & (bins - 1)).to(torch.int64)
            hists[i] += torch.bincount(digits, minlength=bins).cpu()
    return hists


def dot_and_norms(stream: TensorStream) -> tuple[float, float, float]:
    """``(base . model, |base|, |model|)`` of a two-input tensor, per-chunk sums added in float64."""
    dot = aa = bb = 0.0
    for chunk in stream.chunks():
        assert chunk.base is not None
        cd = reference.compute_dtype(chunk.base, *chunk.models)
        a, b = chunk.base.to(cd).reshape(-1), chunk.models[0].to(cd).reshape(-1)
        dot += float(torch.dot(a, b))
        aa += float(torch.dot(a, a))
        bb += float(torch.dot(b, b))
    return dot, math.sqrt(aa), math.sqrt(bb)
