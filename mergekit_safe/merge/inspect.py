"""Where did a fine-tune move the weights? Per-tensor and per-layer statistics of ``b - a``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mergekit_safe.io.adapters import open_input
from mergekit_safe.merge.engine import DEFAULT_CHUNK_ELEMS
from mergekit_safe.merge.recipe import layer_index, module_type


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor changed from ``a`` to ``b``.

    Attributes:
        name: tensor name.
        layer: block index or None.
        module: module type (attention, mlp, embed, norm, head, other).
        shape_a, shape_b: shapes in each checkpoint.
        dtype_a, dtype_b: dtype names in each checkpoint.
        rel_delta: ``||b - a|| / ||a||`` (over the common rows when the vocabulary differs).
        cosine: cosine similarity of ``a`` and ``b`` as flat vectors.
        max_abs: largest ``|b - a|``.
        numel: elements compared.
    """

    name: str
    layer: int | None
    module: str
    shape_a: list[int]
    shape_b: list[int]
    dtype_a: str
    dtype_b: str
    rel_delta: float
    cosine: float
    max_abs: float
    numel: int


def diff_checkpoints(a_path: str, b_path: str, *, allow_pickle: bool = False,
                     chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                     device: str = "cpu") -> tuple[list[TensorDiff], list[str]]:
    """Compare two checkpoints tensor by tensor, streaming each tensor in chunks (memory set by the chunk).

    Args:
        a_path: the reference checkpoint.
        b_path: the changed checkpoint (may be a PEFT adapter of ``a_path``).
        allow_pickle: accept pickled ``.bin`` weights (loaded weights_only).
        chunk_elems: elements read per piece.
        device: where the float64 statistics are computed (``cpu`` or ``cuda[:N]``).

    Returns:
        ``(diffs, only)``: a :class:`TensorDiff` per shared tensor, and lines naming tensors found in only one.
    """
    a = open_input(a_path, allow_pickle=allow_pickle)
    b = open_input(b_path, base=a_path, allow_pickle=allow_pickle)
    out, only = [], []
    try:
        for name in a.keys():
            if name not in b:
                only.append(f"only in {a_path}: {name}")
                continue
            out.append(_diff_tensor(a, b, name, max(1, chunk_elems), torch.device(device)))
        only += [f"only in {b_path}: {n}" for n in b.keys() if n not in a]
    finally:
        a.close()
        b.close()
    return out, only


def _diff_tensor(a: Any, b: Any, name: str, step: int, device: torch.device) -> TensorDiff:
    ia, ib = a.info(name), b.info(name)
    sa, sb = tuple(ia.shape), tuple(ib.shape)
    rows = min(sa[0], sb[0]) if sa and sb and sa[1:] == sb[1:] else None
    if sa == sb:
        n = math.prod(sa)
    elif rows is not None:
        n = rows * math.prod(sa[1:])  # the common rows are the first flat elements of both (row-major)
    else:
        n = -1
    if n >= 0:
        aa = bb = ab = dd = 0.0
        peak = torch.zeros((), dtype=torch.float64)  # torch.maximum keeps a NaN; Python's max would drop it
        for start in range(0, n, step):
            stop = min(n, start + step)
            xa, xb = a.get(name, start, stop).to(device).double(), b.get(name, start, stop).to(device).double()
            d = xb - xa
            aa, bb, ab, dd = aa + float(xa @ xa), bb + float(xb @ xb), ab + float(xa @ xb), dd + float(d @ d)
            peak = torch.maximum(peak, d.abs().max())
            a.release(name)
            b.release(name)
        mx = float(peak)
        na, nb, nd = math.sqrt(aa), math.sqrt(bb), math.sqrt(dd)
        rel = nd / na if na > 0 else (0.0 if nd == 0 else math.inf)
        cos = ab / (na * nb) if na > 0 and nb > 0 else float("nan")
    else:
        rel, cos, mx, n = math.nan, math.nan, math.nan, 0
    return TensorDiff(name, layer_index(name), module_type(name), list(sa), list(sb),
                      str(ia.dtype).removeprefix("torch."), str(ib.dtype).removeprefix("torch."), rel, cos, mx, n)


def per_layer(diffs: list[TensorDiff]) -> list[dict[str, object]]:
    """Aggregate by block: element-weighted RMS of the relative deltas, smallest cosine, largest change."""
    groups: dict[str, list[TensorDiff]] = {}
    for d in diffs:
        key = f"layer {d.layer}" if d.layer is not None else d.module
        groups.setdefault(key, []).append(d)
    rows = []
    for key, ds in groups.items():
        ok = [d for d in ds if d.numel and math.isfinite(d.rel_delta)]
        n = sum(d.numel for d in ok)
        rms = math.sqrt(sum(d.rel_delta**2 * d.numel for d in ok) / n) if n else math.nan
        rows.append({"group": key, "tensors": len(ds), "rel_delta": rms,
                     "min_cosine": min((d.cosine for d in ok), default=math.nan),
                     "max_abs": max((d.max_abs for d in ok), default=math.nan)})
    return rows


def to_json(diffs: list[TensorDiff], only: list[str]) -> dict[str, object]:
    """JSON-ready form of a comparison."""
    return {"tensors": [asdict(d) for d in diffs], "layers": per_layer(diffs), "unmatched": only}
