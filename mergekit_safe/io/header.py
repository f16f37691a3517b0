"""A safetensors header parser that accepts exactly what ``safetensors.safe_open`` (0.8) accepts.

The rules, each mirrored from the Rust reader (``safetensors/src/tensor.rs``) and its serde/serde_json
parsing, and checked against ``safe_open`` by ``tests/test_fuzz_header.py``:

- the file starts with a little-endian u64 header length ``n``; ``n <= 100_000_000`` and ``8 + n`` fits in
  the file; the header is strict UTF-8 JSON: no NaN/Infinity, no comments, no lone surrogate escapes, no number
  outside the float64 range, at most 127 nested arrays/objects;
- the top level is an object; ``__metadata__`` appears at most once and is null or an object of strings;
- every other key is a tensor: an object with ``dtype``, ``shape`` and ``data_offsets`` (each once; other
  fields are ignored) or the array ``[dtype, shape, data_offsets]``; ``dtype`` is a safetensors dtype name
  (or ``{"NAME": null}``); shape entries and the two offsets are integers in ``[0, 2**64)``;
- sorted by offsets, the tensors tile the data section from byte 0 with no gap or overlap, each spans exactly
  ``prod(shape) * bits(dtype) / 8`` bytes (no u64 overflow, whole bytes), and the last one ends at the end of
  the file: no truncation, no trailing bytes;
- what ``safe_open``'s torch loader then refuses is refused here too: a dtype torch has no type for (F6), an
  F4 tensor whose last dimension is odd, a dimension above ``2**63 - 1``, a zero-size shape whose strides
  overflow torch.

One deliberate difference: a tensor name that appears twice is refused (``safe_open`` keeps the last entry
and accepts the file when that entry tiles). Two entries for one name mean two readers can see two different
tensors, so the file is ambiguous however it tiles.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.errors import CheckpointError
from mergekit_safe.io.dtypes import SAFETENSORS_PACKED as _PACKED
from mergekit_safe.io.dtypes import SAFETENSORS_TABLE as _DTYPE_TABLE

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
MAX_JSON_DEPTH = 127  # serde_json's recursion limit, counted in nested arrays/objects, the top level included
_U64 = 2**64
_I64_MAX = 2**63 - 1

_Entry = tuple[str, str, list[int], tuple[int, int]]  # name, safetensors dtype, shape, (begin, end)
_Placed = tuple[str, str, list[int], int, int]  # the same, validated, in offset order


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it, after validation.

    Attributes:
        name: tensor name.
        dtype: torch dtype (``float4_e2m1fn_x2`` for F4).
        shape: the torch shape (for F4 the last dimension is halved, as ``safe_open`` does).
        start: absolute byte offset of the data in the file.
        nbytes: size of the data in bytes.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


class _Obj(list):  # type: ignore[type-arg]
    """A JSON object kept as its ``(key, value)`` pairs, so repeated keys stay visible."""


class _BadJson(ValueError):
    """A JSON text serde_json would refuse although Python's json accepts it."""


def _parse_int(text: str) -> int | float:
    # serde_json reads "-0" as a float and integers outside [-2**63, 2**64) as floats.
    if text == "-0":
        return -0.0
    if len(text) > 21:  # longer than any i64/u64; also avoids Python's int-digits limit
        return _parse_float(text)
    value = int(text)
    return value if -(2**63) <= value < _U64 else float(value)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _BadJson(f"number out of range: {text[:40]}")
    return value


def _reject_constant(text: str) -> Any:
    raise _BadJson(f"{text} is not JSON")


