"""The coefficient search on synthetic objectives: groups, in-place candidates, bracketing, TPE, NSGA-II, resume,
the method registry, concurrent workers on one sqlite file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_safe.errors import SearchError
from mergekit_safe.eval.report import Rate
from mergekit_safe.repair.groups import GroupSpec, check_groups, coefficient_rules, group_of, parse_groups
from mergekit_safe.repair.objective import Budget, Evaluator, Judgement, check_storage, open_study, pareto_front, quiet_optuna
from mergekit_safe.repair.space import CandidateSpace, build_space
from mergekit_safe.repair.strategies import METHODS, bisect, run_search, search_method
from tests.helpers import assert_close

N_PROMPTS = 40


def toy_space(groups: list[str]) -> CandidateSpace:
    """One scalar "tensor" per group with base 0 and tau 1, so a group's parameter equals its coefficient."""
    names = [f"model.layers.0.{g}.weight" for g in groups]
    bases = {n: torch.zeros(1) for n in names}
    taus = {n: torch.ones(1) for n in names}
    targets = {n: torch.zeros(1) for n in names}
    return CandidateSpace(None, names, list(groups), dict(zip(names, groups)), bases, taus, targets)


def toy_evaluator(space: CandidateSpace, nll_max: float, calls: dict[str, int]) -> Evaluator:
    """Utility grows with every coefficient; the unsafe rate mostly with the first group's (``unsafe``)."""
    def values() -> list[float]:
        return [float(space.targets[n]) for n in space.names]

    def unsafe() -> float:
        v = values()
        return min(1.0, max(0.0, 1.5 * v[0] + (0.1 * v[1] if len(v) > 1 else 0.0) - 0.2))

    def nll() -> float:
        calls["nll"] += 1
        v = values()
        return 3.0 - 2.0 * v[0] - (v[1] if len(v) > 1 else 0.0)

    def margins() -> list[float]:
        u = unsafe()
        return [4.0 * ((i + 0.5) / N_PROMPTS - u) for i in range(N_PROMPTS)]

    def judge(benign: bool) -> Judgement:
        calls["judge"] += 1
        k = round(unsafe() * N_PROMPTS)
        return Judgement(vars(Rate.of([True] * k + [False] * (N_PROMPTS - k))),
                         vars(Rate.of([False] * 10)) if benign else None)

    return Evaluator(space, nll, margins, judge, nll_max)


def test_parse_groups() -> None:
    assert parse_groups(None) == GroupSpec()
    assert parse_groups("global") == GroupSpec()
    assert parse_groups("layers:3") == GroupSpec(3, False)
    assert parse_groups("modules,layers:2") == GroupSpec(2, True)
    assert str(GroupSpec(3, True)) == "layers:3,modules"
    with pytest.raises(SearchError) as e:
        parse_groups("layers:x")
    assert str(e.value) == "--groups 'layers:x': layers:K needs a whole number K >= 1, e.g. layers:3"
    with pytest.raises(SearchError) as e:
        parse_groups("heads")
    assert str(e.value) == ("--groups 'heads': unknown part 'heads'; use global, layers:K, modules, "
                            "layers:K,modules or auto:K")
    with pytest.raises(SearchError) as e:
        check_groups(GroupSpec(5), 2)
    assert str(e.value) == "--groups layers:5: the model has 2 layers; use at most layers:2"


def test_group_of_bands_and_modules() -> None:
    spec = GroupSpec(3, False)
    bands = [group_of(f"model.layers.{i}.mlp.up_proj.weight", spec, 6) for i in range(6)]
    assert bands == ["layers0-1", "layers0-1", "layers2-3", "layers2-3", "layers4-5", "layers4-5"]
    assert group_of("model.embed_tokens.weight", spec, 6) == "layers0-1"
    assert group_of("lm_head.weight", spec, 6) == "layers4-5"
    assert group_of("model.norm.weight", spec, 6) == "layers4-5"
    cross = GroupSpec(2, True)
    assert group_of("model.layers.3.self_attn.q_proj.weight", cross, 4) == "layers2-3/attention"
    assert group_of("model.layers.0.input_layernorm.weight", cross, 4) == "layers0-1/norm"
    assert group_of("model.layers.0.mlp.up_proj.weight", GroupSpec(), 4) == "all"


