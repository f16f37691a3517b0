"""Where did a fine-tune move the weights? Per-tensor and per-layer statistics of ``b - a``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mergekit_safe.io.adapters import open_input
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
                     device: str = "cpu") -> tuple[list[TensorDiff], list[str]]:
    """Compare two checkpoints tensor by tensor (streaming; one tensor pair in memory at a time).

    The float64 statistics are computed on ``device`` (``cpu`` or ``cuda[:N]``; default ``cpu``).

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
            ta, tb = a.get(name), b.get(name)
            rows = min(ta.shape[0], tb.shape[0]) if ta.dim() and tb.dim() and ta.shape[1:] == tb.shape[1:] else None
            if ta.shape == tb.shape or rows is not None:
                xa = (ta[:rows] if rows is not None else ta).to(device).double().reshape(-1)
                xb = (tb[:rows] if rows is not None else tb).to(device).double().reshape(-1)
                d = xb - xa
                na, nb = float(xa.norm()), float(xb.norm())
                rel = float(d.norm()) / na if na > 0 else (0.0 if float(d.norm()) == 0 else math.inf)
                cos = float(xa @ xb) / (na * nb) if na > 0 and nb > 0 else float("nan")
                mx = float(d.abs().max()) if d.numel() else 0.0
                n = xa.numel()
            else:
                rel, cos, mx, n = math.nan, math.nan, math.nan, 0
            out.append(TensorDiff(name, layer_index(name), module_type(name), list(ta.shape), list(tb.shape),
                                  str(ta.dtype).removeprefix("torch."), str(tb.dtype).removeprefix("torch."),
                                  rel, cos, mx, n))
            a.release(name)
            b.release(name)
        only += [f"only in {b_path}: {n}" for n in b.keys() if n not in a]
    finally:
        a.close()
        b.close()
    return out, only


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