def _check_tree(root: Any) -> None:
    """Depth limit and lone surrogates, walked without recursion (a header can nest 10**8 deep)."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, _Obj)):
            if depth > MAX_JSON_DEPTH:
                raise _BadJson(f"nested deeper than {MAX_JSON_DEPTH} levels")
            items = [x for pair in node for x in pair] if isinstance(node, _Obj) else node
            stack.extend((x, depth + 1) for x in items)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise _BadJson("a string holds a lone UTF-16 surrogate escape") from None


def parse_json_strict(text: str) -> Any:
    """Parse JSON the way serde_json does (objects come back as :class:`_Obj` pair lists).

    Raises:
        ValueError: the text is not JSON serde_json accepts.
    """
    try:
        root = json.loads(text, object_pairs_hook=_Obj, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_reject_constant)
    except RecursionError:
        raise _BadJson(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_tree(root)
    return root


def _short(value: Any) -> str:
    """A bounded repr for messages (a hostile header can hold megabytes in one field)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _usize(value: Any) -> bool:
    return type(value) is int and 0 <= value < _U64


def _fields(value: Any) -> tuple[Any, Any, Any]:
    """``(dtype, shape, data_offsets)`` of one tensor entry (object or 3-element array form)."""
    if isinstance(value, _Obj):
        found: dict[str, Any] = {}
        for key, item in value:
            if key in ("dtype", "shape", "data_offsets"):
                if key in found:
                    raise ValueError(f"field {_short(key)} appears twice")
                found[key] = item
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in found]
        if missing:
            raise ValueError(f"missing field {missing[0]!r}")
        return found["dtype"], found["shape"], found["data_offsets"]
    if isinstance(value, list) and len(value) == 3:
        return value[0], value[1], value[2]
    raise ValueError("entry is not an object with dtype, shape and data_offsets")


def _dtype_name(value: Any) -> str:
    if isinstance(value, _Obj) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]  # serde's externally tagged form of a unit variant: {"F32": null}
    if isinstance(value, str) and value in _DTYPE_TABLE:
        return value
    raise ValueError(f"unknown dtype {_short(value)}; safetensors has {', '.join(_DTYPE_TABLE)}")


