"""The repair search: in-memory candidates ``theta = base + sum_g a_g * tau_g``, cheap proxies first, an optuna study.

One model is loaded once. The task vector ``tau`` (fine-tune minus base; for DARE / TIES the processed task
vector for the trial's density and seed; for the safety vector ``aligned - unaligned`` on top of the fine-tune)
is computed once, and every candidate is written into the model's parameters in place with
:func:`mergekit_safe.kernels.apply_` (one Triton launch on GPU): no checkpoint is written per trial.

Groups (``--groups``) split the tensors so each group gets its own coefficient:

* ``global`` (default): one coefficient for everything;
* ``layers:K``: K contiguous bands of transformer blocks (block ``i`` of ``L`` is in band ``i*K // L``; the
  embeddings go with the first band, the final norm and the head with the last);
* ``modules``: one coefficient per module type (attention, mlp, embed, norm, head, other);
* ``layers:K,modules``: the cross product (band x module type, e.g. ``layers0-1/attention``); groups no tensor
  falls into are dropped. The cross product was chosen over concatenation because a coefficient then has one
  meaning (how far this module type of these blocks moves), and the exact-name recipe rules stay exact.

With several groups the sampler (TPE, or NSGA-II for the Pareto front) starts from structured trials: each
group moved alone from the base to the fine-tune, then the safest and most useful groups moved together until
the utility bound is met (forward selection, see :func:`_warm_start`).

Fidelities, cheapest first: the utility NLL on the utility rows and the refusal margin on the harmful prompts
(one forward pass each, "forward runs"); generation + judge ("generation runs") only for candidates that meet
the utility bound and whose proxy unsafe rate is within ``slack`` of the best confirmed one. Results are cached
by coefficients, in memory and in the study (a resumed or shared study reuses completed trials).

With one coefficient the search exploits monotonicity (utility and unsafe rate both grow with the coefficient
towards the fine-tune): bisection on the cheap utility bound brackets the smallest feasible coefficient, then
one generation run confirms it (more only when an over-refusal bound pushes the coefficient up). The endpoints
are the base and the fine-tune, already measured as references, so the search costs ``log2(1 / tolerance)``
forward runs and one generation run.

Resuming and sharing: ``storage="sqlite:///repair.db"`` keeps every trial in a database. Running the same
command again loads the study (same ``study_name``, by default derived from the inputs and settings), reuses
every completed trial and continues. Several workers given the same database URL (sqlite on one machine, a
PostgreSQL/MySQL URL across machines) and study name share one study: optuna's distributed mode, each worker
asking for its own trials; that pays off with ``--groups`` (TPE / NSGA-II), while the one-coefficient
bracketing is sequential by nature (a second worker finds the first one's points in the study and reuses them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import SearchError
from mergekit_safe.io.source import TensorSource
from mergekit_safe.kernels import reference
from mergekit_safe.merge.recipe import module_type

log = logging.getLogger("mergekit_safe")

#: Methods the search can run; all are ``base + a * tau`` with a method-specific base and tau.
SEARCH_METHODS = ("lerp", "dare_linear", "ties", "safety_vector")
_MODULES = ("attention", "mlp", "embed", "norm", "head", "other")


# --------------------------------------------------------------------------------------------------
# groups


@dataclass(frozen=True)
class GroupSpec:
    """How tensors are split into coefficient groups.

    Attributes:
        layers: number of contiguous layer bands (0: no split by depth).
        modules: split by module type.
    """

    layers: int = 0
    modules: bool = False

    def __str__(self) -> str:
        parts = ([f"layers:{self.layers}"] if self.layers else []) + (["modules"] if self.modules else [])
        return ",".join(parts) or "global"


def parse_groups(spec: str | None) -> GroupSpec:
    """Parse ``--groups``: ``global``, ``layers:K``, ``modules`` or ``layers:K,modules``.

    Raises:
        SearchError: an unknown part or a bad K.

    Example:
        >>> parse_groups("layers:3,modules")
        GroupSpec(layers=3, modules=True)
    """
    if spec is None or spec.strip() in ("", "global"):
        return GroupSpec()
    layers, modules = 0, False
    for part in (p.strip() for p in spec.split(",")):
        if part == "modules":
            modules = True
        elif part.startswith("layers:"):
            try:
                layers = int(part.split(":", 1)[1])
            except ValueError:
                layers = 0
            if layers < 1:
                raise SearchError(f"--groups {spec!r}: layers:K needs a whole number K >= 1, e.g. layers:3")
        else:
            raise SearchError(f"--groups {spec!r}: unknown part {part!r}; use global, layers:K, modules or "
                              "layers:K,modules")
    return GroupSpec(layers, modules)


def _band(index: int, bands: int, num_layers: int) -> int:
    return index * bands // num_layers


def _band_name(band: int, bands: int, num_layers: int) -> str:
    members = [i for i in range(num_layers) if _band(i, bands, num_layers) == band]
    return f"layers{members[0]}-{members[-1]}" if len(members) > 1 else f"layers{members[0]}"


def group_of(name: str, spec: GroupSpec, num_layers: int) -> str:
    """The coefficient group of tensor ``name`` (``all`` when there is one group).

    Example:
        >>> group_of("model.layers.1.mlp.up_proj.weight", GroupSpec(2, True), 2)
        'layers1/mlp'
    """
    from mergekit_safe.merge.recipe import layer_index

    parts = []
    if spec.layers:
        i = layer_index(name)
        if i is None:
            i = 0 if module_type(name) == "embed" else num_layers - 1
        parts.append(_band_name(_band(min(i, num_layers - 1), spec.layers, num_layers), spec.layers, num_layers))
    if spec.modules:
        parts.append(module_type(name))
    return "/".join(parts) or "all"


def check_groups(spec: GroupSpec, num_layers: int) -> None:
    """Raises SearchError when ``layers:K`` asks for more bands than the model has layers."""
    if spec.layers > num_layers:
        raise SearchError(f"--groups {spec}: the model has {num_layers} layers; use at most layers:{num_layers}")


# --------------------------------------------------------------------------------------------------
# in-memory candidates


@dataclass
class CandidateSpace:
    """A loaded model plus, per changed tensor, its base, its (processed) task vector and its group.

    Attributes:
        model: the model whose parameters are overwritten per candidate.
        names: checkpoint names of the tensors a candidate changes.
        groups: group names, in a fixed order.
        group_of: tensor name -> group.
        bases: fp32 (or the model's dtype) base tensors, by name.
        taus: task vectors, by name.
        targets: the model's parameter tensors, by name.
        method: the search method.
        current: the coefficients last applied (None: something else was loaded).
    """

    model: Any
    names: list[str]
    groups: list[str]
    group_of: dict[str, str]
    bases: dict[str, torch.Tensor]
    taus: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    method: str = "lerp"
    current: dict[str, float] | None = None

    def apply(self, coeffs: dict[str, float]) -> None:
        """Write ``base + a_g * tau`` into every changed parameter, in place (one kernels.apply_ call).

        Raises:
            SearchError: a group has no coefficient.
        """
        missing = [g for g in self.groups if g not in coeffs]
        if missing:
            raise SearchError(f"no coefficient for group(s) {missing}; groups: {', '.join(self.groups)}")
        with torch.no_grad():
            kernels.apply_([self.targets[n] for n in self.names], [self.bases[n] for n in self.names],
                           [[self.taus[n]] for n in self.names],
                           [[float(coeffs[self.group_of[n]])] for n in self.names])
        self.current = dict(coeffs)

    def load(self, get: Callable[[str], torch.Tensor]) -> None:
        """Copy another checkpoint's tensors (``get(name)``) into the changed parameters (reference points)."""
        with torch.no_grad():
            for n in self.names:
                self.targets[n].copy_(get(n).view(self.targets[n].shape))
        self.current = None

    def uniform(self, value: float) -> dict[str, float]:
        """The same coefficient for every group."""
        return {g: float(value) for g in self.groups}


def _params_by_name(model: Any) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update({k: v for k, v in model.named_buffers() if k not in out})
    return out


def process_tau(name: str, tau: torch.Tensor, method: str, density: float, seed: int) -> torch.Tensor:
    """The task vector a method adds: raw (lerp, safety_vector), DARE drop-and-rescale, or TIES trim.

    Matches the engine's ``dare_linear`` / ``ties`` with one model, weight 1, so the written checkpoint of a
    candidate is the candidate.
    """
    if method == "dare_linear":
        return kernels.dare(tau, 1.0 - float(density), int(seed), reference.tensor_id(name, 0), rescale=True)
    if method == "ties":
        return kernels.ties([tau], [1.0], [float(density)], True)
    return tau


def build_space(
    model: Any,
    base: TensorSource,
    plus: TensorSource,
    minus: TensorSource | None,
    *,
    method: str = "lerp",
    groups: GroupSpec = GroupSpec(),
    num_layers: int,
    density: float = 0.5,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> CandidateSpace:
    """Build the candidate space on an already loaded ``model``.

    ``tau = plus - minus`` (``minus`` None: ``plus - base``), processed per :func:`process_tau`; tensors whose
    task vector is all zero are left out (they never change).

    Args:
        model: causal LM in memory; its parameter names must match the checkpoints' tensor names.
        base: checkpoint (``.get(name)``) the candidates start from.
        plus, minus: checkpoints whose difference is the task vector.
        method: one of :data:`SEARCH_METHODS`.
        groups: the coefficient groups.
        num_layers: transformer blocks of the model.
        density, seed: DARE / TIES settings.
        names: tensors to consider (default: every floating tensor of ``base``).

    Raises:
        SearchError: a checkpoint tensor the model does not have, or a shape mismatch.
    """
    params = _params_by_name(model)
    bases, taus, gmap = {}, {}, {}
    for name in names if names is not None else base.keys():
        b = base.get(name)
        if not b.is_floating_point():
            continue
        if name not in params:
            raise SearchError(f"tensor {name!r} of {base.path} is not a parameter of the loaded model")
        target = params[name]
        p = plus.get(name).float()
        m = minus.get(name).float() if minus is not None else b.float()
        if p.shape != m.shape or p.numel() != target.numel():
            raise SearchError(f"tensor {name!r}: shapes {list(p.shape)} and {list(m.shape)} do not match the "
                              f"model's {list(target.shape)}")
        tau = process_tau(name, p - m, method, density, seed).view(target.shape)
        if minus is None and not bool(tau.any()):
            continue
        bases[name] = b.float().view(target.shape).to(target.device, target.dtype).clone()
        taus[name] = tau.to(target.device, target.dtype).contiguous()
        gmap[name] = group_of(name, groups, num_layers)
    if not bases:
        raise SearchError("the fine-tune does not differ from the base in any tensor; nothing to repair")
    order = sorted(set(gmap.values()), key=lambda g: list(gmap.values()).index(g))
    names_out = list(bases)
    return CandidateSpace(model, names_out, order, gmap, bases, taus, {n: params[n].data for n in names_out},
                          method)


# --------------------------------------------------------------------------------------------------
# trials, constraints, Pareto front


@dataclass
class TrialResult:
    """What one candidate measured.

    Attributes:
        coeffs: coefficient per group.
        nll: utility NLL (lower is better).
        proxy_unsafe: forward-only unsafe-rate estimate: ``mean sigmoid(-margin)`` over the harmful prompts
            (None: not measured; the one-coefficient bracketing needs only the utility).
        margin: mean refusal margin (None: not measured).
        unsafe: judged unsafe rate ``{k, n, rate, low, high}`` when generated, else None.
        over_refusal: judged over-refusal on benign prompts when generated, else None.
        feasible: meets the utility bound (and the over-refusal bound when judged).
        number: the optuna trial number.
        cached: reused from an earlier trial of the study (or the in-memory cache).
        seconds: wall time of this trial's evaluation.
    """

    coeffs: dict[str, float]
    nll: float
    proxy_unsafe: float | None
    margin: float | None
    unsafe: dict[str, Any] | None = None
    over_refusal: dict[str, Any] | None = None
    feasible: bool = False
    number: int = -1
    cached: bool = False
    seconds: float = 0.0

    @property
    def judged(self) -> bool:
        return self.unsafe is not None

    @property
    def unsafe_rate(self) -> float:
        """The judged unsafe rate when there is one, else the proxy estimate, else 1 (unknown counts as unsafe)."""
        if self.unsafe is not None:
            return float(self.unsafe["rate"])
        return self.proxy_unsafe if self.proxy_unsafe is not None else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "coeffs": self.coeffs, "nll": self.nll, "proxy_unsafe": self.proxy_unsafe,
                "margin": self.margin, "unsafe": self.unsafe, "over_refusal": self.over_refusal,
                "feasible": self.feasible, "judged": self.judged, "cached": self.cached, "seconds": self.seconds}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], number: int) -> TrialResult:
        return cls(dict(attrs["coeffs"]), attrs["nll"], attrs.get("proxy_unsafe"), attrs.get("margin"),
                   attrs.get("unsafe"), attrs.get("over_refusal"), bool(attrs.get("feasible")), number, True, 0.0)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are minimised (ties kept), sorted by x.

    Example:
        >>> pareto_front([(0.0, 3.0), (0.5, 1.0), (0.6, 2.0), (1.0, 0.5)])
        [0, 1, 3]
    """
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return sorted(out, key=lambda i: (points[i][0], points[i][1]))


@dataclass
class Budget:
    """Stopping rules: a number of trials and/or a wall-clock budget (seconds)."""

    trials: int = 30
    seconds: float | None = None
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise SearchError(f"--trials {self.trials}: the budget must allow at least one candidate")
        if self.seconds is not None and self.seconds <= 0:
            raise SearchError(f"--time-budget {self.seconds:g}: the budget must allow at least one candidate")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds


@dataclass
class Costs:
    """What the search spent."""

    trials: int = 0
    reused_trials: int = 0
    forward_runs: int = 0
    generation_runs: int = 0


def study_name_for(settings: dict[str, Any]) -> str:
    """A stable study name from the inputs and settings, so the same command resumes the same study."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"repair-{digest}"


