"""The search methods (one registry) and the search strategies over their coefficients.

A *method* says how a coefficient moves the model: every one is ``base + a * tau`` with a method-specific base
and tau (:data:`METHODS`, the one registry; the CLI's ``--method`` choices and the recipe that writes the result
come from it). The thresholded methods (``safe_lora``, ``safemerge``) are the same form with a per-tensor ``a``
of 0 or 1 decided by the group's threshold (:class:`~mergekit_safe.repair.space.Switch`). A *strategy* says how coefficients are chosen:

* ``bracket`` (one group): utility and unsafe rate both move monotonically with the coefficient, so bisection on
  the cheap utility bound brackets the safest feasible coefficient, one generation run confirms it, and a short
  bisection on the judged unsafe rate climbs towards the fine-tune while staying as safe. The endpoints are the
  base and the fine-tune, already measured as references, so the search costs ``log2(1 / tolerance)`` forward
  runs and a few generation runs. All three bisections are :func:`bisect`.
* ``tpe`` (several groups): the warm path the caller measured (``repair`` passes the sensitivity-ordered revert
  path, :mod:`~mergekit_safe.repair.sensitivity`), then a forward selection of groups (:func:`_warm_start`), then
  optuna's TPE with the utility and over-refusal bounds as constraints; generation only for candidates that can
  win.
* ``nsga2`` (``pareto``): the same with NSGA-II on (unsafe rate, NLL).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mergekit_safe.errors import SearchError
from mergekit_safe.repair.objective import (
    Budget,
    Costs,
    Evaluator,
    TrialResult,
    Trials,
    best_of,
    open_study,
    pareto_front,
)


@dataclass(frozen=True)
class SearchMethod:
    """One entry of the method registry.

    Attributes:
        name: the ``--method`` value.
        recipe_method: the merge method that writes the chosen candidate.
        coefficient: the recipe parameter that carries the coefficient.
        increasing: utility (and the unsafe rate) grow with the coefficient; False when the coefficient adds
            safety (the safety vector).
        sparsified: the task vector is processed with ``density`` and ``seed`` (DARE / TIES).
        needs_unaligned: the method needs a third model, the unaligned one (``V = aligned - unaligned``).
        starts_from: the checkpoint all-zero coefficients start from: ``base`` (the aligned model) or
            ``finetuned``.
        help: one line for the CLI.
    """

    name: str
    recipe_method: str
    coefficient: str
    increasing: bool = True
    sparsified: bool = False
    needs_unaligned: bool = False
    starts_from: str = "base"
    help: str = ""

    def __post_init__(self) -> None:
        if not self.name or not self.coefficient:
            raise ValueError(f"search method {self!r}: needs a name and a coefficient parameter")
        if self.starts_from not in ("base", "finetuned"):
            raise ValueError(f"search method {self.name!r}: starts_from must be 'base' or 'finetuned'")


#: The one registry of search methods, by name.
METHODS: dict[str, SearchMethod] = {m.name: m for m in (
    SearchMethod("lerp", "lerp", "alpha", help="base + a * (finetuned - base)"),
    SearchMethod("dare_linear", "dare_linear", "lambda", sparsified=True,
                 help="base + a * DARE(finetuned - base) at --density"),
    SearchMethod("ties", "ties", "lambda", sparsified=True, help="base + a * TIES-trim(finetuned - base)"),
    SearchMethod("safety_vector", "safety_vector", "scale", increasing=False, needs_unaligned=True,
                 starts_from="finetuned", help="finetuned + a * (base - unaligned)"),
    # the threshold a adds safety: a larger one projects (merges) more weight matrices, so increasing=False
    SearchMethod("safe_lora", "safe_lora", "threshold", increasing=False, needs_unaligned=True,
                 starts_from="finetuned",
                 help="Safe LoRA: weight matrices with cos(P D, D) <= a become base + P D (V = base - unaligned)"),
    SearchMethod("safemerge", "safemerge", "threshold", increasing=False, needs_unaligned=True,
                 starts_from="finetuned",
                 help="SafeMERGE: weight matrices with cos(P D, D) < a become base + 0.8 D (the base is the safety "
                      "model)"),
)}


def search_method(name: str) -> SearchMethod:
    """The registry entry for ``name``.

    Raises:
        SearchError: an unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise SearchError(f"--method {name!r}: the repair search supports {', '.join(METHODS)}")
    return METHODS[name]


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
    on_trial: Callable[[Trials, TrialResult], None] | None = None,
    warm: Sequence[dict[str, float]] | None = None,
) -> SearchResult:
    """Search the coefficients: bracketing for one group, TPE for several, NSGA-II for ``pareto``.

    Args:
        evaluator: measures candidates (see :class:`~mergekit_safe.repair.objective.Evaluator`).
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
        on_trial: called after every new trial (progress display).
        warm: the first candidates of a several-group search, in order, instead of the forward selection (e.g. the
            sensitivity path of ``--groups auto:K``).

    Returns:
        A :class:`SearchResult`.

    Raises:
        SearchError: the storage cannot be opened.
    """
    t0 = time.perf_counter()
    trials = Trials(evaluator, open_study(storage, study_name, pareto=pareto, seed=seed), budget, low, high, pareto,
                    on_trial=on_trial)
    trials.reuse_completed()
    # the measured reference points (base, fine-tune) are candidates too: the last resort when nothing searched
    # meets the bounds (best_of prefers any searched candidate that does)
    trials.results.extend(r for r in evaluator.cache.values() if r.number < 0 and r.judged)
    if len(trials.groups) == 1 and not pareto:
        strategy = "bracket"
        _one_coefficient(trials, low, high, increasing, tolerance)
    else:
        strategy = "nsga2" if pareto else "tpe"
        _sampled(trials, slack, warm)
    return finish(trials, strategy, study_name, time.perf_counter() - t0)