def _tensor(name: str, value: Any) -> _Entry:
    dtype, shape, offsets = _fields(value)
    dtype = _dtype_name(dtype)
    if not isinstance(shape, list) or not all(_usize(d) for d in shape):
        raise ValueError(f"shape {_short(shape)} is not a list of integers in [0, 2**64)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_usize(o) for o in offsets)):
        raise ValueError(f"data_offsets {_short(offsets)} are not two integers in [0, 2**64)")
    return name, dtype, shape, (offsets[0], offsets[1])


def _entries(root: Any) -> tuple[list[_Entry], dict[str, str]]:
    """Tensor entries and metadata from the parsed header; raises ValueError naming the problem."""
    if not isinstance(root, _Obj):
        raise ValueError("the header is not a JSON object")
    seen: set[str] = set()
    tensors, meta = [], {}
    for key, value in root:
        if key in seen:
            what = "" if key == "__metadata__" else " (duplicated tensor name)"
            raise ValueError(f"{_short(key)} appears twice{what}")
        seen.add(key)
        if key == "__metadata__":
            if value is not None and not (isinstance(value, _Obj) and all(isinstance(v, str) for _, v in value)):
                raise ValueError("__metadata__ is not an object of strings")
            meta = dict(value or [])  # a repeated metadata key keeps its last value, as in safetensors
            continue
        try:
            tensors.append(_tensor(key, value))
        except ValueError as e:
            raise ValueError(f"tensor {_short(key)}: {e}") from None
    return tensors, meta


def _layout(entries: list[_Entry]) -> tuple[list[_Placed], int]:
    """Check that the tensors tile the data section; returns them in offset order and the data length."""
    ordered = sorted(entries, key=lambda e: e[3])
    start, out = 0, []
    for name, dtype, shape, (begin, end) in ordered:
        if begin != start or end < begin:
            where = ("overlaps the previous tensor" if begin < start else "leaves a gap" if begin > start
                     else "ends before it starts")
            raise ValueError(f"tensor {_short(name)}: data_offsets [{begin}, {end}] {where} "
                             f"(expected to start at {start})")
        start = end
        numel = 1
        for d in shape:
            numel *= d
            if numel >= _U64:  # safetensors multiplies in u64 from the left and refuses an overflow
                raise ValueError(f"tensor {_short(name)}: shape {_short(shape)} overflows 64 bits")
        bits = numel * _DTYPE_TABLE[dtype][0]
        if bits >= _U64:
            raise ValueError(f"tensor {_short(name)}: shape {_short(shape)} {dtype} overflows 64 bits")
        if bits % 8:
            raise ValueError(f"tensor {_short(name)}: shape {_short(shape)} {dtype} does not fill whole bytes")
        if end - begin != bits // 8:
            raise ValueError(f"tensor {_short(name)}: {end - begin} bytes for shape {_short(shape)} {dtype} "
                             f"(expected {bits // 8})")
        out.append((name, dtype, shape, begin, end))
    return out, start


def _torch_entry(name: str, dtype: str, shape: list[int], start: int, nbytes: int) -> HeaderEntry:
    """The torch view of one validated tensor; refuses what ``safe_open``'s torch loader refuses."""
    attr = _DTYPE_TABLE[dtype][1]
    if attr is None or not hasattr(torch, attr):
        raise ValueError(f"tensor {_short(name)}: dtype {dtype} has no torch equivalent")
    per_byte = _PACKED.get(dtype)
    if per_byte is not None:
        if not shape or shape[-1] % per_byte:
            raise ValueError(f"tensor {_short(name)}: {dtype} needs a last dimension divisible by {per_byte}")
        shape = shape[:-1] + [shape[-1] // per_byte]
    if any(d > _I64_MAX for d in shape):
        raise ValueError(f"tensor {_short(name)}: shape {_short(shape)} has a dimension above 2**63 - 1")
    dtype_t = getattr(torch, attr)
    if nbytes == 0:
        # Only a zero-size tensor can have huge dimensions (a non-empty one is bounded by the file size), and
        # torch's stride overflow rules are its own: ask it, with the reshape safe_open also does. No memory.
        try:
            torch.empty(0, dtype=dtype_t).reshape(shape)
        except RuntimeError as e:
            reason = str(e).splitlines()[0]
            raise ValueError(f"tensor {_short(name)}: torch cannot make shape {_short(shape)} ({reason})") from None
    return HeaderEntry(name, dtype_t, tuple(shape), start, nbytes)


def read_header(path: Path) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Parse and validate a safetensors file's header exactly as ``safe_open`` does, without reading data.

    Args:
        path: a ``.safetensors`` file (a symlink is followed).

    Returns:
        ``(entries, metadata)``: tensors in data-offset order (absolute offsets) and the ``__metadata__`` map.

    Raises:
        CheckpointError: one line naming the file and the problem (missing, unreadable, truncated, trailing
            bytes, or a header ``safe_open`` would refuse).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                limit = "more than the 100000000 safetensors allows" if hlen > MAX_HEADER_BYTES else f"file has {size}"
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {hlen} bytes, {limit})")
            raw = f.read(hlen)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        entries, meta = _entries(parse_json_strict(raw.decode("utf-8")))
        ordered, data_len = _layout(entries)
        infos = [_torch_entry(n, d, s, 8 + hlen + b, e - b) for n, d, s, b, e in ordered]
    except UnicodeDecodeError as e:
        where = f"{e.reason} at byte {8 + e.start}"
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8: {where})") from None
    except ValueError as e:  # json.JSONDecodeError and _BadJson are ValueErrors too
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    end = 8 + hlen + data_len
    if end > size:
        last = ordered[-1][0]
        raise CheckpointError(f"{path}: truncated: tensor {_short(last)} ends at byte {end} but the file has {size}")
    if end < size:
        raise CheckpointError(f"{path}: {size - end} trailing bytes after the tensor data (ends at byte {end}, "
                              f"file has {size})")
    return infos, meta