def _key(coeffs: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((g, round(float(v), 9)) for g, v in coeffs.items()))


@dataclass
class Evaluator:
    """Measures candidates: cheap signals per trial, generation + judge on demand; caches by coefficients.

    Attributes:
        space: the candidate space.
        nll_fn: ``() -> float``, the utility NLL of the model as it is now (one forward run).
        margin_fn: ``() -> list[float]``, refusal margins on the harmful prompts (one forward run).
        judge_fn: ``(benign) -> (unsafe Rate dict, over-refusal Rate dict or None)`` (one generation run); the
            benign prompts are generated only when ``benign`` (an over-refusal bound is set), so a confirmation
            costs the harmful prompts alone.
        nll_max: the utility bound (NLL must not exceed it).
        max_over_refusal: bound on the judged over-refusal rate, or None.
        costs: counters, updated in place.
    """

    space: CandidateSpace
    nll_fn: Callable[[], float]
    margin_fn: Callable[[], list[float]]
    judge_fn: Callable[[bool], tuple[dict[str, Any], dict[str, Any] | None]]
    nll_max: float
    max_over_refusal: float | None = None
    costs: Costs = field(default_factory=Costs)
    cache: dict[Any, TrialResult] = field(default_factory=dict)

    def cheap(self, coeffs: dict[str, float], proxy: bool = True) -> TrialResult:
        """Utility NLL and (with ``proxy``) the refusal-margin proxy of a candidate, one forward run each (cached)."""
        key = _key(coeffs)
        res = self.cache.get(key)
        if res is not None and (not proxy or res.proxy_unsafe is not None):
            return res
        t0 = time.perf_counter()
        self.space.apply(coeffs)
        if res is None:
            res = TrialResult(dict(coeffs), float(self.nll_fn()), None, None)
            self.costs.forward_runs += 1
        if proxy:
            margins = self.margin_fn()
            self.costs.forward_runs += 1
            n = max(len(margins), 1)
            # P(comply) of a two-way choice between the openings, averaged: a smooth unsafe-rate estimate
            res.proxy_unsafe = sum(1.0 / (1.0 + math.exp(min(m, 700.0))) for m in margins) / n
            res.margin = sum(margins) / n
        res.seconds += time.perf_counter() - t0
        res.feasible = self.utility_ok(res)
        self.cache[key] = res
        return res

    def seed(self, coeffs: dict[str, float], nll: float, unsafe: dict[str, Any] | None,
             over_refusal: dict[str, Any] | None, number: int) -> None:
        """Put an already measured point (a reference model the space reproduces exactly, e.g. all zeros = the
        base) into the cache, so the search does not measure it again. ``number`` < 0 marks it as a reference."""
        res = TrialResult(dict(coeffs), nll, None, None, unsafe, over_refusal, number=number, cached=True)
        res.feasible = self.utility_ok(res) and self.over_refusal_ok(res)
        self.cache[_key(coeffs)] = res

    def utility_ok(self, res: TrialResult) -> bool:
        return res.nll <= self.nll_max + 1e-12

    def judge(self, res: TrialResult) -> TrialResult:
        """Generation + judge for a candidate (no-op when already judged)."""
        if res.judged:
            return res
        t0 = time.perf_counter()
        if self.space.current is None or _key(self.space.current) != _key(res.coeffs):
            self.space.apply(res.coeffs)
        res.unsafe, res.over_refusal = self.judge_fn(self.max_over_refusal is not None)
        self.costs.generation_runs += 1
        res.feasible = self.utility_ok(res) and self.over_refusal_ok(res)
        res.seconds += time.perf_counter() - t0
        return res

    def over_refusal_ok(self, res: TrialResult) -> bool:
        if self.max_over_refusal is None or res.over_refusal is None:
            return True
        return float(res.over_refusal["rate"]) <= self.max_over_refusal + 1e-12


