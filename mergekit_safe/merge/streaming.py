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
    shape: tuple[int, ...]

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
    unit: Callable[[tuple[int, ...]], int] | None = None

    def chunk_unit(self, shape: tuple[int, ...]) -> int:
        """Elements every chunk of a tensor of ``shape`` holds a whole multiple of (1: any cut; DELLA: whole
        rows, since its rank is taken within a row)."""
        return max(1, self.unit(shape)) if self.unit is not None else 1


def chunk_step(chunk_elems: int, unit: int) -> int:
    """The chunk size actually used: ``chunk_elems`` rounded down to a multiple of ``unit`` (at least one unit)."""
    return max(unit, chunk_elems - chunk_elems % unit)


class TensorsStream:
    """A :class:`TensorStream` over tensors already in memory (whole-tensor callers and tests).

    Args:
        name: the tensor's name.
        base: the base tensor, or None.
        models: the other inputs, of one shape.
        chunk_elems: elements per chunk; None: one chunk.
        unit: chunks hold whole multiples of this many elements (:meth:`Streamed.chunk_unit`).
    """

    def __init__(self, name: str, base: torch.Tensor | None, models: list[torch.Tensor],
                 chunk_elems: int | None = None, unit: int = 1) -> None:
        self.name = name
        self.base = base.reshape(-1) if base is not None else None
        self.models = [m.reshape(-1) for m in models]
        self.numel = self.models[0].numel() if self.models else 0
        self.shape = tuple(models[0].shape) if models else (0,)
        self.step = chunk_step(max(1, chunk_elems or self.numel or 1), unit)

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, max(self.numel, 1), self.step):
            stop = min(self.numel, start + self.step)
            base = self.base[start:stop] if self.base is not None else None
            yield Chunk(self.name, start, stop, base, [m[start:stop] for m in self.models])


def run_whole(method: Streamed, name: str, base: torch.Tensor | None, models: list[torch.Tensor], params: Any,
              out_dtype: torch.dtype, chunk_elems: int | None = None) -> torch.Tensor:
    """Run a streamed method on whole in-memory tensors (optionally in chunks) and return the merged tensor."""
    like = models[0]
    stream = TensorsStream(name, base, models, chunk_elems, method.chunk_unit(tuple(like.shape)))
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

    The k-th largest ``|delta|`` is found by :func:`kth_smallest` (an exact radix selection: the same number
    ``torch.kthvalue`` picks, NaN sorting above inf in both), so memory stays at one chunk. A tensor that fits
    in one chunk goes to ``kthvalue`` directly.

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
    queries: list[tuple[int, int]] = []  # (task vector, ascending 1-based rank of its k-th largest magnitude)
    out: list[float] = []
    for i, rho in enumerate(densities):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"TIES density must be in [0, 1], got {rho}")
        k = int(rho * n)
        out.append(math.inf if k <= 0 else 0.0)
        if 0 < k < n:
            queries.append((i, n - k + 1))
    values = kth_smallest(stream, lambda c: [d.abs() for d in deltas(c)], queries)
    for (i, _), v in zip(queries, values):
        out[i] = v
    return out


def kth_smallest(stream: TensorStream, values: Callable[[Chunk], list[torch.Tensor]],
                 queries: list[tuple[int, int]]) -> list[float]:
    """Exact order statistics of non-negative per-chunk values, in passes over the chunks.

    A non-negative float orders like its bit pattern read as an integer, so a histogram of the top 16 bits over
    all chunks says which bucket holds the wanted rank, and each further pass narrows the next 16 bits inside
    that bucket (two passes for fp32, four for fp64). The result is the number ``torch.kthvalue`` picks on the
    concatenated values (NaN sorts above inf in both), while memory stays at one chunk.

    Args:
        stream: the tensor's inputs.
        values: the non-negative float32 or float64 values of one chunk, as a list (e.g. one per model).
        queries: ``(index into that list, 1-based ascending rank)`` pairs; ranks in ``[1, numel]``.

    Returns:
        One value per query.
    """
    if not queries:
        return []
    value_dtype = values(next(iter(stream.chunks())))[0].dtype
    key_dtype = _KEY_DTYPES.get(value_dtype)
    if key_dtype is None:
        raise ValueError(f"kth_smallest: values must be float32 or float64, got {value_dtype}")
    ranks = [r for _, r in queries]
    prefixes = [0] * len(queries)
    for shift in range(torch.iinfo(key_dtype).bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        hists = _digit_histograms(stream, values, queries, prefixes, shift, key_dtype)
        for q, hist in enumerate(hists):
            cum = torch.cumsum(hist, 0)
            digit = int(torch.searchsorted(cum, torch.tensor([ranks[q]], dtype=cum.dtype)))
            ranks[q] -= int(cum[digit - 1]) if digit else 0
            prefixes[q] = (prefixes[q] << _DIGIT_BITS) | digit
    return [float(torch.tensor([p], dtype=key_dtype).view(value_dtype)) for p in prefixes]


def _digit_histograms(stream: TensorStream, values: Callable[[Chunk], list[torch.Tensor]],
                      queries: list[tuple[int, int]], prefixes: list[int], shift: int,
                      key_dtype: torch.dtype) -> list[torch.Tensor]:
    """One pass: per query, counts of the 16-bit digit at ``shift`` among keys matching its prefix."""
    bins = 1 << _DIGIT_BITS
    hists = [torch.zeros(bins, dtype=torch.int64) for _ in queries]
    for chunk in stream.chunks():
        vals = values(chunk)
        for q, (i, _) in enumerate(queries):
            keys = vals[i].reshape(-1).view(key_dtype)
            if shift + _DIGIT_BITS < torch.iinfo(key_dtype).bits:
                keys = keys[(keys >> (shift + _DIGIT_BITS)) == prefixes[q]]
            digits = ((keys >> shift) & (bins - 1)).to(torch.int64)
            hists[q] += torch.bincount(digits, minlength=bins).cpu()
    return hists


def aligned_blocks(stream: TensorStream, block: int) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
    """The stream's inputs cut at flat multiples of ``block``, whatever the chunk size: ``(base, models)``.

    A reduction that sums per block and then adds the block results in order gives the same bits for every
    chunk size (a chunk boundary inside a block is stitched over in one buffer per input, so at most one block
    per input is held). A yielded block is valid until the next one is asked for.
    """
    carry: list[torch.Tensor] = []  # per input, the unfinished block (the engine reuses chunk buffers: copied)
    held = 0
    has_base = False
    for chunk in stream.chunks():
        has_base = chunk.base is not None
        pieces = ([chunk.base] if has_base else []) + list(chunk.models)
        n, pos = chunk.stop - chunk.start, 0
        if held:
            take = min(block - held, n)
            for c, p in zip(carry, pieces):
                c[held:held + take].copy_(p[:take])
            held, pos = held + take, take
            if held == block:
                yield _split(carry, has_base)
                held = 0
        while pos + block <= n:
            yield _split([p[pos:pos + block] for p in pieces], has_base)
            pos += block
        if pos < n:
            if not carry:
                carry = [torch.empty(block, dtype=p.dtype, device=p.device) for p in pieces]
            for c, p in zip(carry, pieces):
                c[:n - pos].copy_(p[pos:])
            held = n - pos
    if held:
        yield _split([c[:held] for c in carry], has_base)


def _split(pieces: list[torch.Tensor], has_base: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    return (pieces[0], pieces[1:]) if has_base else (None, pieces)


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
