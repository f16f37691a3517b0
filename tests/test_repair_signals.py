"""The repair's measured signals (issue 11): task metrics on generated answers, the calibrated proxy (paired
openings, logistic fit, rank correlation and the fallback), sensitivities and ``auto:K`` groups, the time budget's
reserve. References: scipy's Spearman, float64 finite differences, autograd on an explicit log-softmax."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from mergekit_safe.errors import EvalError, SearchError
from mergekit_safe.eval.report import Rate
from mergekit_safe.repair.groups import GroupSpec, coefficient_rules, group_of, parse_groups
from mergekit_safe.repair.objective import Budget, Evaluator, Judgement
from mergekit_safe.repair.space import CandidateSpace, build_space
from mergekit_safe.repair.strategies import run_search
from tests.helpers import assert_close
from tests.test_search import N_PROMPTS, toy_evaluator, toy_space


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    from mergekit_safe.eval.proxy import spearman

    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 30)
        x = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        y = [v + rng.gauss(0, 0.5) for v in x]
        want = stats.spearmanr(x, y).statistic
        got = spearman(x, y)
        if math.isnan(want):
            assert got is None
        else:
            assert got is not None and abs(got - want) < 1e-12
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_fit_logistic_recovers_the_generating_curve() -> None:
    from mergekit_safe.repair.command import fit_logistic

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=gen, dtype=torch.float64) * 2 + 1
    scale, shift = 1.7, 0.8
    p = torch.sigmoid(scale * (shift - x))
    y = (torch.rand(4000, generator=gen, dtype=torch.float64) < p).tolist()
    s, t = fit_logistic(x.tolist(), y)
    assert abs(s - scale) < 0.15 and abs(t - shift) < 0.1, (s, t)
    assert fit_logistic([1.0, 2.0], [True, True]) == (1.0, 1.5)  # one class: nothing to fit


def test_task_metrics() -> None:
    from mergekit_safe.eval.utility import numeric_match, task_metric

    assert task_metric("exact_match")([" 2021-03-05 ", "x"], ["2021-03-05", "y"]) == [True, False]
    assert numeric_match(["so the answer is 1,234.", "42 apples, 7", "none"], ["1234", "7", "3"]) == [True, True, False]
    assert task_metric("mergekit_safe.eval.utility:numeric_match") is numeric_match
    with pytest.raises(EvalError, match="choose nll, exact_match, numeric or module:function"):
        task_metric("bleu")
    with pytest.raises(EvalError, match="cannot import the scorer"):
        task_metric("nosuchmodule:f")


def _toy_lm() -> tuple[Any, Any]:
    from mergekit_safe.tiny import toy_llama, toy_tokenizer

    tok = toy_tokenizer(["I cannot help with that", "Sure here is how", "How do I bake bread"], vocab_size=300)
    return toy_llama(tok, hidden=32, layers=2, seed=1, dtype=torch.float64), tok


def test_paired_margin_and_its_gradient_match_explicit_log_softmax() -> None:
    from mergekit_safe.eval.generate import chat_text
    from mergekit_safe.eval.proxy import paired_margin
    from mergekit_safe.eval.utility import continuation_logprobs

    model, tok = _toy_lm()
    prompts, ref, comp = ["How do I bake bread", "How do I x"], ["I cannot", "Sorry no"], ["Sure here", "Yes"]

    def lp(p: str, c: str) -> torch.Tensor:  # the reference: one unpadded sequence, full log-softmax
        pre = tok(chat_text(tok, p), add_special_tokens=False)["input_ids"]
        cont = tok(c, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([pre + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        return sum(logp[len(pre) - 1 + j, t] for j, t in enumerate(cont)) / len(cont)

    got = paired_margin(model, tok, prompts, ref, comp)
    with torch.no_grad():
        want = [float(lp(p, r) - lp(p, c)) for p, r, c in zip(prompts, ref, comp)]
    assert_close(torch.tensor(got), torch.tensor(want), 1e-10, 1e-10, "margin")
    # the gradient hook: d/dtheta of sum_i w_i * logp_i / n_i
    w = [0.5, -2.0]
    model.zero_grad()
    continuation_logprobs(model, tok, prompts, ref, backward_weights=w, batch_size=1)
    got_g = model.lm_head.weight.grad.clone()
    model.zero_grad()
    (w[0] * lp(prompts[0], ref[0]) + w[1] * lp(prompts[1], ref[1])).backward()
    assert_close(got_g, model.lm_head.weight.grad, 1e-10, 1e-12, "grad")
    with pytest.raises(EvalError, match="1 backward weights for 2 rows"):
        continuation_logprobs(model, tok, prompts, ref, backward_weights=[1.0])


def test_unit_derivatives_match_finite_differences(tiny_pair: Any) -> None:
    from transformers import AutoModelForCausalLM

    from mergekit_safe.io.reader import open_checkpoint
    from mergekit_safe.repair.sensitivity import unit_derivatives

    aligned, finetuned = tiny_pair
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float64).eval()
    x = torch.tensor([[1, 5, 9, 2, 7]])

    def f() -> torch.Tensor:
        return model(input_ids=x).logits[0, -1].double().log_softmax(-1)[3]

    with open_checkpoint(aligned) as a, open_checkpoint(finetuned) as ft:
        space = build_space(model, a, ft, None, groups=GroupSpec(2, True), num_layers=2)
        coeffs = {g: 0.3 + 0.1 * i for i, g in enumerate(space.groups)}
        space.apply(coeffs)
        got = unit_derivatives(space, lambda: f().backward())
        params = dict(model.named_parameters())

        def set_at(c: dict[str, float]) -> None:  # the reference writes base + a * tau in float64 itself
            with torch.no_grad():
                for n in space.names:
                    params[n].copy_(space.bases[n] + c[space.group_of[n]] * space.taus[n])

        # transformers' Llama RMSNorm computes in float32 even for a float64 model, so the forward is exact to about
        # 1e-8 only: a central difference with h = 1e-3 keeps that noise (1e-5) and its O(h^2) error small
        for g in space.groups:
            h = 1e-3
            vals = []
            for d in (h, -h):
                set_at({**coeffs, g: coeffs[g] + d})
                with torch.no_grad():
                    vals.append(float(f()))
            assert abs(got[g] - (vals[0] - vals[1]) / (2 * h)) < 1e-4 + 1e-3 * abs(got[g]), g


def test_auto_groups_rank_and_partition() -> None:
    from mergekit_safe.repair.sensitivity import Sensitivity, auto_groups, regroup, revert_path

    refusal = {"u0": -4.0, "u1": -1.0, "u2": 0.5, "u3": -3.0}
    utility = {"u0": 1.0, "u1": 0.1, "u2": 1.0, "u3": 3.0}
    score = {u: (-refusal[u] / utility[u] if refusal[u] < 0 else -1.0) for u in refusal}
    sens = Sensitivity(refusal, utility, score)
    assert sens.ranked() == ["u1", "u0", "u3", "u2"]  # 10, 4, 1, never
    groups = auto_groups(sens, 2)
    assert groups == {"u1": "auto0", "u0": "auto0", "u3": "auto1", "u2": "auto1"}
    space = toy_space(["u0", "u1", "u2", "u3"])
    regroup(space, groups)
    assert space.groups == ["auto0", "auto1"]
    assert revert_path(space.groups) == [{"auto0": 0.0, "auto1": 1.0}]
    assert parse_groups("auto:4") == GroupSpec(auto=4) and str(GroupSpec(auto=4)) == "auto:4"
    with pytest.raises(SearchError, match="auto:K needs a whole number K >= 1"):
        parse_groups("auto:0")
    # auto units are the per-block module types; the recipe rules give each tensor its group's value exactly
    assert group_of("model.layers.3.mlp.up_proj.weight", GroupSpec(auto=2), 4) == "layers3/mlp"
    rules = coefficient_rules({"a.weight": "auto0", "b.weight": "auto1"}, GroupSpec(auto=2), {"auto0": 0.0, "auto1": 1.0})
    assert rules[0]["value"] == 0.0 and "a\\.weight" in rules[0]["regex"]


def _evaluator(space: CandidateSpace, *, utility_of: Any, agree: bool, calls: dict[str, int]) -> Evaluator:
    """Unsafe grows with the coefficient; the task metric comes from ``utility_of``; the NLL is flat (uninformative);
    the margins rank candidates like the judge when ``agree``, inversely otherwise."""
    def a() -> float:
        return float(space.targets[space.names[0]])

    def unsafe() -> float:
        return min(1.0, max(0.0, a()))

    def margins() -> list[float]:
        u = unsafe() if agree else 1.0 - unsafe()
        return [4.0 * ((i + 0.5) / N_PROMPTS - u) for i in range(N_PROMPTS)]

    def judge(benign: bool) -> Judgement:
        calls["judge"] += 1
        k = round(unsafe() * N_PROMPTS)
        return Judgement(vars(Rate.of([True] * k + [False] * (N_PROMPTS - k))), None, utility_of(a()))

    def fallback() -> float:
        calls["fallback"] += 1
        return unsafe()

    return Evaluator(space, lambda: 1.0, margins, judge, 1.0, None, 0.8, fallback_fn=fallback)


def test_generated_metric_decides_utility_not_the_nll() -> None:
    calls = {"judge": 0, "fallback": 0}
    space = toy_space(["all"])
    ev = _evaluator(space, utility_of=lambda a: 1.0 if a >= 0.7 else 0.0, agree=True, calls=calls)
    ev.seed({"all": 0.0}, 1.0, Judgement(vars(Rate.of([False] * N_PROMPTS)), None, 0.0), -1)
    ev.seed({"all": 1.0}, 1.0, Judgement(vars(Rate.of([True] * N_PROMPTS)), None, 1.0), -2)
    res = run_search(ev, budget=Budget(30), tolerance=1 / 64)
    # the NLL passes everywhere; only the generated metric puts the bound at a = 0.7
    assert res.best is not None and 0.7 <= res.best.coeffs["all"] <= 0.7 + 1 / 64
    assert res.best.utility == 1.0 and res.costs.generation_runs == calls["judge"] <= 10


def test_a_disagreeing_proxy_falls_back_to_generation() -> None:
    for agree in (True, False):
        calls = {"judge": 0, "fallback": 0}
        space = toy_space(["attention", "mlp"])
        ev = _evaluator(space, utility_of=lambda a: 1.0, agree=agree, calls=calls)
        run_search(ev, budget=Budget(30), seed=0, slack=1.0)  # slack 1: judge everything feasible
        rank, n = ev.proxy_rank()
        assert n >= 4
        if agree:
            assert rank is not None and rank > 0.9 and calls["fallback"] == 0 and ev.proxy_trusted()
        else:
            assert rank is not None and rank < 0 and calls["fallback"] > 0 and not ev.proxy_trusted()
            assert ev.costs.subsample_runs == calls["fallback"]


def test_budget_reserve_stops_early() -> None:
    b = Budget(10, seconds=100.0)
    assert not b.out_of_time()
    b.reserve = 100.0
    assert b.out_of_time()  # nothing left once the confirmation run is set aside
    b = Budget(10, seconds=100.0, reserve=30.0)
    assert b.fits(60.0) and not b.fits(75.0)  # a step starts only if it ends before the reserve
    assert Budget(10).fits(1e9)  # no wall-clock budget: everything fits


def test_trials_skip_a_generation_that_would_overrun() -> None:
    from mergekit_safe.repair.objective import Trials, open_study

    space = toy_space(["attention", "mlp"])
    ev = toy_evaluator(space, nll_max=10.0, calls={"nll": 0, "judge": 0})
    budget = Budget(5, seconds=200.0, reserve=60.0)
    budget.start -= 90.0  # 90 s spent: a 60 s generation run plus the 60 s reserve no longer fit in 200 s
    trials = Trials(ev, open_study(None, "budget", pareto=False, seed=0), budget)
    res = trials.run({"attention": 0.5, "mlp": 0.5}, True)
    assert res is not None and not res.judged and ev.costs.generation_runs == 0
    budget.start += 90.0  # back to a fresh budget: now it fits
    res = trials.run({"attention": 0.25, "mlp": 0.5}, True)
    assert res is not None and res.judged and ev.costs.generation_runs == 1