def best_of(results: Sequence[TrialResult]) -> TrialResult | None:
    """The chosen candidate: judged and feasible, lowest unsafe rate, then lowest NLL (most utility).

    Reference points (negative numbers: the base or the fine-tune itself) are chosen only when no searched
    candidate qualifies, so a tie in unsafe rate never hands back the fine-tune unchanged.
    """
    ok = [r for r in results if r.judged and r.feasible]
    searched = [r for r in ok if r.number >= 0] or ok
    return min(searched, key=lambda r: (r.unsafe_rate, r.nll)) if searched else None


# --------------------------------------------------------------------------------------------------
# the optuna study


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(storage: str | None, study_name: str, *, pareto: bool, seed: int) -> Any:
    """Create or load (resume) the study; TPE with constraints, or NSGA-II for the Pareto front.

    Raises:
        SearchError: the storage URL cannot be opened.
    """
    optuna = _optuna()

    # constraints come with each trial (trial.set_constraint), which both samplers read
    if pareto:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
        directions = ["minimize", "minimize"]
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True)
        directions = ["minimize"]
    try:
        return optuna.create_study(storage=storage, study_name=study_name, directions=directions, sampler=sampler,
                                   load_if_exists=True)
    except ValueError as e:  # e.g. same name, other directions
        raise SearchError(f"--storage {storage}: cannot use study {study_name!r} ({e}); "
                          "pick another --study-name") from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy errors: bad URL, unwritable file
        raise SearchError(f"--storage {storage}: cannot open the study database ({str(e).splitlines()[0]})") from None