def test_pareto_front() -> None:
    pts = [(0.0, 3.0), (0.5, 1.0), (0.6, 2.0), (1.0, 0.5), (0.5, 1.0)]
    assert pareto_front(pts) == [0, 1, 4, 3]
    assert pareto_front([]) == []


def test_budget_too_small() -> None:
    with pytest.raises(SearchError) as e:
        Budget(0)
    assert str(e.value) == "--trials 0: the budget must allow at least one candidate"
    with pytest.raises(SearchError) as e:
        Budget(5, 0.0)
    assert str(e.value) == "--time-budget 0: the budget must allow at least one candidate"


def test_apply_matches_reference_on_a_model(tiny_pair: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from mergekit_safe.io.reader import open_checkpoint

    aligned, finetuned = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(aligned).eval()
    with open_checkpoint(aligned) as a, open_checkpoint(finetuned) as f:
        space = build_space(model, a, f, None, groups=GroupSpec(2, True), num_layers=2)
        coeffs = {g: 0.1 * (i + 1) for i, g in enumerate(space.groups)}
        space.apply(coeffs)
        params = dict(model.named_parameters())
        for n in space.names:
            want = a.get(n).float() + coeffs[space.group_of[n]] * (f.get(n).float() - a.get(n).float())
            # fp32: base + a * tau, rounded once per operation the same way in both
            assert_close(params[n].detach(), want, 1e-6, 1e-6, n)
        assert len(space.groups) == len(set(space.group_of.values()))
        with pytest.raises(SearchError, match="no coefficient for group"):
            space.apply({})


def test_bracketing_finds_the_smallest_feasible_coefficient() -> None:
    calls = {"nll": 0, "judge": 0}
    space = toy_space(["mlp"])
    ev = toy_evaluator(space, nll_max=1.8, calls=calls)  # nll = 3 - 2a <= 1.8  <=>  a >= 0.6
    res = run_search(ev, budget=Budget(30), tolerance=1 / 128)
    assert res.strategy == "bracket"
    assert res.best is not None and 0.6 <= res.best.coeffs["mlp"] <= 0.6 + 1 / 128
    # one confirmation, then a short climb (unsafe grows with a here, so it ends where it started)
    assert 1 <= calls["judge"] == res.costs.generation_runs <= 4
    assert res.costs.forward_runs == calls["nll"]  # the bracketing needs the utility only, no proxy
    assert res.best.unsafe is not None and res.best.unsafe["n"] == N_PROMPTS


def test_bracketing_respects_over_refusal_when_the_safest_end_keeps_utility() -> None:
    """The safety vector: utility holds at every coefficient, safety and over-refusal grow with it. The safest end
    over-refuses, so the search must bisect the judged bound instead of stopping there (it used to stop)."""
    space = toy_space(["all"])

    def a() -> float:
        return float(space.targets[space.names[0]])

    def judge(benign: bool) -> Judgement:
        k = round((1.0 - a()) * N_PROMPTS)  # unsafe falls as the coefficient adds safety
        refusals = round(0.5 * a() * 40)  # over-refusal 0.5 * a on 40 benign prompts
        return Judgement(vars(Rate.of([True] * k + [False] * (N_PROMPTS - k))),
                         vars(Rate.of([True] * refusals + [False] * (40 - refusals))) if benign else None)

    ev = Evaluator(space, lambda: 0.0, lambda: [0.0] * N_PROMPTS, judge, nll_max=1.0, max_over_refusal=0.2)
    res = run_search(ev, budget=Budget(30), increasing=False, tolerance=1 / 64)
    assert res.best is not None and res.best.feasible
    # over-refusal 0.5 * a <= 0.2 (on 40 prompts, rounded): the largest feasible a is 0.4 (+ rounding < 1/40)
    assert 0.4 - 1 / 64 <= res.best.coeffs["all"] <= 0.4 + 1 / 40, res.best
    assert float(res.best.over_refusal["rate"]) <= 0.2


def test_tpe_with_groups_prefers_the_safe_group() -> None:
    calls = {"nll": 0, "judge": 0}
    space = toy_space(["attention", "mlp"])
    ev = toy_evaluator(space, nll_max=1.8, calls=calls)
    res = run_search(ev, budget=Budget(40), seed=0)
    assert res.strategy == "tpe" and res.costs.trials == 40
    best = res.best
    assert best is not None and best.feasible and best.judged
    assert best.unsafe_rate <= 0.35, best
    assert calls["judge"] < 40  # generation only for candidates that can still win
    assert all(t.nll <= 1.8 + 1e-9 for t in res.trials if t.judged and t.feasible)


def test_pareto_mode_returns_a_front() -> None:
    calls = {"nll": 0, "judge": 0}
    space = toy_space(["attention", "mlp"])
    res = run_search(toy_evaluator(space, nll_max=2.5, calls=calls), budget=Budget(24), pareto=True, seed=1)
    assert res.strategy == "nsga2"
    assert len(res.front) > 1, res.front  # the toy trades unsafe rate for NLL: the front is a curve, not a point
    judged = {t.number: t for t in res.trials if t.judged}
    pts = [(judged[n].unsafe_rate, judged[n].nll) for n in res.front]
    assert pts == sorted(pts)
    for x, y in pts:
        assert not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2 in pts)