def finish(trials: Trials, strategy: str, study_name: str, seconds: float) -> SearchResult:
    """The :class:`SearchResult` of the trials so far: sorted by trial number, the choice, the Pareto front."""
    results = trials.results
    judged = [r for r in results if r.judged]
    front = [judged[i].number for i in pareto_front([(r.unsafe_rate, r.nll) for r in judged])]
    results.sort(key=lambda r: r.number)
    return SearchResult(results, best_of(results), front, strategy, trials.evaluator.costs, study_name, seconds)


def can_win_rule(trials: Trials, slack: float) -> Callable[[TrialResult], bool]:
    """Whether a candidate is worth a generation run: it meets the utility gate and its proxy unsafe rate is within
    ``slack`` of the best judged one (``pareto``: no judged point is ``slack`` safer and as useful)."""
    ev = trials.evaluator

    def can_win(res: TrialResult) -> bool:
        if not ev.utility_ok(res):
            return False
        judged = [r for r in trials.results if r.judged and r.feasible]
        if trials.pareto:
            return not any(r.unsafe_rate + slack < res.unsafe_rate and r.nll <= res.nll for r in judged)
        best = best_of(judged)
        if best is None:
            return True
        if res.unsafe is None and res.margin is not None and best.margin is not None:
            # the margin proxy is trusted to rank candidates (its Spearman with the judge), not to give the judge's
            # level: on the organism the first judged revert-path candidate had a proxy of 0.95 and a judged rate
            # of 0.12, and against 0.12 every later proxy looked hopeless. Compare proxy with proxy.
            assert best.proxy_unsafe is not None and res.proxy_unsafe is not None
            return res.proxy_unsafe <= best.proxy_unsafe + slack
        return res.unsafe_rate <= best.unsafe_rate + slack
    return can_win


def explore(trials: Trials, can_win: Callable[[TrialResult], bool], warm: Sequence[dict[str, float]] | None,
            warm_start: bool = True) -> None:
    """The ``warm`` path, then (with ``warm_start``) the forward selection, then the sampler until one trial of the
    budget is left (or the study's shared budget says stop).

    Both starts, in that order: on the real-model testbed only the revert path reached candidates that keep the
    skill within the budget (the skill needs every group moved together), while on the organism the forward
    selection is what finds the safe corner (one group alone carries it); the sampler then learns from both.
    """
    for coeffs in warm or ():
        if trials.run(dict(coeffs), can_win) is None:
            return
    if warm_start and not trials.budget.out_of_time():
        _warm_start(trials, can_win)
    while trials.left > 1 and not trials.budget.out_of_time():
        if trials.run(None, can_win) is None:
            break


def confirm(trials: Trials, can_win: Callable[[TrialResult], bool]) -> None:
    """The last trial: confirm the best proxy candidate when nothing judged is feasible yet, else one more sampled
    candidate (so ``--trials`` is exact)."""
    ev = trials.evaluator
    pending = sorted((r for r in trials.results if ev.utility_ok(r) and not r.judged),
                     key=lambda r: (r.unsafe_rate, r.nll))
    if best_of(trials.results) is None and pending:
        trials.run(pending[0].coeffs, True)
    else:
        trials.run(None, can_win)


def _sampled(trials: Trials, slack: float, warm: Sequence[dict[str, float]] | None = None) -> None:
    """Several groups: forward selection (or the ``warm`` path), then the sampler until the budget is spent, then
    confirm the best."""
    can_win = can_win_rule(trials, slack)
    explore(trials, can_win, warm)
    confirm(trials, can_win)