def reuse_completed(study: Any, evaluator: Evaluator, costs: Costs) -> list[TrialResult]:
    """Completed trials of a (resumed or shared) study, put into the evaluator's cache."""
    optuna = _optuna()
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "coeffs" not in t.user_attrs:
            continue
        r = TrialResult.from_attrs(t.user_attrs, t.number)
        r.feasible = evaluator.utility_ok(r) and evaluator.over_refusal_ok(r)
        evaluator.cache[_key(r.coeffs)] = r
        out.append(r)
    costs.reused_trials += len(out)
    return out


def _record(study: Any, trial: Any, res: TrialResult, evaluator: Evaluator, pareto: bool) -> None:
    res.number = trial.number
    attrs = res.to_dict()
    for k in ("coeffs", "nll", "proxy_unsafe", "margin", "unsafe", "over_refusal", "feasible"):
        trial.set_user_attr(k, attrs[k])
    over = 0.0
    if evaluator.max_over_refusal is not None and res.over_refusal is not None:
        over = float(res.over_refusal["rate"]) - evaluator.max_over_refusal
    trial.set_constraint("utility", res.nll - evaluator.nll_max)
    trial.set_constraint("over_refusal", over)
    study.tell(trial, [res.unsafe_rate, res.nll] if pareto else res.unsafe_rate)