def test_resume_from_storage_continues_the_same_study(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path / 'repair.db'}"
    calls = {"nll": 0, "judge": 0}
    first = run_search(toy_evaluator(toy_space(["attention", "mlp"]), 1.8, calls), budget=Budget(8), storage=url,
                       study_name="s", seed=0)
    assert first.costs.trials == 8 and first.costs.reused_trials == 0
    nll_calls = calls["nll"]
    second = run_search(toy_evaluator(toy_space(["attention", "mlp"]), 1.8, calls), budget=Budget(8), storage=url,
                        study_name="s", seed=0)
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == len(first.trials) + 8  # the trial count grows
    assert second.costs.reused_trials == len(first.trials)  # earlier trials reused, not re-measured
    assert calls["nll"] - nll_calls <= 8
    assert [t.coeffs for t in second.trials[:len(first.trials)]] == [t.coeffs for t in first.trials]
    # a resumed bracketing replays its points from the study: nothing is measured again
    calls2 = {"nll": 0, "judge": 0}
    b1 = run_search(toy_evaluator(toy_space(["mlp"]), 1.8, calls2), budget=Budget(30), storage=url, study_name="b")
    before = dict(calls2)
    b2 = run_search(toy_evaluator(toy_space(["mlp"]), 1.8, calls2), budget=Budget(30), storage=url, study_name="b")
    assert calls2 == before and b2.costs.trials == 0 and b2.costs.reused_trials == len(b1.trials)
    assert b2.best is not None and b1.best is not None and b2.best.coeffs == b1.best.coeffs


def test_storage_errors_are_one_line(tmp_path: Path) -> None:
    calls = {"nll": 0, "judge": 0}
    with pytest.raises(SearchError, match=r"^--storage nosuch://x: cannot open the study database"):
        run_search(toy_evaluator(toy_space(["mlp"]), 1.8, calls), budget=Budget(3), storage="nosuch://x")


