"""Safety and utility evaluation: prompts -> generation -> judges -> metrics with Wilson intervals.

Public API (re-exported here)::

    evaluate(model, tokenizer, harmful=..., benign=..., utility=..., judge="keyword", tasks=...) -> EvalReport
    refusal_margin(model, tokenizer, prompts) -> list[float]        # cheap proxy, one forward per batch
    utility_nll(model, tokenizer, rows) -> NLLResult                 # cheap utility, one forward per batch
    load_prompts(source, kind=..., field=..., column=..., category_field=...) -> list[Prompt]
    JUDGES / register_judge / get_judge                              # the judge registry
"""

from __future__ import annotations

from mergekit_safe.eval import guard as _guard  # noqa: F401  (registers the guard judges)
from mergekit_safe.eval.evaluate import evaluate
from mergekit_safe.eval.generate import (
    Generation,
    GenerationBackend,
    GenerationConfig,
    GenerationRun,
    HFBackend,
    load_model,
)
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
    "DEFAULT_UNSAFE_LABELS",
    "EvalReport",
    "FRAMINGS",
    "Framing",
    "Generation",
    "GenerationBackend",
    "GenerationConfig",
    "GenerationRun",
    "HFBackend",
    "JUDGES",
    "Judge",
    "JudgeSpec",
    "NLLResult",
    "Prompt",
    "REFUSAL_PHRASES",
    "Rate",
    "UtilityRow",
    "Verdict",
    "auroc",
    "continuation_logprobs",
    "evaluate",
    "exact_match",
    "frame_prompts",
    "get_judge",
    "is_refusal_keyword",
    "is_refusal_prefix",
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
