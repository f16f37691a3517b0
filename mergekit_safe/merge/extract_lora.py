"""Extract a PEFT LoRA adapter from two checkpoints: ``model - base`` as truncated SVDs, module by module.

Every 2-D weight of a linear module whose value changed becomes a pair ``lora_B @ lora_A`` (scaling 1) of the
rank chosen by a :class:`RankRule`; every other changed tensor (embeddings, norms, biases) puts its whole module
in ``modules_to_save``. The tensors are read one at a time, so memory holds one module's delta plus the factors
kept so far (the size of the adapter). The reconstruction error of every module is measured against the delta
in float64 and written as ``extract_lora_report.json`` next to the adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergekit_safe.errors import CheckpointError, RecipeError
from mergekit_safe.io.reader import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Checkpoint, open_checkpoint
from mergekit_safe.io.writer import CheckpointWriter, TensorSpec
from mergekit_safe.merge.recipe import module_type

REPORT_NAME = "extract_lora_report.json"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class RankRule:
    """How many singular values each module keeps (exactly one of the three is set).

    Attributes:
        rank: a fixed rank (capped at the module's full rank).
        energy: keep the fewest singular values whose squares sum to at least this fraction of the total, in (0, 1].
        sv_threshold: keep the singular values at least this fraction of the largest one, in [0, 1).
    """

    rank: int | None = None
    energy: float | None = None
    sv_threshold: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "energy", "sv_threshold") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RecipeError(f"give exactly one of --rank, --energy, --sv-threshold (got {given or 'none'})")
        if self.rank is not None and self.rank < 1:
            raise RecipeError(f"--rank {self.rank}: must be at least 1")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise RecipeError(f"--energy {self.energy}: must be in (0, 1]")
        if self.sv_threshold is not None and not 0.0 <= self.sv_threshold < 1.0:
            raise RecipeError(f"--sv-threshold {self.sv_threshold}: must be in [0, 1)")

    def choose(self, s: torch.Tensor) -> int:
        """The rank to keep for singular values ``s`` (descending); 0 only when ``s`` is all zero."""
        if s.numel() == 0 or float(s[0]) == 0.0:
            return 0
        if self.rank is not None:
            return min(self.rank, s.numel())
        if self.energy is not None:
            cum = torch.cumsum(s.double() ** 2, 0)
            # the first index reaching the target; min() guards float rounding on energy == 1
            return min(int(torch.searchsorted(cum, self.energy * float(cum[-1]))) + 1, s.numel())
        assert self.sv_threshold is not None
        return int((s >= self.sv_threshold * s[0]).sum())


@dataclass(frozen=True)
class ModuleReport:
    """The reconstruction of one module's delta ``D = model - base``.

    Attributes:
        module: module name (tensor name without ``.weight``).
        shape: shape of the weight, ``[out, in]``.
        rank: rank kept.
        full_rank: ``min(out, in)``.
        norm: ``||D||_F``.
        tail_error: the truncated SVD's own error before the factors are rounded to their dtype:
            ``sqrt(sum of the dropped singular values squared)`` (measured directly after a randomized SVD).
        error: ``||D - B @ A||_F`` measured in float64 with the factors as stored.
        relative_error: ``error / norm``.
    """

    module: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int
    norm: float
    tail_error: float
    error: float
    relative_error: float


@dataclass
class ExtractResult:
    """What :func:`extract_lora` wrote.

    Attributes:
        out_dir: the adapter folder.
        modules: one report per LoRA module.
        modules_to_save: modules stored whole.
        unchanged: tensors equal in base and model (not in the adapter).
        report_path: the JSON report.
    """

    out_dir: Path
    modules: list[ModuleReport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    unchanged: int = 0
    report_path: Path | None = None
    randomized_seed: int | None = None

    @property
    def relative_error(self) -> float:
        """``||D - BA||_F / ||D||_F`` over all LoRA modules together."""
        num = math.sqrt(sum(m.error**2 for m in self.modules))
        den = math.sqrt(sum(m.norm**2 for m in self.modules))
        return num / den if den else 0.0


def randomized_svd(d: torch.Tensor, rank: int, seed: int, *, oversample: int = 10, iters: int = 4) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``d`` by a seeded randomized range finder (Halko et al., 2011).

    ``torch.svd_lowrank`` draws from the global RNG; this takes its own generator, so it is reproducible and leaves
    the process's random state alone. ``iters`` power iterations (re-orthonormalized) sharpen a slowly decaying
    spectrum.

    Returns:
        ``(U [m, k], S [k], Vh [k, n])`` with ``k = min(rank + oversample, m, n)``.
    """
    m, n = d.shape
    k = min(rank + oversample, m, n)
    g = torch.Generator(device=d.device).manual_seed(seed)
    q, _ = torch.linalg.qr(d @ torch.randn(n, k, generator=g, device=d.device, dtype=d.dtype))
    for _ in range(iters):
        q, _ = torch.linalg.qr(d.T @ q)
        q, _ = torch.linalg.qr(d @ q)
    u, s, vh = torch.linalg.svd(q.T @ d, full_matrices=False)
    return q @ u, s, vh


def low_rank(delta: torch.Tensor, rule: RankRule, dtype: torch.dtype, module: str = "", *,
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """Truncated SVD of one delta ``D`` (``[out, in]``) as LoRA factors ``B`` (``[out, r]``), ``A`` (``[r, in]``).

    ``sqrt(S)`` goes to both factors so neither over- nor underflows in half precision.

    Args:
        delta: the update, any float dtype, on the device the SVD should run on.
        rule: how many singular values to keep.
        dtype: dtype of the returned factors (on the CPU).
        module: name for the report.
        seed: with a fixed ``rule.rank``, use :func:`randomized_svd` with this seed instead of the full SVD.

    Returns:
        ``(A, B, report)``.
    """
    d = delta.float()
    if seed is not None and rule.rank is not None:
        u, s, vh = randomized_svd(d, rule.rank, seed)
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = rule.choose(s)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(dtype).cpu()
    a = (root[:, None] * vh[:r]).to(dtype).cpu()
    ref = delta.double().cpu()
    error = float(torch.linalg.matrix_norm(ref - b.double() @ a.double()))
    norm = float(torch.linalg.matrix_norm(ref))
    if s.numel() == min(d.shape):
        tail = float(s[r:].double().square().sum().sqrt())
    else:  # only the top values are known: measure the unrounded truncation (||D||^2 - sum s^2 cancels badly)
        tail = float(torch.linalg.matrix_norm(ref - ((u[:, :r] * s[:r]) @ vh[:r]).double().cpu()))
    report = ModuleReport(module, tuple(delta.shape), r, s.numel(), norm, tail, error, error / norm if norm else 0.0)
    return a, b, report


@dataclass
class _Split:
    lora: list[str] = field(default_factory=list)  # weight tensor names
    saved: dict[str, list[str]] = field(default_factory=dict)  # module -> its tensors
    unchanged: int = 0


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _split(base: Checkpoint, model: Checkpoint) -> _Split:
    """Sort the model's changed tensors into LoRA weights and whole modules to save."""
    out = _Split()
    changed_modules: set[str] = set()
    for name in model.keys():
        if name not in base:
            raise CheckpointError(f"{model.path}: tensor {name!r} is not in the base {base.path}")
        mi, bi = model.info(name), base.info(name)
        if mi.shape != bi.shape:
            raise CheckpointError(f"{model.path}: tensor {name!r} has shape {list(mi.shape)} but the base has "
                                  f"{list(bi.shape)}; resize the base's vocabulary first")
        same = torch.equal(model.get(name), base.get(name))
        model.release(name)
        base.release(name)
        if same or not mi.dtype.is_floating_point:
            out.unchanged += 1
            continue
        changed_modules.add(_module(name))
        if name.endswith(".weight") and len(mi.shape) == 2 and module_type(name) != "embed":
            out.lora.append(name)
    lora_modules = {_module(n) for n in out.lora}
    # a module with any other changed tensor (a bias) cannot be LoRA and saved at once: PEFT saves it whole
    whole = sorted(changed_modules - lora_modules | {m for m in lora_modules if _other_changed(model, base, m)})
    out.lora = [n for n in out.lora if _module(n) not in whole]
    for m in whole:
        out.saved[m] = [n for n in model.keys() if _module(n) == m]
    head = "lm_head.weight"
    if head not in model.keys() and head in model and _module(model.info(head).name) in out.saved:
        # a tied head moves with its embeddings; peft unties the embeddings it saves, so it needs the head too
        out.saved["lm_head"] = [head]
    return out


def _other_changed(model: Checkpoint, base: Checkpoint, module: str) -> bool:
    names = [n for n in model.keys() if _module(n) == module and not n.endswith(".weight")]
    return any(model.info(n).dtype.is_floating_point and not torch.equal(model.get(n), base.get(n)) for n in names)


def _pattern(module: str) -> str:
    # PEFT matches rank/alpha pattern keys as regexes; escaped, a key names exactly one module
    return re.escape(module)


def adapter_config(base: str, reports: list[ModuleReport], saved: list[str]) -> dict[str, object]:
    """The ``adapter_config.json`` of an extracted adapter: per-module ranks, scaling 1 everywhere."""
    ranks = {_pattern(m.module): m.rank for m in reports}
    top = max(ranks.values(), default=1)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
        "r": top, "lora_alpha": top, "rank_pattern": ranks, "alpha_pattern": dict(ranks),
        "target_modules": [m.module for m in reports], "modules_to_save": saved or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True,
    }


def extract_lora(
    base: str | Path, model: str | Path, out_dir: str | Path, rule: RankRule, *, dtype: torch.dtype | None = None,
    device: str = "cpu", overwrite: bool = False, randomized: bool | None = None, seed: int = 0,
) -> ExtractResult:
    """Write ``model - base`` as a PEFT LoRA adapter with a per-module error report.

    Args:
        base: the base checkpoint (what the adapter applies to).
        model: the checkpoint to reproduce (a fine-tune, a merge, a repaired model).
        out_dir: the adapter folder; published atomically.
        rule: rank per module.
        dtype: dtype of the adapter tensors [default: each tensor's dtype in ``model``].
        device: where the SVDs run (``cpu`` or ``cuda``).
        overwrite: replace an existing ``out_dir``.
        randomized: with ``rule.rank``, a seeded randomized SVD instead of the full one [default: on CUDA only].
        seed: seed of the randomized SVD.

    Returns:
        An :class:`ExtractResult`.

    Raises:
        CheckpointError: the checkpoints do not line up (missing tensors, other shapes).
        OutputError: the output exists or lies inside an input.

    Example:
        >>> extract_lora("./aligned", "./repaired", "./lora", RankRule(rank=16))  # doctest: +SKIP
    """
    from mergekit_safe.merge.engine import check_output_path

    out = Path(out_dir)
    check_output_path(out, [str(base), str(model)])
    if randomized is None:
        randomized = torch.device(device).type == "cuda"
    svd_seed = seed if randomized and rule.rank is not None else None
    result = ExtractResult(out, randomized_seed=svd_seed)
    with open_checkpoint(base) as b, open_checkpoint(model) as m:
        split = _split(b, m)
        result.unchanged = split.unchanged
        factors: list[tuple[TensorSpec, torch.Tensor]] = []
        for name in split.lora:
            delta = m.get(name).to(device).float() - b.get(name).to(device).float()
            a, bb, rep = low_rank(delta, rule, dtype or m.info(name).dtype, _module(name), seed=svd_seed)
            m.release(name)
            b.release(name)
            if rep.rank == 0:
                continue
            result.modules.append(rep)
            key = _PEFT_PREFIX + rep.module
            factors += [(TensorSpec(key + ".lora_A.weight", tuple(a.shape), a.dtype), a),
                        (TensorSpec(key + ".lora_B.weight", tuple(bb.shape), bb.dtype), bb)]
        saved = [(n, dtype or m.info(n).dtype) for names in split.saved.values() for n in names]
        specs = [s for s, _ in factors] + [TensorSpec(_PEFT_PREFIX + n, m.info(n).shape, dt) for n, dt in saved]
        result.modules_to_save = list(split.saved)
        with CheckpointWriter(out, specs, max_shard_size=1 << 62, overwrite=overwrite,
                              file_name=ADAPTER_WEIGHTS) as w:
            for spec, t in factors:
                w.write(spec.name, t.contiguous())
            for n, dt in saved:
                w.write(_PEFT_PREFIX + n, m.get(n).to(dt).contiguous())
                m.release(n)
            cfg = adapter_config(str(Path(base).resolve()), result.modules, result.modules_to_save)
            w.write_text(ADAPTER_CONFIG, json.dumps(cfg, indent=2) + "\n")
            w.write_text(REPORT_NAME, json.dumps(_report(result, base, model, rule), indent=2) + "\n")
            w.finalize()
    result.report_path = out / REPORT_NAME
    return result


def _report(result: ExtractResult, base: str | Path, model: str | Path, rule: RankRule) -> dict[str, object]:
    return {
        "base": str(base), "model": str(model), "rule": {k: v for k, v in asdict(rule).items() if v is not None},
        "svd": "randomized" if result.randomized_seed is not None else "full", "seed": result.randomized_seed,
        "relative_error": result.relative_error, "modules_to_save": result.modules_to_save,
        "unchanged_tensors": result.unchanged, "modules": [asdict(r) for r in result.modules],
    }
