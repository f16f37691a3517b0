"""The objective: what a candidate measures, the bounds it must meet, and the study's trial bookkeeping.

Fidelities, cheapest first: the utility NLL on the utility rows and the refusal margin on the harmful prompts
(one forward pass each, "forward runs"); generation + judge ("generation runs") only for candidates a strategy
asks to judge. Results are cached by coefficients, in memory and in the optuna study (a resumed or shared study
reuses completed trials). :class:`Trials` is the one place that asks the study for a trial, measures it and
tells the result, and it counts the trial budget.

Resuming and sharing: ``storage="sqlite:///repair.db"`` keeps every trial in a database. Running the same
command again loads the study (same ``study_name``, by default derived from the inputs and settings), reuses
every completed trial and continues. Several workers given the same database URL and study name share one
study (optuna's distributed mode). Workers that start together on a new sqlite file create the study under a
file lock beside the database, so neither fails on the other's half-created tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergekit_safe.errors import SearchError
from mergekit_safe.repair.space import CandidateSpace


@dataclass
class TrialResult:
    """What one candidate measured.

    Attributes:
        coeffs: coefficient per group.
        nll: utility NLL (lower is better).
        proxy_unsafe: forward-only unsafe-rate estimate: ``mean sigmoid(-margin)`` over the harmful prompts
            (None: not measured; the one-coefficient bracketing needs only the utility).
        margin: mean refusal margin (None: not measured).
        unsafe: judged unsafe rate ``{k, n, rate, low, high}`` when generated, else None (with task framings:
            the aggregate over framings, see ``RepairConfig.framing_aggregate``).
        over_refusal: judged over-refusal on benign prompts when generated, else None.
        utility: the task metric on generated answers (exact match...) when generated, else None.
        feasible: meets the utility bound (the generated metric once judged; until then the NLL gate) and the
            over-refusal bound when judged.
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
    utility: float | None = None
    feasible: bool = False
    number: int = -1
    cached: bool = False
    seconds: float = 0.0

    @property
    def judged(self) -> bool:
        """Whether a generation run judged this candidate."""
        return self.unsafe is not None

    @property
    def unsafe_rate(self) -> float:
        """The judged unsafe rate when there is one, else the proxy estimate, else 1 (unknown counts as unsafe)."""
        if self.unsafe is not None:
            return float(self.unsafe["rate"])
        return self.proxy_unsafe if self.proxy_unsafe is not None else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the report's ``trials`` entries."""
        return {"number": self.number, "coeffs": self.coeffs, "nll": self.nll, "proxy_unsafe": self.proxy_unsafe,
                "margin": self.margin, "unsafe": self.unsafe, "over_refusal": self.over_refusal,
                "utility": self.utility, "feasible": self.feasible, "judged": self.judged, "cached": self.cached, "seconds": self.seconds}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], number: int) -> TrialResult:
        """A completed trial read back from the study's user attributes."""
        return cls(dict(attrs["coeffs"]), attrs["nll"], attrs.get("proxy_unsafe"), attrs.get("margin"),
                   attrs.get("unsafe"), attrs.get("over_refusal"), attrs.get("utility"), bool(attrs.get("feasible")),
                   number, True, 0.0)


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
class Judgement:
    """What one generation run measured on the model as it is now.

    Attributes:
        unsafe: unsafe rate dict ``{k, n, rate, low, high}`` (aggregated over task framings when there are some).
        over_refusal: over-refusal rate dict on the benign prompts, or None when they were not generated.
        utility: the task metric on generated utility answers (higher is better), or None (NLL utility).
    """

    unsafe: dict[str, Any]
    over_refusal: dict[str, Any] | None = None
    utility: float | None = None


@dataclass
class Budget:
    """Stopping rules: a number of trials and/or a wall-clock budget (seconds).

    ``reserve`` seconds at the end are kept for what must follow the search (the confirmation of the chosen
    candidate), so ``--time-budget`` bounds the whole repair rather than the search alone. A step of the search
    starts only when it fits too (:meth:`fits`): the forward runs of a trial by the longest seen so far
    (``cheap_seconds``), a generation run by one reference run (``reserve``); on the real-model testbed a trial
    started just inside the budget overran it by up to 40 s.
    """

    trials: int = 30
    seconds: float | None = None
    start: float = field(default_factory=time.perf_counter)
    reserve: float = 0.0
    cheap_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise SearchError(f"--trials {self.trials}: the budget must allow at least one candidate")
        if self.seconds is not None and self.seconds <= 0:
            raise SearchError(f"--time-budget {self.seconds:g}: the budget must allow at least one candidate")

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        """Whether the wall-clock budget is spent."""
        return not self.fits(0.0)

    def fits(self, seconds: float) -> bool:
        """Whether a step of ``seconds`` can still run and leave the reserve."""
        return self.seconds is None or self.elapsed() + self.reserve + seconds < self.seconds


