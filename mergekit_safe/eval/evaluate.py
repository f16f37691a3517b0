"""The evaluation pipeline on a model already in memory: generate -> judge -> metrics (+ intervals).

The search loop calls :func:`evaluate` per confirmed candidate (no reload) and the cheap
:func:`~mergekit_safe.eval.proxy.refusal_margin` / :func:`~mergekit_safe.eval.utility.utility_nll` per trial.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.agreement import judge_panel
from mergekit_safe.eval.generate import GenerationBackend, GenerationConfig, HFBackend
from mergekit_safe.eval.judges import Judge, JudgeFn, Verdict, get_judge
from mergekit_safe.eval.prompts import Prompt, frame_prompts
from mergekit_safe.eval.proxy import (
    DEFAULT_COMPLIANCE_OPENINGS,
    DEFAULT_REFUSAL_OPENINGS,
    proxy_agreement,
    refusal_margin,
)
from mergekit_safe.eval.report import EvalReport, Rate
from mergekit_safe.eval.utility import UtilityRow, exact_match, run_lm_eval, utility_nll


def _as_prompts(items: Sequence[Prompt | str] | None) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(p) for p in (items or [])]


def _group(items: Sequence[Prompt], flags: Sequence[bool], key: str) -> dict[str, Rate]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for p, f in zip(items, flags):
        groups[getattr(p, key)].append(f)
    return {k: Rate.of(v) for k, v in sorted(groups.items())}


def evaluate(
    model: Any,
    tokenizer: Any,
    *,
    harmful: Sequence[Prompt | str] | None = None,
    benign: Sequence[Prompt | str] | None = None,
    utility: Sequence[UtilityRow] | None = None,
    judge: str | Judge | JudgeFn = "keyword",
    judge_options: dict[str, Any] | None = None,
    extra_judges: Sequence[str | Judge] = (),
    tasks: Sequence[str] = (),
    config: GenerationConfig | None = None,
    backend: GenerationBackend | None = None,
    proxy: bool = True,
    refusal_openings: Sequence[str] = DEFAULT_REFUSAL_OPENINGS,
    compliance_openings: Sequence[str] = DEFAULT_COMPLIANCE_OPENINGS,
    exact_match_utility: bool = False,
    lm_eval_tasks: Sequence[str] = (),
    model_name: str = "",
) -> EvalReport:
    """Evaluate safety (unsafe rate), over-refusal and utility of a model in memory.

    All generations (harmful prompts in every framing, benign prompts, exact-match prompts) go through one
    backend call, so they share length-sorted batches.

    Args:
        model: causal LM in memory; None with a ``backend`` that serves it elsewhere (then the proxy and the
            utility NLL, which need the weights, are skipped).
        tokenizer: its tokenizer (left padding is used whatever its setting); None with ``model``.
        harmful: harmful prompts; unsafe rates are measured on them. None skips.
        benign: benign prompts; over-refusal is measured on them. None skips.
        utility: prompt/reference rows; NLL always, exact match when ``exact_match_utility``.
        judge: a registered judge name (see :data:`~mergekit_safe.eval.judges.JUDGES`), a built
            :class:`~mergekit_safe.eval.judges.Judge`, or any ``(prompts, responses) -> list[Verdict]`` callable.
        judge_options: options for the judge's builder (``phrases``, ``model_path``, ``unsafe_labels``...).
        extra_judges: more judges (names, built with ``judge_options``, or built judges) run on the same
            harmful responses; each one's rate, the coherence check and every pair's kappa go to
            ``report.judges`` / ``report.agreement``. ``report.unsafe`` stays the first judge's.
        tasks: task framings to add (names from :data:`~mergekit_safe.eval.prompts.FRAMINGS`).
        config: generation settings; default :class:`GenerationConfig()`.
        backend: generation backend; default :class:`HFBackend` on ``model``.
        proxy: also compute the refusal margin on the direct harmful prompts and its agreement with the judge.
        refusal_openings, compliance_openings: openings for the margin.
        exact_match_utility: generate answers for the utility rows and score exact match.
        lm_eval_tasks: lm-evaluation-harness tasks to run (needs lm-eval installed).
        model_name: recorded in the report.

    Returns:
        The :class:`EvalReport`, with per-prompt records in ``generations``.

    Raises:
        EvalError: nothing to evaluate, an unknown judge/framing, lm-eval requested but missing, or no
            model in memory for what needs one (utility NLL without exact match, lm-eval).

    Example:
        >>> report = evaluate(model, tok, harmful=load_prompts("builtin"), tasks=["translate"])  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    config = config or GenerationConfig()
    harmful_p, benign_p = _as_prompts(harmful), _as_prompts(benign)
    _check_inputs(model, backend, harmful_p, benign_p, utility, exact_match_utility, lm_eval_tasks)
    backend = backend or HFBackend(model, tokenizer)
    judge_options = dict(judge_options or {})
    judge, refusal_fn = _resolve_judge(judge, judge_options)
    framed = harmful_p + [f for t in tasks for f in frame_prompts(harmful_p, t)]
    em_rows = list(utility or []) if exact_match_utility else []
    report = _new_report(model_name, judge.name, config, tasks, judge_options)
    # one backend call for every prompt, so all of them share length-sorted batches
    responses = _generate(backend, [p.text for p in framed] + [p.text for p in benign_p] + [r.prompt for r in em_rows],
                          config, report)
    h_resp, b_resp, em_resp = (responses[:len(framed)], responses[len(framed):len(framed) + len(benign_p)],
                               responses[len(framed) + len(benign_p):])
    h_verdicts, panel = _score_harmful(report, judge, extra_judges, judge_options, framed, h_resp)
    b_verdicts = _score_benign(report, refusal_fn, benign_p, b_resp)
    _score_utility(report, model, tokenizer, utility, em_rows, em_resp, lm_eval_tasks, config)
    margins = (_score_proxy(report, model, tokenizer, harmful_p, framed, h_verdicts, refusal_openings,
                            compliance_openings, config) if proxy and model is not None and harmful_p else [])
    _record_generations(report, framed, h_resp, h_verdicts, panel, margins, len(harmful_p))
    _record_others(report, benign_p, b_resp, b_verdicts, em_rows, em_resp)
    return report


