"""Safety and utility evaluation: prompts -> generation -> judges -> metrics with Wilson intervals.

Public API (re-exported here)::

    evaluate(model, tokenizer, harmful=..., benign=..., utility=..., judge="keyword", tasks=...) -> EvalReport
    refusal_margin(model, tokenizer, prompts) -> list[float]        # cheap proxy, one forward per batch
    utility_nll(model, tokenizer, rows) -> NLLResult                 # cheap utility, one forward per batch
    load_prompts(source, kind=..., field=..., column=..., category_field=...) -> list[Prompt]
    JUDGES / register_judge / get_judge                              # the judge registry
    HFBackend, HFFastBackend, OpenAIBackend                          # generation engines (GenerationBackend)
    GUARD_FORMATS, cohen_kappa, judge_panel                          # guard judges and judge agreement
"""

from __future__ import annotations

from mergekit_safe.eval.agreement import Agreement, cohen_kappa, is_degenerate, judge_panel
from mergekit_safe.eval.evaluate import evaluate
from mergekit_safe.eval.fast import HFFastBackend
from mergekit_safe.eval.generate import (
    Generation,
    GenerationBackend,
    GenerationConfig,
    GenerationRun,
    HFBackend,
    load_model,
)
from mergekit_safe.eval.guard import GUARD_FORMATS, GuardFormat, detect_guard_format
from mergekit_safe.eval.judges import (
    DEFAULT_UNSAFE_LABELS,
    JUDGES,
    REFUSAL_PHRASES,
    Judge,
    JudgeSpec,
    Verdict,
    get_judge,
    is_refusal_keyword,
    is_refusal_prefix,
    judges_markdown,
    load_phrases,
    register_judge,
)
from mergekit_safe.eval.openai_engine import OpenAIBackend, ResponseCache
from mergekit_safe.eval.prompts import (
    FRAMINGS,
    Framing,
    Prompt,
    frame_prompts,
    load_prompts,
    parse_tasks,
    sample_prompts,
)
from mergekit_safe.eval.proxy import auroc, proxy_agreement, refusal_margin
from mergekit_safe.eval.report import EvalReport, Rate, wilson_interval
from mergekit_safe.eval.utility import (
    NLLResult,
    UtilityRow,
    continuation_logprobs,
    exact_match,
    load_utility_rows,
    utility_nll,
)

__all__ = [
    "Agreement",
    "DEFAULT_UNSAFE_LABELS",
    "EvalReport",
    "FRAMINGS",
    "Framing",
    "GUARD_FORMATS",
    "Generation",
    "GenerationBackend",
    "GenerationConfig",
    "GenerationRun",
    "GuardFormat",
    "HFBackend",
    "HFFastBackend",
    "JUDGES",
    "Judge",
    "JudgeSpec",
    "NLLResult",
    "OpenAIBackend",
    "Prompt",
    "REFUSAL_PHRASES",
    "Rate",
    "ResponseCache",
    "UtilityRow",
    "Verdict",
    "auroc",
    "cohen_kappa",
    "continuation_logprobs",
    "detect_guard_format",
    "evaluate",
    "exact_match",
    "frame_prompts",
    "get_judge",
    "is_degenerate",
    "is_refusal_keyword",
    "is_refusal_prefix",
    "judge_panel",
    "judges_markdown",
    "load_model",
    "load_phrases",
    "load_prompts",
    "load_utility_rows",
    "parse_tasks",
    "proxy_agreement",
    "refusal_margin",
    "register_judge",
    "sample_prompts",
    "utility_nll",
    "wilson_interval",
]