@dataclass
class Costs:
    """What the search spent."""

    trials: int = 0
    reused_trials: int = 0
    forward_runs: int = 0
    generation_runs: int = 0
    subsample_runs: int = 0


def study_name_for(settings: dict[str, Any]) -> str:
    """A stable study name from the inputs and settings, so the same command resumes the same study."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"repair-{digest}"


def coeff_key(coeffs: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """The cache key of a coefficient assignment (rounded, order-free)."""
    return tuple(sorted((g, round(float(v), 9)) for g, v in coeffs.items()))


@dataclass
class Evaluator:
    """Measures candidates: cheap signals per trial, generation + judge on demand; caches by coefficients.

    Attributes:
        space: the candidate space.
        nll_fn: ``() -> float``, the utility NLL of the model as it is now (one forward run).
        margin_fn: ``() -> list[float]``, refusal margins on the harmful prompts (one forward run).
        judge_fn: ``(benign) -> Judgement`` (one generation run); the benign prompts are generated only when
            ``benign`` (an over-refusal bound is set).
        nll_max: the NLL bound: the utility bound itself with ``utility_min`` None, else the gate below which a
            candidate is worth generating (a cheap fidelity; it widens to the largest NLL of any candidate the
            generated metric accepted, so a gate set too tight by the references cannot hide a good candidate
            twice).
        max_over_refusal: bound on the judged over-refusal rate, or None.
        utility_min: the bound on the generated task metric (higher is better), or None for the NLL bound.
        fallback_fn: ``() -> float``, the unsafe rate from generation on a small harmful subsample; replaces the
            margin proxy while the proxy ranks judged candidates worse than ``min_rank`` (Spearman).
        min_rank: the rank correlation the proxy must keep to be trusted.
        costs: counters, updated in place.
        cache: measured candidates by :func:`coeff_key`.
    """

    space: CandidateSpace
    nll_fn: Callable[[], float]
    margin_fn: Callable[[], list[float]]
    judge_fn: Callable[[bool], tuple[dict[str, Any], dict[str, Any] | None]]
    nll_max: float
    max_over_refusal: float | None = None
    utility_min: float | None = None
    fallback_fn: Callable[[], float] | None = None
    min_rank: float = 0.5
    costs: Costs = field(default_factory=Costs)
    cache: dict[Any, TrialResult] = field(default_factory=dict)

    def cheap(self, coeffs: dict[str, float], proxy: bool = True) -> TrialResult:
        """Utility NLL and (with ``proxy``) the refusal-margin proxy of a candidate, one forward run each (cached)."""
        key = coeff_key(coeffs)
        res = self.cache.get(key)
        if res is not None and (not proxy or res.proxy_unsafe is not None):
            return res
        t0 = time.perf_counter()
        self.space.apply(coeffs)
        if res is None:
            res = TrialResult(dict(coeffs), float(self.nll_fn()), None, None)
            self.costs.forward_runs += 1
        if proxy and self.fallback_fn is not None and not self.proxy_trusted():
            res.proxy_unsafe, res.margin = float(self.fallback_fn()), None
            self.costs.subsample_runs += 1
        elif proxy:
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

    def seed(self, coeffs: dict[str, float], nll: float, judged: Judgement, number: int) -> None:
        """Put an already measured point (a reference model the space reproduces exactly, e.g. all zeros = the
        base) into the cache, so the search does not measure it again. ``number`` < 0 marks it as a reference."""
        res = TrialResult(dict(coeffs), nll, None, None, judged.unsafe, judged.over_refusal, judged.utility,
                          number=number, cached=True)
        res.feasible = self.utility_ok(res) and self.over_refusal_ok(res)
        self.cache[coeff_key(coeffs)] = res

    def proxy_rank(self) -> tuple[float | None, int]:
        """Spearman correlation of the proxy's unsafe estimate with the judged unsafe rate, over every judged
        candidate that has both (``(None, n)`` below 3 points or when one side is constant)."""
        from mergekit_safe.eval.proxy import spearman

        pts = [(r.proxy_unsafe, float(r.unsafe["rate"])) for r in self.cache.values()
               if r.judged and r.proxy_unsafe is not None and r.margin is not None]
        return spearman([a for a, _ in pts], [b for _, b in pts]), len(pts)

    def proxy_trusted(self) -> bool:
        """Whether the margin proxy may stand in for generation (see ``min_rank``); trusted until 4 points say
        otherwise."""
        rank, n = self.proxy_rank()
        return n < 4 or (rank is not None and rank >= self.min_rank)

    @property
    def generated_utility(self) -> bool:
        """Whether the utility bound is checked on generated answers (a task metric) rather than the NLL."""
        return self.utility_min is not None

    def utility_ok(self, res: TrialResult) -> bool:
        """Whether the candidate meets the utility bound: the generated metric once judged, else the NLL gate."""
        if self.utility_min is not None and res.utility is not None:
            return res.utility >= self.utility_min - 1e-12
        return res.nll <= self.nll_max + 1e-12

    def judge(self, res: TrialResult) -> TrialResult:
        """Generation + judge for a candidate (no-op when already judged)."""
        if res.judged:
            return res
        t0 = time.perf_counter()
        if self.space.current is None or coeff_key(self.space.current) != coeff_key(res.coeffs):
            self.space.apply(res.coeffs)
        judged = self.judge_fn(self.max_over_refusal is not None)
        res.unsafe, res.over_refusal, res.utility = judged.unsafe, judged.over_refusal, judged.utility
        self.costs.generation_runs += 1
        res.feasible = self.utility_ok(res) and self.over_refusal_ok(res)
        if res.utility is not None and self.utility_min is not None and res.utility >= self.utility_min:
            self.nll_max = max(self.nll_max, res.nll)  # the generated metric accepted it: widen the gate
        res.seconds += time.perf_counter() - t0
        return res

    def over_refusal_ok(self, res: TrialResult) -> bool:
        """Whether the candidate meets the over-refusal bound (unjudged or unbounded: yes)."""
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


@contextlib.contextmanager
def quiet_optuna() -> Iterator[Any]:
    """Yields ``optuna`` with its logging at WARNING, restoring the caller's verbosity on the way out."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield optuna
    finally:
        optuna.logging.set_verbosity(before)


