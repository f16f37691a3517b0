"""``repair --workers N`` (issue 12, section 4): several spawned evaluator processes sharing one optuna study.

References: the optuna study read back from the database (trial numbers, their count), best_of over those trials,
and the utility NLL re-measured in this process at the workers' coefficients.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mergekit_safe.cli import main
from tests.test_repair import _base_args, organism  # noqa: F401 - the session's model organism fixture

# under pytest -n (--dist loadgroup) one worker runs every test of the model organism: it is built once
pytestmark = pytest.mark.xdist_group("organism")

TRIALS = 7
FAST = ["--groups", "modules", "--max-new-tokens", "8", "--harmful-limit", "16", "--benign-limit", "16",
        "--utility-limit", "8", "--device", "cpu"]


def _args(org: Any, out: Path, *extra: str) -> list[str]:
    return [*_base_args(org, out), *FAST, *extra]


@pytest.fixture(scope="module")
def two_workers(organism: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("workers")
    db = f"sqlite:///{tmp / 'study.db'}"
    r = CliRunner().invoke(main, _args(organism, tmp / "out", "--trials", str(TRIALS), "--workers", "2",
                                       "--storage", db, "--study-name", "w"))
    assert r.exit_code == 0, r.output
    return tmp, db


def test_two_workers_run_exactly_the_trial_budget(two_workers: tuple[Path, str]) -> None:
    import optuna

    tmp, db = two_workers
    report = json.loads((tmp / "out" / "repair_report.json").read_text())
    searched = [t["number"] for t in report["trials"] if t["number"] >= 0]
    stored = [t.number for t in optuna.load_study(study_name="w", storage=db).trials]
    assert sorted(stored) == list(range(TRIALS))  # exactly --trials, none lost, none twice
    assert sorted(searched) == sorted(stored) and len(set(searched)) == TRIALS
    assert report["cost"]["trials"] == TRIALS and report["cost"]["reused_trials"] == 0
    assert report["cost"]["workers"] == 2
    # the workers' runs are summed: every new trial cost at least one forward run
    assert report["cost"]["search_forward_runs"] >= TRIALS - sum(t["cached"] for t in report["trials"])
    assert not [p for p in (tmp / "out").iterdir() if "study" in p.name]
    assert all("judges" not in row for row in report["metrics"].values())  # one judge: the rows as before


def test_choice_and_measurements_match_one_process(organism: Any, two_workers: tuple[Path, str]) -> None:  # noqa: F811
    """What is compared: the workers' recorded utility NLL at their coefficients against the same NLL measured here
    by one process, and the parent's choice against best_of over the study's trials. (A 1-worker run samples other
    points, so the runs' choices are not comparable directly; the same points are.)"""
    from mergekit_safe.repair.command import Meter, RepairConfig, load_inputs, validate
    from mergekit_safe.repair.objective import TrialResult, best_of

    tmp, _ = two_workers
    report = json.loads((tmp / "out" / "repair_report.json").read_text())
    cfg = RepairConfig(organism.aligned, organism.finetuned, tmp / "unused", harmful=str(organism.harmful),
                       benign=str(organism.benign), utility=organism.skill, groups="modules", device="cpu",
                       harmful_limit=16, benign_limit=16)
    inputs = validate(cfg)
    loaded = load_inputs(cfg, inputs.groups, "cpu")
    try:
        meter = Meter(loaded.model, loaded.tokenizer, cfg, inputs.harmful, inputs.benign)
        for t in [t for t in report["trials"] if t["number"] >= 0][:3]:
            loaded.space.apply(t["coeffs"])
            # float32 forward passes; the workers ran with another thread count (another summation order)
            assert meter.nll(inputs.utility) == pytest.approx(t["nll"], rel=1e-5, abs=1e-6), t["number"]
    finally:
        loaded.close()
    results = [TrialResult.from_attrs(t, t["number"]) for t in report["trials"]]
    for r, t in zip(results, report["trials"]):
        r.feasible = t["feasible"]
    best = best_of(results)
    assert best is not None and best.number == report["chosen"]["trial"]


def _open(db: str, barrier: Any, out: Any) -> None:
    from mergekit_safe.repair.objective import open_study

    barrier.wait()  # all start together: the race a fresh database used to lose
    out.put(open_study(db, "fresh", pareto=False, seed=0).study_name)


def test_concurrent_start_on_a_fresh_sqlite_storage(tmp_path: Path) -> None:
    import optuna

    db = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(db, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == ["fresh"] * 3
    assert [s.study_name for s in optuna.get_all_study_summaries(db)] == ["fresh"]


def _raising_worker(plan: Any) -> Any:
    if plan.index == 0:
        raise RuntimeError(f"simulated failure in worker {plan.index}\nsecond line")
    from mergekit_safe.repair.workers import worker_main

    return worker_main(plan)


def _dying_worker(plan: Any) -> Any:
    if plan.index == 1:
        os._exit(3)
    from mergekit_safe.repair.workers import worker_main

    return worker_main(plan)


@pytest.mark.parametrize("worker", [_raising_worker, _dying_worker], ids=["raises", "dies"])
def test_a_failing_worker_fails_the_repair_with_one_line(organism: Any, tmp_path: Path,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch, worker: Any) -> None:
    from mergekit_safe.repair import workers

    monkeypatch.setattr(workers, "worker_main", worker)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, _args(organism, out, "--trials", "4", "--workers", "2"))
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    want = ("worker 0: RuntimeError: simulated failure in worker 0" if worker is _raising_worker
            else "a worker process died (killed, out of memory or crashed)")
    assert len(lines) == 1 and want in lines[0] and lines[0].endswith("no output was written"), r.output
    assert "Traceback" not in r.output and "second line" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--workers", "2", "--groups", "global"], "--workers 2 needs several coefficient groups"),
])
def test_bad_workers_flags_before_any_model_loads(organism: Any, tmp_path: Path, extra: list[str],  # noqa: F811
                                                   message: str) -> None:
    r = CliRunner().invoke(main, [*_args(organism, tmp_path / "out"), *extra])
    assert r.exit_code == 1 and message in r.output, r.output


def test_worker_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from mergekit_safe.errors import SearchError
    from mergekit_safe.repair.workers import worker_devices

    assert worker_devices("cpu", 3) == ["cpu"] * 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]  # one per GPU
    assert worker_devices("cuda:1", 3) == ["cuda:1"] * 3  # one named GPU: they share it
    with pytest.raises(SearchError, match="--workers 3 with --device cuda: one worker per GPU needs 3 GPUs, this "
                                          "machine has 2"):
        worker_devices("cuda", 3)
