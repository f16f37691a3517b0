"""Several evaluator processes on one machine sharing one optuna study (``repair --workers N``).

The parent measures the references as usual, then starts N processes (``multiprocessing``'s ``spawn`` context:
a forked child would inherit torch's thread pools in an undefined state). Each worker loads the model once on
its own device (``cuda:i`` with ``--device cuda`` and N GPUs, else the CPU with torch's threads split among the
workers), rebuilds the parent's evaluator state (bounds, proxy calibration, groups, reference points) and runs
trials of the same study until the shared budget is spent: a counter in shared memory hands out the trials, so a
trial counts once whichever worker ran it and the study ends with exactly ``--trials`` new trials; the wall-clock
budget is shared too. Worker 0 runs the warm start (forward selection, or the ``auto:K`` revert path); the others
sample from the start with their own sampler seed (the same seed would propose the same points). The parent keeps
the budget's last trial: it reads every worker's trials back from the study, runs the confirmation trial exactly
as one process would, and chooses.

The study lives in a sqlite file inside the output's staging folder (removed before the output is published), or
in ``--storage``. Across machines: a PostgreSQL URL as ``--storage`` and the same command on every machine (each
machine's ``--trials`` then counts its own trials).

A worker that raises or dies stops the others at their next trial; the repair fails with one line naming the
worker, and no output is published.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.errors import MergeKitSafeError, SearchError
from mergekit_safe.repair.objective import (
    Budget,
    Costs,
    Evaluator,
    TrialResult,
    Trials,
    coeff_key,
    open_study,
)

#: The study database's file name inside the staging folder (removed before publishing).
STUDY_DB = "repair_study.db"


def worker_devices(device: str, workers: int) -> list[str]:
    """The device of each worker: ``cuda:i`` for ``cuda`` / ``auto`` on a machine with that many GPUs, the one
    named GPU for ``cuda:N`` (they share it), else the CPU.

    Raises:
        SearchError: ``cuda`` with fewer GPUs than workers.
    """
    from mergekit_safe.kernels import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return ["cpu"] * workers
    if dev.index is not None:
        return [str(dev)] * workers
    count = torch.cuda.device_count()
    if count < workers:
        raise SearchError(f"--workers {workers} with --device {device}: one worker per GPU needs {workers} GPUs, "
                          f"this machine has {count}; lower --workers or name one GPU (--device cuda:0)")
    return [f"cuda:{i}" for i in range(workers)]


def single_group(groups: Any) -> bool:
    """Whether a ``GroupSpec`` gives one coefficient (searched by sequential bisection, not by sampling)."""
    if groups.auto:
        return groups.auto == 1
    return not groups.modules and groups.layers <= 1


@dataclass
class WorkerPlan:
    """Everything one worker needs to rebuild the parent's evaluator (picklable; sent to the spawned process).

    Attributes:
        index: the worker's number (0 runs the warm start).
        device: where its model runs.
        threads: torch threads it may use.
        cfg: the repair settings.
        inputs: the validated prompts and groups.
        refs: the measured references (bounds, reference points, calibration).
        meter_state: the parent's ``Meter`` fields a trial reads (metric rows, openings, logistic fit).
        group_of: tensor -> coefficient group (after ``auto:K`` regrouping).
        storage, study_name: the shared study.
        warm: the warm-start path (worker 0), or None for the forward selection.
        seconds: wall-clock seconds left in ``--time-budget`` when the worker was planned (None: no limit).
        planned_at: ``time.time()`` when planned.
    """

    index: int
    device: str
    threads: int
    cfg: Any
    inputs: Any
    refs: Any
    meter_state: dict[str, Any]
    group_of: dict[str, str]
    storage: str
    study_name: str
    warm: list[dict[str, float]] | None = None
    seconds: float | None = None
    planned_at: float = field(default_factory=time.time)


@dataclass
class WorkerOutcome:
    """What a worker ran: its new trials, its costs, its widened NLL gate, its wall time."""

    index: int
    results: list[TrialResult]
    costs: Costs
    nll_max: float
    seconds: float


# set in each worker process by _init (a multiprocessing primitive can only reach a child at its start)
_SHARED: dict[str, Any] = {}


def _init(counter: Any, stop: Any, cap: int) -> None:
    _SHARED.update(counter=counter, stop=stop, cap=cap)


def _claim() -> bool:
    """Take one trial of the shared budget (False: spent, or another worker failed)."""
    counter, stop = _SHARED["counter"], _SHARED["stop"]
    if stop.is_set():
        return False
    with counter.get_lock():
        if counter.value >= _SHARED["cap"]:
            return False
        counter.value += 1
        return True


def _rebuild(plan: WorkerPlan) -> tuple[Any, Evaluator]:
    """Load the model on the worker's device and rebuild the parent's evaluator on it."""
    from mergekit_safe.repair.command import Meter, build_evaluator, load_inputs
    from mergekit_safe.repair.sensitivity import regroup

    cfg, inputs = plan.cfg, plan.inputs
    loaded = load_inputs(cfg, inputs.groups, plan.device)
    if inputs.groups.auto:
        regroup(loaded.space, {unit: plan.group_of[n] for n, unit in loaded.space.group_of.items()})
    meter = Meter(loaded.model, loaded.tokenizer, cfg, inputs.harmful, inputs.benign, False)
    for k, v in plan.meter_state.items():
        setattr(meter, k, v)
    return loaded, build_evaluator(cfg, loaded, meter, plan.refs)


def worker_main(plan: WorkerPlan) -> WorkerOutcome:
    """One worker process: load, rebuild the evaluator, run trials of the shared study until the budget is spent.

    Runs in a spawned process (its entry point, so it sets the process's torch threads).
    """
    from mergekit_safe.repair.strategies import can_win_rule, explore

    t0 = time.time()
    torch.set_num_threads(plan.threads)
    cfg = plan.cfg
    loaded, evaluator = _rebuild(plan)
    try:
        left = None if plan.seconds is None else plan.seconds - (time.time() - plan.planned_at)
        if left is not None and left <= plan.refs.seconds_per_run:
            return WorkerOutcome(plan.index, [], evaluator.costs, evaluator.nll_max, time.time() - t0)
        budget = Budget(cfg.trials, left, reserve=plan.refs.seconds_per_run)
        study = open_study(plan.storage, plan.study_name, pareto=cfg.pareto, seed=cfg.seed + 1 + plan.index)
        trials = Trials(evaluator, study, budget, 0.0, cfg.high, cfg.pareto, claim=_claim)
        trials.reuse_completed()
        known = {r.number for r in trials.results}
        explore(trials, can_win_rule(trials, cfg.slack), plan.warm, warm_start=plan.index == 0)
        new = list({r.number: r for r in trials.results if r.number >= 0 and r.number not in known}.values())
        return WorkerOutcome(plan.index, new, evaluator.costs, evaluator.nll_max, time.time() - t0)
    finally:
        loaded.close()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_workers(plans: list[WorkerPlan], cap: int, entry: Any = None) -> list[WorkerOutcome]:
    """Start one spawned process per plan, wait for all, and return their outcomes (by worker index).

    Args:
        plans: one per worker.
        cap: new trials the workers may run together.
        entry: the worker function (default :func:`worker_main`; a test passes a failing one).

    Raises:
        SearchError: a worker raised or died (one line naming it); the others were told to stop.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
    counter, stop = ctx.Value("i", 0), ctx.Event()
    fn = entry or worker_main
    outcomes: list[WorkerOutcome] = []
    failure: str | None = None
    with ProcessPoolExecutor(len(plans), mp_context=ctx, initializer=_init, initargs=(counter, stop, cap)) as pool:
        futures = {pool.submit(fn, p): p.index for p in plans}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                outcomes.append(fut.result())
                continue
            except BrokenProcessPool:  # the pool cannot tell which process died
                msg = "a worker process died (killed, out of memory or crashed)"
            except Exception as e:  # noqa: BLE001 - any failure in a worker fails the repair with one line
                msg = f"worker {i}: " + (str(e) if isinstance(e, MergeKitSafeError) else _one_line(e))
            failure = failure or msg
            stop.set()  # the others stop at their next trial
    if failure is not None:
        raise SearchError(f"--workers {len(plans)}: {failure}; no output was written")
    return sorted(outcomes, key=lambda o: o.index)


def merge_outcomes(trials: Trials, outcomes: list[WorkerOutcome]) -> None:
    """Put the workers' trials into the parent's results in place of their copies read back from the study (which
    carry no timing and count as reused), and add the workers' costs to the parent evaluator's."""
    ev = trials.evaluator
    ev.nll_max = max([ev.nll_max] + [o.nll_max for o in outcomes])
    mine = {r.number: r for o in outcomes for r in o.results}
    swapped = [mine[r.number] for r in trials.results if r.number in mine]
    trials.results = [mine.get(r.number, r) if r.number >= 0 else r for r in trials.results]
    for r in swapped:
        r.feasible = ev.utility_ok(r) and ev.over_refusal_ok(r)
        ev.cache[coeff_key(r.coeffs)] = r
    c = ev.costs
    c.reused_trials -= len(swapped)  # this run's trials, read back from the study: not reused ones
    for o in outcomes:
        for k in ("trials", "forward_runs", "generation_runs", "subsample_runs"):
            setattr(c, k, getattr(c, k) + getattr(o.costs, k))


def search_with_workers(cfg: Any, folder: Path, inputs: Any, meter: Any, space: Any, refs: Any, evaluator: Evaluator,
                        budget: Budget, study_name: str, warm: list[dict[str, float]] | None) -> Any:
    """Phase 4 with ``cfg.workers`` processes: the workers run all but the last trial of the budget in one shared
    study; the parent reads them back, runs the confirmation trial and chooses (a ``SearchResult``).

    Args:
        cfg: the repair settings (``workers`` > 1).
        folder: the output's staging folder (the study's sqlite file goes there without ``cfg.storage``).
        inputs, meter, space, refs: the parent's validated inputs, meter, candidate space and references.
        evaluator: the parent's evaluator (reference points seeded).
        budget: the repair's budget (its clock started with the repair).
        study_name: the study's name.
        warm: the warm-start path (``auto:K``), or None for the forward selection.

    Raises:
        SearchError: a worker failed, or the storage cannot be opened.
    """
    from mergekit_safe.repair.strategies import can_win_rule, confirm, finish

    t0 = time.perf_counter()
    storage = cfg.storage or f"sqlite:///{folder / STUDY_DB}"
    study = open_study(storage, study_name, pareto=cfg.pareto, seed=cfg.seed)  # created before the workers start
    seconds = None if cfg.time_budget is None else cfg.time_budget - budget.elapsed()
    plans = plans_for(cfg, inputs, refs, meter, space, storage, study_name, warm, seconds)
    outcomes = run_workers(plans, cap=cfg.trials - 1)
    trials = Trials(evaluator, study, budget, 0.0, cfg.high, cfg.pareto)
    trials.left = 1  # the workers ran the rest of --trials
    trials.reuse_completed()
    trials.results.extend(r for r in evaluator.cache.values() if r.number < 0 and r.judged)
    merge_outcomes(trials, outcomes)
    confirm(trials, can_win_rule(trials, cfg.slack))
    return finish(trials, "nsga2" if cfg.pareto else "tpe", study_name, time.perf_counter() - t0)


def plans_for(cfg: Any, inputs: Any, refs: Any, meter: Any, space: Any, storage: str, study_name: str,
              warm: list[dict[str, float]] | None, seconds: float | None) -> list[WorkerPlan]:
    """One :class:`WorkerPlan` per worker (devices, thread split, the state to rebuild)."""
    devices = worker_devices(cfg.device, cfg.workers)
    threads = max(1, torch.get_num_threads() // cfg.workers)
    state = {k: getattr(meter, k) for k in ("metric_rows", "refusals", "compliances", "scale", "shift")}
    return [WorkerPlan(i, devices[i], threads, cfg, inputs, refs, state, dict(space.group_of), storage, study_name,
                       warm if i == 0 else None, seconds) for i in range(cfg.workers)]


def remove_study_files(folder: Path) -> None:
    """Remove the study database (and its lock and journal) from the staging folder before it is published."""
    for suffix in ("", ".lock", "-journal", "-wal", "-shm"):
        (folder / (STUDY_DB + suffix)).unlink(missing_ok=True)


__all__ = ["STUDY_DB", "WorkerOutcome", "WorkerPlan", "merge_outcomes", "plans_for", "remove_study_files",
           "run_workers", "search_with_workers", "single_group", "worker_devices", "worker_main"]