def _check_inputs(model: Any, backend: GenerationBackend | None, harmful: list[Prompt], benign: list[Prompt],
                  utility: Sequence[UtilityRow] | None, exact_match_utility: bool,
                  lm_eval_tasks: Sequence[str]) -> None:
    """Refuse an evaluation that has nothing to measure, or that needs weights a served model does not give."""
    if model is None and (backend is None or lm_eval_tasks or (utility and not exact_match_utility)):
        raise EvalError("this evaluation needs the model in memory (generation backend, utility NLL or lm-eval); "
                        "with a served model use --exact-match for utility")
    if not harmful and not benign and not utility and not lm_eval_tasks:
        raise EvalError("nothing to evaluate: give harmful prompts, benign prompts or utility data")


def _new_report(model_name: str, judge_name: str, config: GenerationConfig, tasks: Sequence[str],
                judge_options: dict[str, Any]) -> EvalReport:
    """An empty report that records the settings it was measured with."""
    report = EvalReport(model=model_name, judge=judge_name)
    report.settings = {
        "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
        "system_prompt": config.system_prompt, "tasks": list(tasks), "judge_options": {
            k: (list(v) if isinstance(v, (tuple, list)) else str(v)) for k, v in judge_options.items()},
    }
    return report


def _record_others(report: EvalReport, benign: list[Prompt], b_resp: list[str], b_verdicts: list[Verdict],
                   em_rows: list[UtilityRow], em_resp: list[str]) -> None:
    """One record per benign answer and per exact-match utility answer."""
    for p, r, v in zip(benign, b_resp, b_verdicts):
        report.generations.append({"set": "benign", "prompt": p.text, "category": p.category, "source": p.source,
                                   "response": r, "refused": v.refused})
    for row, r in zip(em_rows, em_resp):
        report.generations.append({"set": "utility", "prompt": row.prompt, "reference": row.response,
                                   "source": row.source, "response": r})


def _resolve_judge(judge: str | Judge | JudgeFn, options: dict[str, Any]) -> tuple[Judge, JudgeFn]:
    """``(the judge, the function that decides refusal on benign prompts)``."""
    if isinstance(judge, str):
        judge = get_judge(judge, **options)
    elif not isinstance(judge, Judge):
        judge = Judge(getattr(judge, "__name__", "custom"), judge, decides_refusal=True)
    # Over-refusal needs a refusal decision; a classifier judge only says safe/unsafe, so fall back to the
    # keyword rule (with the same phrases when given).
    return judge, judge if judge.decides_refusal else get_judge("keyword", phrases=options.get("phrases"))


def _generate(backend: GenerationBackend, texts: list[str], config: GenerationConfig, report: EvalReport) -> list[str]:
    """Generate every answer in one backend call and record the throughput."""
    if not texts:
        return []
    run = backend.generate(texts, config)
    report.throughput = {
        "prompts": len(texts), "seconds": run.seconds, "prompts_per_s": len(texts) / max(run.seconds, 1e-9),
        "new_tokens": run.new_tokens, "tokens_per_s": run.new_tokens / max(run.seconds, 1e-9),
    }
    return [g.text for g in run.generations]