def _warm_start(trials: Trials, can_win: Callable[[TrialResult], bool]) -> None:
    """Structured first trials before the sampler takes over: forward selection from the base.

    Each group moved alone to ``high`` (the others at ``low``, the safe base) measures what it brings (utility)
    and costs (unsafe estimate). Groups are then ranked safest first (estimate below one half), most useful first,
    and moved together, top 2, 3, ..., until the utility bound is met. Forward runs only, except where a candidate
    can win; every one is a trial the sampler learns from. Coefficients already in the study are reused, so a
    resumed study pays nothing here.
    """
    groups, low, high = trials.groups, trials.low, trials.high
    alone: dict[str, TrialResult] = {}
    for g in groups:
        r = trials.run({h: (high if h == g else low) for h in groups}, False)
        if r is None:
            return
        alone[g] = r
    rank = sorted(groups, key=lambda g: (alone[g].unsafe_rate > 0.5, alone[g].nll))
    if alone[rank[0]].feasible:
        trials.run({h: (high if h == rank[0] else low) for h in groups}, can_win)
        return
    for k in range(2, len(groups)):
        r = trials.run({h: (high if h in rank[:k] else low) for h in groups}, can_win)
        if r is None or r.feasible:
            return


def bisect(probe: Callable[[float], bool | None], good: float, bad: float, tolerance: float,
           more: Callable[[], bool] = lambda: True) -> float:
    """Bisection between a coefficient that passes and one that fails: the passing end of a bracket < tolerance.

    Args:
        probe: ``probe(a)`` is True when ``a`` passes, False when it fails, None when out of budget (stop).
        good: a coefficient known to pass.
        bad: a coefficient known to fail.
        tolerance: stop when ``|good - bad|`` is at most this.
        more: whether another probe may run (e.g. trials left).

    Returns:
        The passing end of the final bracket.

    Example:
        >>> bisect(lambda a: a <= 0.3, 0.0, 1.0, 1 / 64)
        0.296875
    """
    while abs(good - bad) > tolerance and more():
        mid = 0.5 * (good + bad)
        ok = probe(mid)
        if ok is None:
            break
        good, bad = (mid, bad) if ok else (good, mid)
    return good


def _one_coefficient(trials: Trials, low: float, high: float, increasing: bool, tolerance: float,
                     climb_tolerance: float = 1.0 / 16) -> None:
    """One coefficient: bisect the utility bound, generate to confirm, then climb or satisfy over-refusal.

    With ``increasing`` utility grows with the coefficient, so the smallest feasible coefficient is the safest
    feasible one; otherwise (safety vector) the largest feasible one is. When that point is strictly safer than
    the fine-tune, a short climb towards the fine-tune (a few generation runs) looks for the most useful
    coefficient that is just as safe: the objective is the unsafe rate first, then utility. An over-refusal bound
    instead pushes the coefficient towards the fine-tune: a bisection on the judged bound. With a task metric on
    generated answers the first bisection generates each candidate that passes the NLL gate (about
    ``log2(1 / tolerance)`` generation runs), since the NLL does not decide utility there. When the safest point
    keeps the utility but breaks the over-refusal bound, a judged bisection from the useful end finds the safest
    coefficient within it.
    """
    group = trials.groups[0]
    ev = trials.evaluator

    def at(a: float, judge: bool | Callable[[TrialResult], bool] = False) -> TrialResult | None:
        return trials.run({group: a}, judge, proxy=False)  # utility only: the bracketing needs no proxy

    def passes(judge: bool, unsafe: float | None = None) -> Callable[[float], bool | None]:
        # a task metric on generated answers decides utility: generate every candidate that passes the NLL gate
        want: bool | Callable[[TrialResult], bool] = judge or (ev.utility_ok if ev.generated_utility else False)

        def probe(a: float) -> bool | None:
            r = at(a, want)
            if r is None:
                return None
            return r.feasible and (unsafe is None or r.unsafe_rate <= unsafe)
        return probe

    safe_end, useful_end = (low, high) if increasing else (high, low)
    more = (lambda: trials.left > 0)
    first = at(safe_end)
    if first is None or first.feasible:  # the safest point already keeps enough utility: judge it
        judged = at(safe_end, True) if first is not None else None
        if judged is not None and not judged.feasible:
            # it keeps the utility but over-refuses: bisect the judged bounds from the (feasible) useful end, so
            # the safest coefficient within the over-refusal bound is found (the safety vector's usual case)
            bisect(passes(True), useful_end, safe_end, tolerance, more)
        return
    last = at(useful_end)
    if last is None or not last.feasible:
        if last is not None:
            at(useful_end, True)  # nothing is feasible; judge the most useful point for the report
        return
    # the bracketing leaves one trial of --trials for the confirmation run, so a bracket cut short is still judged
    good = bisect(passes(False), useful_end, safe_end, tolerance, lambda: trials.left > 1)
    chosen = at(good, True)
    if chosen is None:
        return
    if chosen.feasible and (not last.judged or last.unsafe_rate > chosen.unsafe_rate):
        bisect(passes(True, chosen.unsafe_rate), good, useful_end, climb_tolerance, more)
    elif not chosen.feasible and trials.evaluator.utility_ok(chosen):
        r_end = at(useful_end, True)
        if r_end is not None and r_end.feasible:
            bisect(passes(True), useful_end, good, tolerance, more)


__all__ = ["METHODS", "SearchMethod", "SearchResult", "bisect", "can_win_rule", "confirm", "explore", "finish",
           "run_search", "search_method"]