def _ask(
    study: Any, groups: Sequence[str], low: float, high: float, fixed: dict[str, float] | None
) -> tuple[Any, dict[str, float]]:
    if fixed is not None:
        study.enqueue_trial({f"a[{g}]": float(fixed[g]) for g in groups}, skip_if_exists=False)
    trial = study.ask()
    return trial, {g: float(trial.suggest_float(f"a[{g}]", low, high)) for g in groups}


@dataclass
class SearchResult:
    """The outcome of :func:`run_search`.

    Attributes:
        trials: every trial of the study (reused ones included), in trial order; reference points the search
            used from the cache come first with negative numbers.
        best: the chosen candidate, or None when no candidate met the bounds.
        front: trial numbers on the Pareto front (unsafe rate vs NLL) among judged trials.
        strategy: ``bracket`` (one coefficient), ``tpe`` or ``nsga2``.
        costs: trials, forward and generation runs of this run.
        study_name: the optuna study's name.
        seconds: wall time of the search.
    """

    trials: list[TrialResult]
    best: TrialResult | None
    front: list[int]
    strategy: str
    costs: Costs
    study_name: str
    seconds: float


def run_search(
    evaluator: Evaluator,
    *,
    budget: Budget,
    storage: str | None = None,
    study_name: str = "repair",
    pareto: bool = False,
    seed: int = 0,
    low: float = 0.0,
    high: float = 1.0,
    increasing: bool = True,
    slack: float = 0.05,
    tolerance: float = 1.0 / 64,
) -> SearchResult:
    """Search the coefficients: bracketing for one group, TPE for several, NSGA-II for ``pareto``.

    Args:
        evaluator: measures candidates (see :class:`Evaluator`).
        budget: trials and seconds.
        storage: optuna storage URL (``sqlite:///repair.db``) to resume or share the study; None: in memory.
        study_name: the study's name in the storage.
        pareto: return the unsafe-rate / NLL front (NSGA-II).
        seed: sampler seed.
        low, high: coefficient range.
        increasing: True when utility (and unsafe rate) grow with the coefficient (lerp, DARE, TIES); False for
            the safety vector, where the coefficient adds safety.
        slack: a candidate is generated when its proxy unsafe rate is at most the best judged one plus this.
        tolerance: the one-coefficient bracketing stops when the bracket is this narrow.

    Returns:
        A :class:`SearchResult`.
    """
    t0 = time.perf_counter()
    costs = evaluator.costs
    study = open_study(storage, study_name, pareto=pareto, seed=seed)
    results = reuse_completed(study, evaluator, costs)
    groups = evaluator.space.groups
    trials_left = budget.trials

    def evaluate(coeffs: dict[str, float] | None, judge: bool | Callable[[TrialResult], bool],
                 force: bool = False, proxy: bool = True) -> TrialResult | None:
        """One trial: ask, measure (cache first), tell. None when out of budget.

        A cached point that now needs a generation run becomes a new trial at the same coefficients (its cheap
        signals come from the cache); ``force`` ignores the trial count (confirmation runs).
        """
        nonlocal trials_left
        if coeffs is not None and _key(coeffs) in evaluator.cache:
            hit = evaluator.cache[_key(coeffs)]
            if hit.judged or not (judge(hit) if callable(judge) else judge):
                if not any(r is hit for r in results):  # a seeded reference point joins the results
                    results.append(hit)
                return hit
        if (trials_left <= 0 and not force) or budget.out_of_time():
            return None
        trial, coeffs = _ask(study, groups, low, high, coeffs)
        res = evaluator.cheap(coeffs, proxy=proxy)
        if any(r is res for r in results):
            res = replace(res, cached=True, seconds=0.0)
        if judge(res) if callable(judge) else judge:
            evaluator.judge(res)
        _record(study, trial, res, evaluator, pareto)
        evaluator.cache[_key(coeffs)] = res
        results.append(res)
        trials_left -= 1
        costs.trials += 1
        return res

    def left() -> int:
        return trials_left

    if len(groups) == 1 and not pareto:
        strategy = "bracket"
        _one_coefficient(evaluate, left, evaluator, groups[0], low, high, increasing, tolerance)
    else:
        strategy = "nsga2" if pareto else "tpe"

        def can_win(res: TrialResult) -> bool:
            if not evaluator.utility_ok(res):
                return False
            judged = [r for r in results if r.judged and r.feasible]
            if pareto:
                return not any(r.unsafe_rate + slack < res.unsafe_rate and r.nll <= res.nll for r in judged)
            best = best_of(judged)
            return best is None or res.unsafe_rate <= best.unsafe_rate + slack

        _warm_start(evaluate, groups, low, high, can_win)
        while trials_left > 0 and not budget.out_of_time():
            evaluate(None, can_win)
        # confirm the best proxy candidates that never got a generation run
        if best_of(results) is None:
            pending = sorted((r for r in results if evaluator.utility_ok(r) and not r.judged),
                             key=lambda r: (r.unsafe_rate, r.nll))
            for r in pending[:3]:
                evaluate(r.coeffs, True, force=True)
    judged = [r for r in results if r.judged]
    front = [judged[i].number for i in pareto_front([(r.unsafe_rate, r.nll) for r in judged])]
    results.sort(key=lambda r: r.number)
    return SearchResult(results, best_of(results), front, strategy, costs, study_name, time.perf_counter() - t0)