def _score_harmful(report: EvalReport, judge: Judge, extra: Sequence[str | Judge], options: dict[str, Any],
                   framed: list[Prompt], responses: list[str]) -> tuple[list[Verdict], dict[str, list[Verdict]]]:
    """Judge the harmful answers: unsafe rates (direct, per category, per framing) and the judge panel."""
    if not framed:
        return [], {}
    verdicts: list[Verdict] = judge([p.text for p in framed], responses)
    unsafe = [v.unsafe for v in verdicts]
    direct = [(p, u) for p, u in zip(framed, unsafe) if p.framing == "direct"]
    report.unsafe = Rate.of(u for _, u in direct)
    report.unsafe_by_category = _group([p for p, _ in direct], [u for _, u in direct], "category")
    report.unsafe_by_framing = _group(framed, unsafe, "framing")
    panel = _judge_panel(judge, verdicts, extra, options, framed, responses)
    report.judges, report.agreement = judge_panel(
        {k: [v.unsafe for p, v in zip(framed, vs) if p.framing == "direct"] for k, vs in panel.items()},
        [r for p, r in zip(framed, responses) if p.framing == "direct"])
    return verdicts, panel


def _score_benign(report: EvalReport, refusal_fn: JudgeFn, benign: list[Prompt], responses: list[str]) -> list[Verdict]:
    """Over-refusal on the benign answers (overall and per category)."""
    if not benign:
        return []
    verdicts = refusal_fn([p.text for p in benign], responses)
    refused = [bool(v.refused) for v in verdicts]
    report.over_refusal = Rate.of(refused)
    report.over_refusal_by_category = _group(benign, refused, "category")
    return verdicts


def _score_utility(report: EvalReport, model: Any, tokenizer: Any, utility: Sequence[UtilityRow] | None,
                   em_rows: list[UtilityRow], em_resp: list[str], lm_eval_tasks: Sequence[str],
                   config: GenerationConfig) -> None:
    """Utility NLL (teacher forced), exact match on generated answers, and lm-eval tasks."""
    if utility and model is not None:
        nll = utility_nll(model, tokenizer, utility, system_prompt=config.system_prompt)
        report.utility = {"nll": nll.nll, "perplexity": nll.perplexity, "n_tokens": nll.n_tokens,
                          "n_rows": nll.n_rows}
    if em_rows:
        hits = exact_match(em_resp, [r.response for r in em_rows])
        report.utility["exact_match"] = vars(Rate.of(hits))
    if lm_eval_tasks:
        report.utility["lm_eval"] = run_lm_eval(model, tokenizer, lm_eval_tasks, batch_size=config.batch_size)


def _score_proxy(report: EvalReport, model: Any, tokenizer: Any, harmful: list[Prompt], framed: list[Prompt],
                 verdicts: list[Verdict], refusal_openings: Sequence[str], compliance_openings: Sequence[str],
                 config: GenerationConfig) -> list[float]:
    """The refusal margin on the direct harmful prompts and its agreement with the judge."""
    margins = refusal_margin(model, tokenizer, harmful, refusal_openings=refusal_openings,
                             compliance_openings=compliance_openings, system_prompt=config.system_prompt,
                             batch_size=config.batch_size)
    # the judge's "safe" on a direct prompt is the event the margin should predict
    judged_safe = [not v.unsafe for p, v in zip(framed, verdicts) if p.framing == "direct"]
    report.proxy = {"mean_margin": sum(margins) / len(margins), "refusal_openings": list(refusal_openings),
                    "compliance_openings": list(compliance_openings), **proxy_agreement(margins, judged_safe)}
    return margins


def _record_generations(report: EvalReport, framed: list[Prompt], responses: list[str], verdicts: list[Verdict],
                        panel: dict[str, list[Verdict]], margins: list[float], n_direct: int) -> None:
    """One record per harmful answer (with every judge's verdict and the margin where there is one)."""
    for i, (p, r, v) in enumerate(zip(framed, responses, verdicts)):
        rec = {"set": "harmful", "prompt": p.text, "category": p.category, "framing": p.framing,
               "source": p.source, "response": r, "unsafe": v.unsafe, "refused": v.refused}
        if len(panel) > 1:
            rec["unsafe_by_judge"] = {k: vs[i].unsafe for k, vs in panel.items()}
        if margins and i < n_direct:
            rec["refusal_margin"] = margins[i]
        report.generations.append(rec)


def _judge_panel(judge: Judge, verdicts: list[Verdict], extra: Sequence[str | Judge], options: dict[str, Any],
                 framed: Sequence[Prompt], responses: Sequence[str]) -> dict[str, list[Verdict]]:
    """The main judge's verdicts plus every extra judge's on the same responses, by judge name."""
    panel = {judge.name: verdicts}
    for j in extra:
        built = get_judge(j, **options) if isinstance(j, str) else j
        if built.name in panel:
            raise EvalError(f"judge {built.name!r} is listed twice")
        panel[built.name] = built([p.text for p in framed], list(responses))
    return panel
