"""Safety-subspace remedies: Safe LoRA (Hsu et al., 2024) and SafeMERGE (Djuhera et al., 2025).

Both measure, per weight matrix, how much of a fine-tune's update ``D = finetuned - aligned`` lies in the
alignment subspace spanned by the columns of ``V = aligned - unaligned``:
``cos = <P D, D> / (||P D|| ||D||)``. Safe LoRA replaces the update of the layers that drift most (lowest
``cos``) by its projection ``P D``; SafeMERGE merges those layers with a safety fine-tune instead.

``P`` is the papers' ``V V^T / ||V||_F`` (what PEFT's ``utils.safelora`` builds as a ``d x d`` matrix) or, with
``exact``, the orthogonal projection ``V (V^T V)^+ V^T``. Neither is ever formed: ``P D`` is computed as
``V @ (V^T @ D)`` (or a least-squares solve), which costs a LoRA update ``d * k * r`` instead of ``d^2 * r``.

Rows the update has beyond ``V`` (a fine-tune that resized its vocabulary) keep their update unprojected.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergekit_safe.errors import CheckpointError, RecipeError
from mergekit_safe.io.reader import ADAPTER_CONFIG, ADAPTER_WEIGHTS, open_checkpoint
from mergekit_safe.io.writer import CheckpointWriter, TensorSpec


def _common(v: torch.Tensor, d: torch.Tensor) -> int:
    """How many leading rows ``v`` and ``d`` share (they must agree on every other dimension)."""
    if v.dim() != 2 or d.dim() != 2 or v.shape[1] != d.shape[1]:
        raise CheckpointError(f"the safety direction has shape {list(v.shape)}, which does not fit the update's "
                              f"{list(d.shape)}")
    return min(v.shape[0], d.shape[0])


def project(v: torch.Tensor, d: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Project the update ``d`` onto the column space of ``v`` without forming a ``d x d`` matrix.

    Args:
        v: the alignment direction ``aligned - unaligned``, ``[out, in]``.
        d: a matrix whose rows live in ``v``'s row space: a dense update ``[out', in]`` or a LoRA ``B`` factor
            ``[out', r]`` (``P B A = P (B A)``). Rows past ``out`` are returned unchanged.
        exact: the orthogonal projection ``V (V^T V)^+ V^T d`` instead of the papers' ``V V^T d / ||V||_F``.

    Returns:
        ``P @ d`` in ``d``'s dtype.
    """
    n = min(v.shape[0], d.shape[0])
    vc = v[:n].double()
    dc = d[:n].double()
    if exact:
        # least squares on V handles a rank-deficient V (the pseudo-inverse) without V^T V's squared condition
        coef = torch.linalg.lstsq(vc.cpu(), dc.cpu(), driver="gelsd").solution.to(vc.device)
        proj = vc @ coef
    else:
        norm = torch.linalg.matrix_norm(vc)
        proj = vc @ (vc.T @ dc) / norm if norm > 0 else torch.zeros_like(dc)
    out = d.double().clone()
    out[:n] = proj
    return out.to(d.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors as flat vectors (0 when either is zero), in float64."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def applies(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is one of the weight matrices the methods act on (2-D, not embeddings or head)."""
    from mergekit_safe.merge.recipe import module_type  # recipe imports methods, which imports this module

    return len(shape) == 2 and module_type(name) not in ("embed", "head")


def safe_lora_update(
    aligned: torch.Tensor, finetuned: torch.Tensor, unaligned: torch.Tensor, *, threshold: float,
    exact: bool = False,
) -> tuple[torch.Tensor, float]:
    """Safe LoRA on one weight matrix: ``aligned + P D`` when ``cos(P D, D) <= threshold``, else ``finetuned``.

    Args:
        aligned: the model the fine-tune started from, ``[out, in]``.
        finetuned: the fine-tuned matrix (same shape).
        unaligned: the unaligned (pre-alignment) matrix; may have fewer or more rows.
        threshold: project when the cosine is at most this (PEFT's default is 0.5).
        exact: use the orthogonal projection (see :func:`project`).

    Returns:
        ``(merged fp32 tensor, cosine)``.
    """
    d = finetuned.double() - aligned.double()
    n = _common(unaligned, aligned)
    pd = project(aligned[:n].double() - unaligned[:n].double(), d, exact=exact)
    cos = cosine(pd, d)
    return ((aligned.double() + pd).float() if cos <= threshold else finetuned.float()), cos


def safemerge_update(
    aligned: torch.Tensor, finetuned: torch.Tensor, unaligned: torch.Tensor, safety: torch.Tensor, *,
    threshold: float, weight: float, safety_weight: float, exact: bool = False,
) -> tuple[torch.Tensor, float]:
    """SafeMERGE on one weight matrix: merge with the safety fine-tune when ``cos(P D, D) < threshold``.

    A drifting layer becomes ``aligned + weight * (finetuned - aligned) + safety_weight * (safety - aligned)``
    (the paper's linear merge, 0.8 / 0.2 by default, threshold 0.35); the others keep the fine-tune.

    Returns:
        ``(merged fp32 tensor, cosine)``.
    """
    d = finetuned.double() - aligned.double()
    n = _common(unaligned, aligned)
    cos = cosine(project(aligned[:n].double() - unaligned[:n].double(), d, exact=exact), d)
    if cos >= threshold:
        return finetuned.float(), cos
    merged = aligned.double() + weight * d + safety_weight * (safety.double() - aligned.double())
    return merged.float(), cos


@dataclass(frozen=True)
class LayerCosine:
    """One LoRA module's alignment measure.

    Attributes:
        module: the target weight's name.
        cosine: ``cos(P B A, B A)``.
        projected: whether Safe LoRA replaced its ``B`` by ``P B``.
    """

    module: str
    cosine: float
    projected: bool


def _lora_pairs(keys: list[str]) -> dict[str, tuple[str, str]]:
    """``target weight name -> (lora_A key, lora_B key)`` for the linear LoRA pairs of a PEFT adapter."""
    pairs = {}
    for key in keys:
        if ".lora_B." in key:
            module = key.split(".lora_B.")[0].removeprefix("base_model.model.")
            pairs[module + ".weight"] = (key.replace(".lora_B.", ".lora_A."), key)
    return pairs


def _select(cosines: dict[str, float], threshold: float | None, num_layers: int | None) -> set[str]:
    if num_layers is not None:
        return set(sorted(cosines, key=lambda m: cosines[m])[:num_layers])  # the most drifted layers
    assert threshold is not None
    return {m for m, c in cosines.items() if c <= threshold}


def safe_lora_adapter(
    adapter: str | Path, aligned: str | Path, unaligned: str | Path, out_dir: str | Path, *,
    threshold: float | None = None, num_layers: int | None = None, exact: bool = False, overwrite: bool = False,
) -> list[LayerCosine]:
    """Safe LoRA on a PEFT adapter: replace ``B`` by ``P B`` in the layers that drift most, write a new adapter.

    Args:
        adapter: a LoRA adapter trained on ``aligned``.
        aligned: the aligned model the adapter applies to.
        unaligned: the model before alignment (``V = aligned - unaligned``).
        out_dir: the new adapter folder (published atomically).
        threshold: project every module whose cosine is at most this (PEFT's ``threshold`` mode).
        num_layers: or project the ``num_layers`` modules with the lowest cosine (PEFT's ``number`` mode).
        exact: use the orthogonal projection (see :func:`project`).
        overwrite: replace an existing ``out_dir``.

    Returns:
        One :class:`LayerCosine` per LoRA module, in adapter order (also written as ``safe_lora_report.json``).

    Raises:
        RecipeError: neither or both of ``threshold`` and ``num_layers``.
        CheckpointError: the adapter is not a LoRA of this model.

    Example:
        >>> safe_lora_adapter("./lora", "./chat", "./base", "./lora-safe", num_layers=10)  # doctest: +SKIP
    """
    if (threshold is None) == (num_layers is None):
        raise RecipeError("Safe LoRA: give exactly one of threshold and num_layers")
    from mergekit_safe.merge.engine import check_output_path

    adapter, out = Path(adapter), Path(out_dir)
    check_output_path(out, [str(adapter), str(aligned), str(unaligned)])
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text()) if (adapter / ADAPTER_CONFIG).is_file() else None
    if cfg is None or cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{adapter}: not a PEFT LoRA adapter of linear layers (adapter_config.json)")
    with open_checkpoint(adapter) as lora, open_checkpoint(aligned) as al, open_checkpoint(unaligned) as un:
        projected_b, cosines = {}, {}
        for target, (ka, kb) in _lora_pairs(lora.keys()).items():
            if not applies(target, tuple(lora.info(kb).shape)) or target not in al or target not in un:
                continue
            a, b = lora.get(ka).double(), lora.get(kb).double()
            n = _common(un.get(target), al.get(target))
            pb = project(al.get(target)[:n].double() - un.get(target)[:n].double(), b, exact=exact)
            cosines[target] = cosine(pb @ a, b @ a)
            projected_b[kb] = pb.to(lora.info(kb).dtype)
        chosen = _select(cosines, threshold, num_layers)
        chosen_keys = {kb for t, (_, kb) in _lora_pairs(lora.keys()).items() if t in chosen}
        specs = [TensorSpec(k, lora.info(k).shape, lora.info(k).dtype) for k in lora.keys()]
        report = [LayerCosine(t, c, t in chosen) for t, c in cosines.items()]
        with CheckpointWriter(out, specs, 1 << 62, overwrite=overwrite, file_name=ADAPTER_WEIGHTS) as w:
            for spec in specs:
                w.write(spec.name, (projected_b[spec.name] if spec.name in chosen_keys else lora.get(spec.name))
                        .contiguous())
            w.write_text(ADAPTER_CONFIG, json.dumps(cfg, indent=2) + "\n")
            w.write_text("safe_lora_report.json", json.dumps([asdict(r) for r in report], indent=2) + "\n")
            w.finalize()
    return report
