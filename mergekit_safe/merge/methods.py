"""The registry of merge methods.

Most repairs are ``theta = sum_i c_i * input_i`` (lerp, EMA, task arithmetic, linear, safety vector): those
methods only say how their parameters become the coefficients ``c_i`` (:attr:`MergeMethod.coefficients`), and
the engine streams them through the weighted-sum kernel chunk by chunk. Methods that are not linear in their
inputs (SLERP, TIES, DARE) give a :class:`~mergekit_safe.merge.streaming.Streamed` pair (passes over chunks for
per-tensor constants, then an elementwise step per chunk), so their memory is set by the chunk too; the
whole-tensor :attr:`MergeMethod.combine` is derived from it. A method may instead give only ``combine``: the
engine then loads each whole tensor (memory grows with the largest tensor), so new methods should stream.

Inputs are ordered: the base model first when the method has one, then the models in the order given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import RecipeError
from mergekit_safe.kernels import reference
from mergekit_safe.merge import geometry, safety, sparsify
from mergekit_safe.merge.streaming import Chunk, Streamed, TensorStream, chunk_deltas, dot_and_norms
from mergekit_safe.merge.streaming import magnitude_thresholds, run_whole

# No method parameter means anything beyond this magnitude: 1e300 * a weight is inf in every output dtype.
MAX_ABS_VALUE = 1e6


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    Attributes:
        name: the recipe key (mergekit's name where the meaning is the same).
        default: value when the recipe omits it; ``None`` means required.
        per_model: given per model (mergekit's "tensor parameters" under each model) rather than once.
        tensor: may vary per tensor (layer gradients, module-type and regex rules); otherwise a plain scalar.
        low: smallest allowed value (inclusive), or None.
        high: largest allowed value (inclusive), or None.
        doc: one line for the docs and ``--help``.
    """

    name: str
    default: float | int | bool | None
    per_model: bool = False
    tensor: bool = True
    low: float | None = None
    high: float | None = None
    doc: str = ""

    def check(self, value: object, where: str) -> str | None:
        """Return a problem description if ``value`` is out of range for this parameter, else None."""
        if isinstance(self.default, bool):
            return None if isinstance(value, bool) else f"{where}: {self.name} must be true or false, got {value!r}"
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
            return f"{where}: {self.name} must be a finite number, got {short_repr(value)}"
        if isinstance(self.default, int) and not isinstance(value, int):
            return f"{where}: {self.name} must be a whole number, got {value!r}"
        low = -MAX_ABS_VALUE if self.low is None else self.low
        high = MAX_ABS_VALUE if self.high is None else self.high
        if value < low or value > high:
            return f"{where}: {self.name}={short_repr(value)} is outside [{low}, {high}]"
        return None


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters (a user's path or name in an error message)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = 200) -> str:
    """``repr`` of a user's value cut to ``limit`` characters, built with bounded work (a recipe may hold a
    value of millions of elements: an error message shows its start, never all of it)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset = 4, 8, 8, 8, 8
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Resolved:
    """A method's parameters resolved for one tensor.

    Attributes:
        values: scalar parameters by name.
        per_model: per-model parameters by name, one value per (non-base) model.
    """

    values: dict[str, float | int | bool]
    per_model: dict[str, list[float]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float | int | bool:
        return self.values[name]


@dataclass(frozen=True)
class TensorJob:
    """Everything a non-linear method needs to merge one tensor.

    Attributes:
        name: the output tensor's name.
        base: the base model's tensor, or None.
        models: the other inputs' tensors, in recipe order.
        params: resolved parameters.
        out_dtype: dtype of the result.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    params: Resolved
    out_dtype: torch.dtype


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: recipe name (``merge_method``).
        summary: one line for ``--help`` and the README table.
        base: ``"required"``, ``"optional"`` or ``"none"``: whether the method takes a base model.
        min_models: fewest non-base models.
        max_models: most non-base models (None: unbounded).
        params: its parameters.
        coefficients: for linear methods, ``(params, has_base, num_models) -> c`` with one coefficient per
            input (base first); the engine computes ``sum_i c_i * input_i``.
        combine: for the other methods, ``TensorJob -> tensor`` on whole tensors; derived from ``stream`` when
            that is given.
        stream: the non-linear method in chunks (memory bounded by the chunk); preferred over ``combine``.
        side_files_from: which input's config and tokenizer the output takes by default (0: the first input,
            -1: the last).
    """

    name: str
    summary: str
    base: str
    min_models: int
    max_models: int | None
    params: tuple[Param, ...]
    coefficients: Callable[[Resolved, bool, int], list[float]] | None = None
    combine: Callable[[TensorJob], torch.Tensor] | None = None
    side_files_from: int = 0
    stream: Streamed | None = None

    def __post_init__(self) -> None:
        if self.stream is not None:
            if self.combine is not None:
                raise ValueError(f"merge method {self.name}: give stream or combine, not both")
            object.__setattr__(self, "combine", _whole_tensor(self.stream))
        if (self.coefficients is None) == (self.combine is None):
            raise ValueError(f"merge method {self.name}: give exactly one of coefficients, combine or stream")
        if self.base not in ("required", "optional", "none"):
            raise ValueError(f"merge method {self.name}: base must be required, optional or none")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"merge method {self.name}: duplicate parameter names {names}")

    @property
    def linear(self) -> bool:
        """True when the method is a weighted sum of its inputs (streamable chunk by chunk)."""
        return self.coefficients is not None

    def param(self, name: str) -> Param | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name.

    Raises:
        RecipeError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def ema_coefficients(num_checkpoints: int, beta: float, with_start: bool) -> list[float]:
    """Weights of the offline EMA ``e_t = beta * e_(t-1) + (1 - beta) * c_t`` as one weighted sum.

    With a start point ``s`` and checkpoints ``c_1..c_T``: ``s`` gets ``beta**T`` and ``c_t`` gets
    ``(1 - beta) * beta**(T - t)``. Without one, ``c_0`` is the start (``e_0 = c_0``). The weights sum to 1.

    Args:
        num_checkpoints: number of checkpoints (not counting the start).
        beta: decay in [0, 1].
        with_start: whether a start point precedes the checkpoints.

    Returns:
        One weight per input, the start (if any) first.

    Example:
        >>> ema_coefficients(2, 0.5, with_start=True)
        [0.25, 0.25, 0.5]
    """
    if with_start:
        steps = num_checkpoints
        return [beta**steps] + [(1.0 - beta) * beta ** (steps - t) for t in range(1, steps + 1)]
    steps = num_checkpoints - 1
    return [beta**steps] + [(1.0 - beta) * beta ** (steps - t) for t in range(1, steps + 1)]


def _normalized(weights: Sequence[float], normalize: bool) -> list[float]:
    total = sum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise RecipeError(f"normalize: the model weights {list(weights)} sum to zero")
        return [w / total for w in weights]
    return list(weights)


def _lerp(p: Resolved, has_base: bool, n: int) -> list[float]:
    a = float(p["alpha"])
    return [1.0 - a, a]


def _ema(p: Resolved, has_base: bool, n: int) -> list[float]:
    return ema_coefficients(n, float(p["beta"]), has_base)


def _linear(p: Resolved, has_base: bool, n: int) -> list[float]:
    return _normalized(p.per_model["weight"], bool(p["normalize"]))


def _task_arithmetic(p: Resolved, has_base: bool, n: int) -> list[float]:
    lam = [float(p["lambda"]) * w for w in _normalized(p.per_model["weight"], bool(p["normalize"]))]
    return [1.0 - sum(lam), *lam]


def _safety_vector(p: Resolved, has_base: bool, n: int) -> list[float]:
    b = float(p["scale"])
    return [1.0, b, -b]


def _whole_tensor(stream: Streamed) -> Callable[[TensorJob], torch.Tensor]:
    def combine(job: TensorJob) -> torch.Tensor:
        return run_whole(stream, job.name, job.base, job.models, job.params, job.out_dtype)

    return combine


def _slerp_prepare(stream: TensorStream, p: Resolved) -> tuple[float, float]:
    dot, na, nb = dot_and_norms(stream)
    t = float(p["t"])
    if not (math.isfinite(dot) and math.isfinite(na) and math.isfinite(nb)):
        # NaN/Inf input: no angle exists. Lerp carries the bad values into the output, where the engine's
        # finiteness check names the input file (an error under --strict, else a warning).
        return 1.0 - t, t
    return reference.slerp_coefficients(dot, na, nb, t)


def _slerp_apply(chunk: Chunk, p: Resolved, coeffs: tuple[float, float], out_dtype: torch.dtype) -> torch.Tensor:
    assert chunk.base is not None
    return kernels.weighted_sum([chunk.base, chunk.models[0]], list(coeffs), out_dtype=out_dtype)


def _ties_prepare(stream: TensorStream, p: Resolved) -> list[float]:
    return magnitude_thresholds(stream, chunk_deltas, [float(d) for d in p.per_model["density"]])


def _ties_apply(chunk: Chunk, p: Resolved, thresholds: list[float], out_dtype: torch.dtype) -> torch.Tensor:
    trimmed = []
    for d, thr in zip(chunk_deltas(chunk), thresholds):
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros((), dtype=d.dtype, device=d.device)))
    # Trimmed already: density 1 keeps every survivor, so TIES only elects signs (as for DARE below).
    merged = kernels.ties(trimmed, p.per_model["weight"], 1.0, bool(p["normalize"]))
    return _add_to_base(chunk, p, merged, out_dtype)


def _dare_deltas(chunk: Chunk, p: Resolved) -> list[torch.Tensor]:
    out = []
    for i, (d, density) in enumerate(zip(chunk_deltas(chunk), p.per_model["density"])):
        tid = reference.tensor_id(chunk.name, i)
        out.append(kernels.dare(d, 1.0 - float(density), int(p["seed"]), tid, rescale=bool(p["rescale"]),
                                index_offset=chunk.start))
    return out


def _dare_linear_apply(chunk: Chunk, p: Resolved, state: None, out_dtype: torch.dtype) -> torch.Tensor:
    weights = _normalized(p.per_model["weight"], bool(p["normalize"]))
    merged = kernels.weighted_sum(_dare_deltas(chunk, p), weights)
    return _add_to_base(chunk, p, merged, out_dtype)


def _dare_ties_apply(chunk: Chunk, p: Resolved, state: None, out_dtype: torch.dtype) -> torch.Tensor:
    # DARE already sparsified the deltas, so TIES keeps every survivor (density 1) and only elects signs.
    merged = kernels.ties(_dare_deltas(chunk, p), p.per_model["weight"], 1.0, bool(p["normalize"]))
    return _add_to_base(chunk, p, merged, out_dtype)


def _add_to_base(chunk: Chunk, p: Resolved, merged: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    assert chunk.base is not None
    return kernels.weighted_sum([chunk.base, merged], [1.0, float(p["lambda"])], out_dtype=out_dtype)


_WEIGHT = Param("weight", 1.0, per_model=True, doc="the model's weight")
_DENSITY = Param("density", 1.0, per_model=True, low=0.0, high=1.0, doc="fraction of the task vector kept")
_LAMBDA = Param("lambda", 1.0, doc="scale of the merged task vector")
_SEED = Param("seed", 0, tensor=False, low=0, high=2**32 - 1, doc="seed of the DARE masks (32 bits)")
_RESCALE = Param("rescale", True, tensor=False, doc="rescale survivors by 1/density")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, tensor=False, doc="divide by the sum of the weights")


register(MergeMethod(
    "lerp", "(1-alpha)*pre + alpha*post: WiSE-FT style interpolation between the aligned and fine-tuned model",
    base="required", min_models=1, max_models=1,
    params=(Param("alpha", 0.5, doc="how far to go towards the fine-tune (0: base, 1: fine-tune)"),),
    coefficients=_lerp, side_files_from=-1,
))
register(MergeMethod(
    "ema", "offline EMA over ordered checkpoints: e_t = beta*e_(t-1) + (1-beta)*c_t, from the base or c_0",
    base="optional", min_models=1, max_models=None,
    params=(Param("beta", 0.9, low=0.0, high=1.0, doc="decay per checkpoint"),),
    coefficients=_ema, side_files_from=-1,
))
register(MergeMethod(
    "linear", "weighted average of the models (mergekit's linear)",
    base="none", min_models=1, max_models=None, params=(_WEIGHT, _normalize(True)), coefficients=_linear,
))
register(MergeMethod(
    "task_arithmetic", "base + lambda * sum_i weight_i * (model_i - base)",
    base="required", min_models=1, max_models=None, params=(_WEIGHT, _LAMBDA, _normalize(False)),
    coefficients=_task_arithmetic,
))
register(MergeMethod(
    "safety_vector", "finetuned + scale*(aligned - unaligned): add the safety vector back (RESTA); "
    "base = the fine-tune, models = [aligned, unaligned]",
    base="required", min_models=2, max_models=2,
    params=(Param("scale", 1.0, doc="how much of the safety vector to add"),), coefficients=_safety_vector,
))
register(MergeMethod(
    "slerp", "spherical interpolation per tensor between base (t=0) and model (t=1); lerp when parallel",
    base="required", min_models=1, max_models=1,
    params=(Param("t", 0.5, low=0.0, high=1.0, doc="interpolation factor"),),
    stream=Streamed(_slerp_apply, _slerp_prepare),
))
register(MergeMethod(
    "ties", "TIES: trim task vectors to density by magnitude, elect signs, disjoint mean",
    base="required", min_models=1, max_models=None, params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(True)),
    stream=Streamed(_ties_apply, _ties_prepare),
))
register(MergeMethod(
    "dare_linear", "DARE: drop task-vector entries with prob 1-density, rescale, weighted sum",
    base="required", min_models=1, max_models=None,
    params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(False), _SEED, _RESCALE),
    stream=Streamed(_dare_linear_apply),
))
register(MergeMethod(
    "dare_ties", "DARE drop and rescale, then TIES sign election and disjoint mean",
    base="required", min_models=1, max_models=None,
    params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(True), _SEED, _RESCALE),
    stream=Streamed(_dare_ties_apply),
))


# --- mergekit's other methods: option sets of merge/sparsify.py and the two-pass merges of merge/geometry.py ---

_INT8_MASK = Param("int8_mask", False, tensor=False,
                   doc="accepted for mergekit recipes; masks are boolean here, so it changes nothing")


def _rescale_l1(default: bool) -> Param:
    return Param("rescale", default, tensor=False, doc="scale survivors so each task vector keeps its L1 norm")


def _passthrough(p: Resolved, has_base: bool, n: int) -> list[float]:
    return [float(s) for s in p.per_model["scale"]]


_GAMMA = Param("gamma", 0.01, per_model=True, low=0.0, high=1.0, doc="fraction of largest magnitudes removed")
_EPSILON = Param("epsilon", 0.15, per_model=True, low=0.0, high=1.0,
                 doc="keep probabilities span density +- epsilon by magnitude rank")
register(MergeMethod(
    "breadcrumbs", "Model Breadcrumbs: base + lambda*sum_i w_i*m_i*tau_i, m_i drops the gamma*n largest and "
    "then the smallest abs(tau_i) down to density*n",
    base="required", min_models=1, max_models=None,
    params=(_WEIGHT, _DENSITY, _GAMMA, _LAMBDA, _normalize(False), _rescale_l1(False), _INT8_MASK),
    stream=sparsify.BREADCRUMBS,
))
register(MergeMethod(
    "breadcrumbs_ties", "breadcrumbs' masks, then TIES: only entries with the sign of sum_i w_i*m_i*tau_i count "
    "(divided by their weights when normalize)",
    base="required", min_models=1, max_models=None,
    params=(_WEIGHT, _DENSITY, _GAMMA, _LAMBDA, _normalize(False), _rescale_l1(False), _INT8_MASK),
    stream=sparsify.BREADCRUMBS_TIES,
))
register(MergeMethod(
    "della", "DELLA: keep tau_i entries with prob density-epsilon+2*epsilon*rank(abs(tau_i)) (seeded), L1 "
    "rescale, TIES sign election and disjoint mean: base + lambda*mean",
    base="required", min_models=1, max_models=None,
    params=(_WEIGHT, _DENSITY, _EPSILON, _LAMBDA, _normalize(True), _rescale_l1(True), _SEED, _INT8_MASK),
    stream=sparsify.DELLA,
))
register(MergeMethod(
    "della_linear", "DELLA's rank-based seeded drop and L1 rescale, then base + lambda*sum_i w_i*tau_i'",
    base="required", min_models=1, max_models=None,
    params=(_WEIGHT, _DENSITY, _EPSILON, _LAMBDA, _normalize(False), _rescale_l1(True), _SEED, _INT8_MASK),
    stream=sparsify.DELLA_LINEAR,
))
register(MergeMethod(
    "sce", "SCE: tau restricted to the select_topk highest-variance entries; base + sum_i c_i*m_i*tau_i / "
    "sum_i c_i*m_i, c_i ~ mean(tau_i^2), m_i = agrees with the elected sign",
    base="required", min_models=1, max_models=None,
    params=(Param("select_topk", 1.0, low=0.0, high=1.0, doc="fraction of highest-variance entries kept"),
            _INT8_MASK),
    stream=sparsify.SCE,
))
register(MergeMethod(
    "model_stock", "Model Stock: base + t*(mean(models) - base), t = N*cos/(1+(N-1)*cos) from the task "
    "vectors' mean pairwise cosine",
    base="required", min_models=2, max_models=None,
    params=(Param("filter_wise", False, tensor=False, doc="one t per row instead of per tensor"),),
    stream=Streamed(geometry.apply_coefficients, geometry.model_stock_prepare),
))
register(MergeMethod(
    "nuslerp", "(sin((1-t)*theta)*v0 + sin(t*theta)*v1)/sin(theta), t = w1/(w0+w1), v = model or model - base "
    "(added back to the base)",
    base="optional", min_models=2, max_models=2,
    params=(_WEIGHT, Param("nuslerp_row_wise", False, tensor=False, doc="without flatten: SLERP columns"),
            Param("nuslerp_flatten", True, tensor=False, doc="SLERP the whole tensor as one vector")),
    stream=Streamed(geometry.apply_coefficients, geometry.nuslerp_prepare),
))
register(MergeMethod(
    "multislerp", "mean_i(w_i*norm_i) * exp_m(sum_i w_i*log_m(u_i)): barycentric SLERP of N models (task "
    "vectors with a base), m their weighted mean direction",
    base="optional", min_models=1, max_models=None,
    params=(_WEIGHT, Param("normalize_weights", True, tensor=False, doc="divide the weights by their sum"),
            Param("eps", 1e-8, tensor=False, low=0.0, doc="numerical floor of the norms")),
    stream=Streamed(geometry.apply_coefficients, geometry.multislerp_prepare),
))
register(MergeMethod(
    "karcher", "mean_i(norm_i) * argmin_m sum_i angle(m, u_i)^2 (Riemannian mean on the sphere, fixed-point "
    "iteration); a base, if given, is one more input",
    base="optional", min_models=1, max_models=None,
    params=(Param("max_iter", 10, tensor=False, low=1, doc="most fixed-point iterations"),
            Param("tol", 1e-5, tensor=False, low=0.0, doc="convergence tolerance of the tangent step")),
    stream=Streamed(geometry.apply_coefficients, geometry.karcher_prepare),
))
register(MergeMethod(
    "nearswap", "w*model + (1-w)*base, w = clamp(t/abs(base - model), 0, 1): the model's value where it is "
    "within t of the base",
    base="required", min_models=1, max_models=1,
    params=(Param("t", None, low=0.0, doc="distance below which the model's value is taken"),),
    stream=Streamed(geometry.nearswap_apply),
))
register(MergeMethod(
    "passthrough", "scale*model: copy one model (the building block of slices recipes)",
    base="none", min_models=1, max_models=1,
    params=(Param("scale", 1.0, per_model=True, doc="factor applied to the model's tensors"),),
    coefficients=_passthrough,
))


def _safe_lora(job: TensorJob) -> torch.Tensor:
    assert job.base is not None
    finetuned, unaligned = job.models
    if not safety.applies(job.name, tuple(job.base.shape)):
        return finetuned.to(job.out_dtype)
    out, _ = safety.safe_lora_update(job.base, finetuned, unaligned, threshold=float(job.params["threshold"]),
                                     exact=bool(job.params["exact"]))
    return out.to(job.out_dtype)


def _safemerge(job: TensorJob) -> torch.Tensor:
    assert job.base is not None
    finetuned, unaligned, safe = job.models
    if not safety.applies(job.name, tuple(job.base.shape)):
        return finetuned.to(job.out_dtype)
    p = job.params
    out, _ = safety.safemerge_update(job.base, finetuned, unaligned, safe, threshold=float(p["threshold"]),
                                     weight=float(p["weight"]), safety_weight=float(p["safety_weight"]),
                                     exact=bool(p["exact"]))
    return out.to(job.out_dtype)


_EXACT = Param("exact", False, tensor=False, doc="orthogonal projection V(V^T V)^+V^T instead of VV^T/||V||_F")

register(MergeMethod(
    "safe_lora", "Safe LoRA: per weight matrix, aligned + P(ft - aligned) when cos(P D, D) <= threshold, "
    "P = projection on V = aligned - unaligned; base = aligned, models = [fine-tune, unaligned]",
    base="required", min_models=2, max_models=2,
    params=(Param("threshold", 0.5, low=-1.0, high=1.0, doc="project layers whose cosine is at most this"),
            _EXACT),
    combine=_safe_lora, side_files_from=1,
))
register(MergeMethod(
    "safemerge", "SafeMERGE: layers with cos(P D, D) < threshold become aligned + weight*(ft - aligned) + "
    "safety_weight*(safety - aligned); base = aligned, models = [fine-tune, unaligned, safety model]",
    base="required", min_models=3, max_models=3,
    params=(Param("threshold", 0.35, low=-1.0, high=1.0, doc="merge layers whose cosine is below this"),
            Param("weight", 0.8, doc="weight of the fine-tune's update in a merged layer"),
            Param("safety_weight", 0.2, doc="weight of the safety model's update in a merged layer"), _EXACT),
    combine=_safemerge, side_files_from=1,
))


def methods_table() -> str:
    """A Markdown table of the registered methods, for the README and ``--help``."""
    rows = ["| method | base | models | parameters | what it does |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        params = ", ".join(f"`{p.name}`" + ("*" if p.per_model else "")
                           + f"={'required' if p.default is None else p.default}" for p in m.params)
        hi = "any" if m.max_models is None else str(m.max_models)
        rows.append(f"| `{m.name}` | {m.base} | {m.min_models}..{hi} | {params} | {m.summary} |")
    return "\n".join(rows)