def _sqlite_file(storage: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (None for other URLs and in-memory sqlite)."""
    prefix = "sqlite:///"
    if not storage.startswith(prefix) or storage[len(prefix):] in ("", ":memory:"):
        return None
    return Path(storage[len(prefix):].split("?", 1)[0])


@contextlib.contextmanager
def _creation_lock(storage: str | None) -> Iterator[None]:
    """Serialises study creation among workers on one machine (a lock file beside a sqlite database).

    optuna creates its tables and the study row without a transaction that spans both, so two workers starting
    together on a new file can fail with "table studies already exists" or a UNIQUE constraint.
    """
    db = _sqlite_file(storage) if storage else None
    if db is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(db) + ".lock"):
        yield


def open_study(storage: str | None, study_name: str, *, pareto: bool, seed: int) -> Any:
    """Create or load (resume) the study; TPE with constraints, or NSGA-II for the Pareto front.

    Args:
        storage: optuna storage URL, or None for an in-memory study.
        study_name: the study's name in the storage.
        pareto: two objectives (NSGA-II) instead of one (TPE).
        seed: sampler seed.

    Returns:
        The ``optuna.Study``.

    Raises:
        SearchError: the storage URL cannot be opened, or the study exists with other directions.
    """
    with quiet_optuna() as optuna:
        # constraints come with each trial (trial.set_constraint), which both samplers read
        if pareto:
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
            directions = ["minimize", "minimize"]
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True)
            directions = ["minimize"]
        try:
            with _creation_lock(storage):
                return optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                           sampler=sampler, load_if_exists=True)
        except ValueError as e:  # e.g. same name, other directions
            raise SearchError(f"--storage {storage}: cannot use study {study_name!r} ({e}); "
                              "pick another --study-name") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy errors: bad URL, unwritable file
            raise SearchError(f"--storage {storage}: cannot open the study database "
                              f"({str(e).splitlines()[0]})") from None


def check_storage(storage: str | None) -> None:
    """Cheap check of a ``--storage`` URL before any model loads.

    Raises:
        SearchError: the URL has no recognised scheme, or a sqlite file's folder does not exist.
    """
    if storage is None:
        return
    scheme = storage.split("://", 1)[0] if "://" in storage else ""
    if not scheme or scheme.split("+", 1)[0] not in ("sqlite", "postgresql", "mysql", "oracle", "mssql"):
        raise SearchError(f"--storage {storage}: not a database URL; use e.g. sqlite:///repair.db")
    db = _sqlite_file(storage)
    if db is not None and not db.resolve().parent.is_dir():
        raise SearchError(f"--storage {storage}: folder {db.resolve().parent} does not exist")


@dataclass
class Trials:
    """The study's trial bookkeeping: ask, measure (cache first), tell, and count the trial budget.

    Attributes:
        evaluator: measures candidates.
        study: the optuna study.
        budget: trials and seconds.
        low, high: coefficient range of the study's parameters.
        pareto: tell two objectives (unsafe rate, NLL) instead of one.
        results: every trial so far (reused ones and reference points included).
        left: trials left in the budget.
        on_trial: called after each new trial (progress display).
        claim: asked before each new trial when several workers share the budget (see
            :mod:`mergekit_safe.repair.workers`): True takes one trial of the shared budget, False means it is spent.
    """

    evaluator: Evaluator
    study: Any
    budget: Budget
    low: float = 0.0
    high: float = 1.0
    pareto: bool = False
    results: list[TrialResult] = field(default_factory=list)
    left: int = 0
    on_trial: Callable[[Trials, TrialResult], None] | None = None
    claim: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        self.left = self.budget.trials

    @property
    def groups(self) -> list[str]:
        """The coefficient groups, in order."""
        return self.evaluator.space.groups

    def reuse_completed(self) -> None:
        """Put the completed trials of a (resumed or shared) study into the results and the evaluator's cache."""
        with quiet_optuna() as optuna:
            done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        ev = self.evaluator
        for t in done:
            if "coeffs" not in t.user_attrs:
                continue
            r = TrialResult.from_attrs(t.user_attrs, t.number)
            r.feasible = ev.utility_ok(r) and ev.over_refusal_ok(r)
            ev.cache[coeff_key(r.coeffs)] = r
            self.results.append(r)
            ev.costs.reused_trials += 1

    def run(self, coeffs: dict[str, float] | None, judge: bool | Callable[[TrialResult], bool],
            proxy: bool = True) -> TrialResult | None:
        """One trial: ask, measure (cache first), tell. None when out of budget (trials or seconds).

        A cached point that now needs a generation run becomes a new trial at the same coefficients (its cheap
        signals come from the cache).

        Args:
            coeffs: the candidate (None: the sampler picks).
            judge: generate and judge it (or a predicate on its cheap result).
            proxy: measure the refusal-margin proxy too.
        """
        wants = (lambda r: judge(r) if callable(judge) else judge)
        if coeffs is not None and coeff_key(coeffs) in self.evaluator.cache:
            hit = self.evaluator.cache[coeff_key(coeffs)]
            if hit.judged or not wants(hit):
                if not any(r is hit for r in self.results):  # a seeded reference point joins the results
                    self.results.append(hit)
                return hit
        budget = self.budget
        if self.left <= 0 or not budget.fits(budget.cheap_seconds) or (self.claim is not None and not self.claim()):
            return None
        trial, coeffs = self._ask(coeffs)
        t0 = time.perf_counter()
        res = self.evaluator.cheap(coeffs, proxy=proxy)
        budget.cheap_seconds = max(budget.cheap_seconds, time.perf_counter() - t0)
        if any(r is res for r in self.results):
            res = replace(res, cached=True, seconds=0.0)
        if wants(res) and budget.fits(budget.reserve):  # a generation run costs about one reference run
            self.evaluator.judge(res)
        self._tell(trial, res)
        self.evaluator.cache[coeff_key(coeffs)] = res
        self.results.append(res)
        self.left -= 1
        self.evaluator.costs.trials += 1
        if self.on_trial is not None:
            self.on_trial(self, res)
        return res

    def _ask(self, fixed: dict[str, float] | None) -> tuple[Any, dict[str, float]]:
        if fixed is not None:
            self.study.enqueue_trial({f"a[{g}]": float(fixed[g]) for g in self.groups}, skip_if_exists=False)
        with quiet_optuna():
            trial = self.study.ask()
            return trial, {g: float(trial.suggest_float(f"a[{g}]", self.low, self.high)) for g in self.groups}

    def _tell(self, trial: Any, res: TrialResult) -> None:
        ev = self.evaluator
        res.number = trial.number
        attrs = res.to_dict()
        for k in ("coeffs", "nll", "proxy_unsafe", "margin", "unsafe", "over_refusal", "utility", "feasible"):
            trial.set_user_attr(k, attrs[k])
        over = 0.0
        if ev.max_over_refusal is not None and res.over_refusal is not None:
            over = float(res.over_refusal["rate"]) - ev.max_over_refusal
        if ev.utility_min is not None and res.utility is not None:
            trial.set_constraint("utility", ev.utility_min - res.utility)
        else:
            trial.set_constraint("utility", res.nll - ev.nll_max)
        trial.set_constraint("over_refusal", over)
        with quiet_optuna():
            self.study.tell(trial, [res.unsafe_rate, res.nll] if self.pareto else res.unsafe_rate)


__all__ = ["Budget", "Costs", "Evaluator", "Judgement", "TrialResult", "Trials", "best_of", "check_storage", "coeff_key",
           "open_study", "pareto_front", "quiet_optuna", "study_name_for"]