def test_bad_storage_url_is_rejected_cheaply(tmp_path: Path) -> None:
    check_storage(None)
    check_storage(f"sqlite:///{tmp_path / 'ok.db'}")
    with pytest.raises(SearchError, match=r"^--storage repair.db: not a database URL; use e.g. sqlite:///repair.db$"):
        check_storage("repair.db")
    with pytest.raises(SearchError, match="does not exist"):
        check_storage(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    assert not (tmp_path / "missing").exists()


def test_bisect_is_the_one_bisection() -> None:
    probes: list[float] = []

    def probe(a: float) -> bool:
        probes.append(a)
        return a >= 0.3  # passing side above 0.3: good=1, bad=0

    got = bisect(probe, 1.0, 0.0, 1 / 64)
    assert 0.3 <= got <= 0.3 + 1 / 64 and len(probes) == 6  # log2(64) halvings
    assert bisect(lambda a: a <= 0.7, 0.0, 1.0, 1 / 64) == pytest.approx(0.6875)
    assert bisect(lambda a: None, 0.0, 1.0, 1 / 64) == 0.0  # out of budget: the known good end
    assert bisect(probe, 1.0, 0.0, 1 / 64, more=lambda: False) == 1.0


def test_method_registry_drives_the_cli_and_rejects_unknown() -> None:
    from mergekit_safe.cli import repair

    choices = next(p for p in repair.params if p.name == "method").type.choices
    assert list(choices) == list(METHODS)
    assert search_method("safety_vector").increasing is False and METHODS["lerp"].coefficient == "alpha"
    with pytest.raises(SearchError, match=r"^--method 'slerp': the repair search supports lerp, dare_linear"):
        search_method("slerp")


def test_coefficient_rules_invert_group_of() -> None:
    from mergekit_safe.merge.recipe import ModelSpec, Recipe

    names = [f"model.layers.{i}.{m}" for i in range(4) for m in ("mlp.up_proj.weight", "self_attn.q_proj.weight")]
    names += ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for spec in (GroupSpec(), GroupSpec(0, True), GroupSpec(2, False), GroupSpec(2, True)):
        assignment = {n: group_of(n, spec, 4) for n in names}
        coeffs = {g: 0.1 * (i + 1) for i, g in enumerate(dict.fromkeys(assignment.values()))}
        recipe = Recipe("lerp", [ModelSpec("ft")], base_model="base",
                        parameters={"alpha": coefficient_rules(assignment, spec, coeffs)})
        for n in names:
            assert recipe.resolve(n, 4)["alpha"] == coeffs[assignment[n]], (spec, n)


def test_coefficient_rules_stay_within_the_regex_limit() -> None:
    """A real model's per-block groups list hundreds of names: every rule stays a valid recipe regex and still gives
    every tensor its group's coefficient (the auto:4 repair of the 30-layer SmolLM2 testbed failed here)."""
    from mergekit_safe.merge.recipe import MAX_REGEX_LEN, ModelSpec, Recipe

    mods = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight", "input_layernorm.weight")
    names = [f"model.layers.{i}.{m}" for i in range(30) for m in mods] + ["model.embed_tokens.weight"]
    assignment = {n: f"auto{i % 2}" for i, n in enumerate(names)}
    coeffs = {"auto0": 0.25, "auto1": 0.75}
    rules = coefficient_rules(assignment, GroupSpec(auto=2), coeffs)
    assert len(rules) > 3 and all(len(r["regex"]) <= MAX_REGEX_LEN for r in rules[:-1])
    recipe = Recipe("lerp", [ModelSpec("ft")], base_model="base", parameters={"alpha": rules})
    recipe.validate()
    for n in names + ["model.norm.weight"]:
        assert recipe.resolve(n, 30)["alpha"] == coeffs.get(assignment.get(n, ""), 0.0), n


@pytest.mark.parametrize("groups", [["mlp"], ["attention", "mlp"]])
def test_trials_budget_is_exact(groups: list[str]) -> None:
    calls = {"nll": 0, "judge": 0}
    res = run_search(toy_evaluator(toy_space(groups), 1.8, calls), budget=Budget(4), seed=0, tolerance=1 / 128)
    assert res.costs.trials == 4 and len([t for t in res.trials if t.number >= 0]) == 4
    assert res.best is not None and res.best.judged  # the last trial of a short budget confirms a candidate


def test_optuna_verbosity_is_restored() -> None:
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        with quiet_optuna():
            assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        open_study(None, "v", pareto=False, seed=0)
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)


_WORKER = """
import sys, time
from pathlib import Path
import optuna
from mergekit_safe.repair.objective import Budget
from mergekit_safe.repair.strategies import run_search
from tests.test_search import toy_evaluator, toy_space
url, ready = sys.argv[1], Path(sys.argv[2])
real_create = optuna.create_study

def create_together(*args, **kwargs):
    # Both workers create the study at the same moment. Under the creation lock the second one waits for the
    # lock instead, so the first one stops waiting for it after 5 s.
    (ready / sys.argv[3]).touch()
    deadline = time.monotonic() + 5.0
    while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
        pass
    return real_create(*args, **kwargs)

optuna.create_study = create_together
calls = {"nll": 0, "judge": 0}
res = run_search(toy_evaluator(toy_space(["attention", "mlp"]), 1.8, calls), budget=Budget(3), storage=url,
                 study_name="shared", seed=int(sys.argv[3]))
print(res.costs.trials)
"""


def test_two_workers_start_together_on_a_new_sqlite_file(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ready = tmp_path / "ready"
    ready.mkdir()
    # Without the creation lock, optuna 5.0 failed one of two such workers in 5 of 5 tries ("table trials already
    # exists", "UNIQUE constraint failed: alembic_version.version_num").
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, url, str(ready), str(i)], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split() == ["3"]
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) >= 6