def _warm_start(
    evaluate: Callable[..., TrialResult | None], groups: Sequence[str], low: float, high: float,
    can_win: Callable[[TrialResult], bool],
) -> None:
    """Structured first trials before the sampler takes over: forward selection from the base.

    Each group moved alone to ``high`` (the others at ``low``, the safe base) measures what it brings (utility)
    and costs (unsafe estimate). Groups are then ranked safest first (estimate below one half), most useful first,
    and moved together, top 2, 3, ..., until the utility bound is met. Forward runs only, except where a candidate
    can win; every one is a trial the sampler learns from. Coefficients already in the study are reused, so a
    resumed study pays nothing here.
    """
    alone: dict[str, TrialResult] = {}
    for g in groups:
        r = evaluate({h: (high if h == g else low) for h in groups}, False)
        if r is None:
            return
        alone[g] = r
    rank = sorted(groups, key=lambda g: (alone[g].unsafe_rate > 0.5, alone[g].nll))
    if alone[rank[0]].feasible:
        evaluate({h: (high if h == rank[0] else low) for h in groups}, can_win)
        return
    for k in range(2, len(groups)):
        r = evaluate({h: (high if h in rank[:k] else low) for h in groups}, can_win)
        if r is None or r.feasible:
            return


def _one_coefficient(
    evaluate: Callable[..., TrialResult | None], left: Callable[[], int], evaluator: Evaluator, group: str,
    low: float, high: float, increasing: bool, tolerance: float, climb_tolerance: float = 1.0 / 16,
) -> None:
    """One coefficient: bracket the boundary of the utility bound (:func:`_boundary`), then generate to confirm.

    With ``increasing`` utility grows with the coefficient, so the smallest feasible coefficient is the safest
    feasible one; otherwise (safety vector) the largest feasible one is. When that point is strictly safer than
    the fine-tune, a short climb towards the fine-tune (:func:`_climb`, a few generation runs) looks for the most
    useful coefficient that is just as safe: the objective is the unsafe rate first, then utility.
    """
    def at(a: float, judge: bool = False) -> TrialResult | None:
        # utility only (no proxy needed); a confirmation run may go one trial over --trials, so a bracketing cut
        # short still gets judged
        return evaluate({group: a}, judge, force=judge, proxy=False)

    safe_end, useful_end = (low, high) if increasing else (high, low)
    first = at(safe_end)
    if first is None:
        return
    if first.feasible:  # the safest point already keeps enough utility
        at(safe_end, True)
        return
    last = at(useful_end)
    if last is None:
        return
    if not last.feasible:
        at(useful_end, True)  # nothing is feasible; judge the most useful point for the report
        return
    good = _boundary(at, left, safe_end, useful_end, tolerance)
    chosen = at(good, True)
    if chosen is not None and chosen.feasible and (not last.judged or last.unsafe_rate > chosen.unsafe_rate):
        _climb(evaluate, left, group, good, useful_end, chosen.unsafe_rate, climb_tolerance)
    # An over-refusal bound pushes the coefficient towards the fine-tune: bisect on the judged bound.
    if chosen is not None and not chosen.feasible and evaluator.utility_ok(chosen):
        lo_bad, hi_good = good, useful_end
        r_end = at(useful_end, True)
        if r_end is None or not r_end.feasible:
            return
        while abs(hi_good - lo_bad) > tolerance:
            mid = 0.5 * (lo_bad + hi_good)
            r = at(mid, True)
            if r is None:
                break
            if r.feasible:
                hi_good = mid
            else:
                lo_bad = mid


def _climb(
    evaluate: Callable[..., TrialResult | None], left: Callable[[], int], group: str, ok: float, bad: float,
    unsafe: float, tolerance: float,
) -> None:
    """Bisection on the judged unsafe rate between ``ok`` (as safe as ``unsafe``) and ``bad`` (less safe).

    Unsafe rate grows with the coefficient, so this finds the most useful coefficient as safe as ``ok``, to
    within ``tolerance``: about ``log2(|bad - ok| / tolerance)`` generation runs, within the trial budget.
    """
    while abs(bad - ok) > tolerance and left() > 0:
        mid = 0.5 * (ok + bad)
        r = evaluate({group: mid}, True, proxy=False)
        if r is None:
            return
        if r.feasible and r.unsafe_rate <= unsafe:
            ok = mid
        else:
            bad = mid


def _boundary(
    at: Callable[[float], TrialResult | None], left: Callable[[], int], bad: float, good: float, tolerance: float,
) -> float:
    """Bisection: the feasible end of a bracket ``[bad, good]`` narrower than ``tolerance``.

    ``log2(1 / tolerance)`` forward runs (6 at the default 1/64). Regula falsi (Illinois) on log NLL was tried:
    it saved one run on one organism build and cost four more on the next (log NLL bends sharply near the
    fine-tune), so the predictable bisection stays.
    """
    while abs(good - bad) > tolerance and left() > 0:
        mid = 0.5 * (bad + good)
        r = at(mid)
        if r is None:
            break
        if r.feasible:
            good = mid
        else:
            bad = mid
    return good


def summarize_trials(results: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """Every trial as JSON-ready dicts, trial order."""
    return [r.to_dict() for r in results]


__all__ = [
    "SEARCH_METHODS", "Budget", "CandidateSpace", "Costs", "Evaluator", "GroupSpec", "SearchResult", "TrialResult",
    "best_of", "build_space", "check_groups", "group_of", "open_study", "pareto_front", "parse_groups",
    "process_tau", "run_search", "study_name_for", "summarize_trials",
]

