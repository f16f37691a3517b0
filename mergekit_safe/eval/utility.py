"""Utility without generation (NLL of reference responses), exact match, and an optional lm-eval bridge.

:func:`continuation_logprobs` is the one scoring primitive: ``log p(continuation | chat(prompt))`` from one
forward pass per batch. The NLL metric and the refusal-margin proxy both use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.generate import chat_text, encode_prompts, left_pad, model_device, stop_token_ids
from mergekit_safe.eval.prompts import iter_jsonl


@dataclass(frozen=True)
class UtilityRow:
    """A prompt and its reference response (for NLL) or reference answer (for exact match)."""

    prompt: str
    response: str
    source: str = ""


def load_utility_rows(
    path: str | Path, prompt_field: str = "prompt", response_field: str = "response"
) -> list[UtilityRow]:
    """Rows from a ``.jsonl`` file with a prompt and a reference response on every line.

    Raises:
        EvalError: missing file, wrong extension, bad JSON or a missing/empty field (names ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: utility file not found")
    if path.suffix.lower() != ".jsonl":
        raise EvalError(f"{path}: utility data must be .jsonl with {prompt_field!r} and {response_field!r} fields")
    rows = []
    for i, obj in iter_jsonl(path):
        for f in (prompt_field, response_field):
            if not isinstance(obj.get(f), str) or not obj[f].strip():
                raise EvalError(f"{path}:{i}: field {f!r} must be a non-empty string")
        rows.append(UtilityRow(obj[prompt_field], obj[response_field], f"{path}:{i}"))
    if not rows:
        raise EvalError(f"{path}: no utility rows found")
    return rows


def _keeps_logits(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def continuation_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    system_prompt: str | None = None,
    batch_size: int = 8,
    backward_weights: Sequence[float] | None = None,
) -> list[tuple[float, int]]:
    """``(sum log p(continuation tokens | chat(prompt)), n_tokens)`` for every pair, one forward per batch.

    The prompt goes through the chat template up to the assistant turn; the continuation is tokenized on its
    own (no special tokens) and appended, so its tokens are exactly the ones scored. Rows are left-padded
    (with explicit position ids) so every continuation sits at the end of its row, and only the last
    ``max_len + 1`` positions' logits are materialised: a ``[batch, seq, vocab]`` fp32 tensor would be
    gigabytes for a 128k vocabulary.

    Args:
        model: causal LM in memory.
        tokenizer: its tokenizer.
        prompts: user turns, N.
        continuations: assistant text to score, N, non-empty.
        system_prompt: optional system turn.
        batch_size: rows per forward. Default 8.
        backward_weights: N weights; when given, the gradient of ``sum_i w_i * logp_i / n_i`` (per-token mean
            log-probabilities) is accumulated into the parameters' ``.grad``, batch by batch (sensitivities;
            the caller zeroes and reads the gradients).

    Returns:
        N tuples in input order; log-probabilities in nats, summed over the continuation's tokens.

    Raises:
        EvalError: lengths differ, or a continuation tokenizes to nothing.
    """
    if len(prompts) != len(continuations):
        raise EvalError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if backward_weights is not None and len(backward_weights) != len(prompts):
        raise EvalError(f"{len(backward_weights)} backward weights for {len(prompts)} rows")
    pre = encode_prompts(tokenizer, [chat_text(tokenizer, p, system_prompt) for p in prompts])
    cont = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    for i, (p, c) in enumerate(zip(pre, cont)):
        if not c:
            raise EvalError(f"continuation {i} ({continuations[i]!r}) is empty after tokenization")
        if not p:
            raise EvalError(f"prompt {i} is empty after tokenization; nothing to condition on")
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    order = sorted(range(len(pre)), key=lambda i: len(pre[i]) + len(cont[i]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pre)
    device = model_device(model)
    keep_arg = _keeps_logits(model)
    grad = backward_weights is not None
    with torch.enable_grad() if grad else torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, mask = left_pad([pre[i] + cont[i] for i in idx], pad_id)
            k = max(len(cont[i]) for i in idx) + 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"logits_to_keep": k} if keep_arg else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           **kwargs).logits[:, -k:]
            # at least fp32 for the softmax (bf16 logits lose the tail); fp64 models stay fp64 for exact tests
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            total = None
            for row, i in enumerate(idx):
                n = len(cont[i])
                # token t at kept index j is predicted by kept index j - 1
                targets = torch.tensor(cont[i], device=logp.device)
                lp_t = logp[row, k - n - 1:k - 1].gather(-1, targets[:, None]).sum()
                out[i] = (lp_t.item(), n)
                if grad:
                    term = float(backward_weights[i]) * lp_t / n
                    total = term if total is None else total + term
            if total is not None:
                total.backward()
    return out


@dataclass(frozen=True)
class NLLResult:
    """Token-weighted NLL of reference responses.

    Attributes:
        nll: mean negative log-likelihood per response token, nats.
        perplexity: ``exp(nll)``.
        n_tokens: response tokens scored.
        n_rows: rows scored.
        row_nll: per-row mean NLL, input order.
    """

    nll: float
    perplexity: float
    n_tokens: int
    n_rows: int
    row_nll: list[float]


def utility_nll(
    model: Any,
    tokenizer: Any,
    rows: Sequence[UtilityRow | Mapping[str, str]],
    *,
    system_prompt: str | None = None,
    batch_size: int = 8,
) -> NLLResult:
    """Mean NLL and perplexity of reference responses given prompts; loss on response tokens only.

    Cheap enough to call per search trial: one forward pass per batch, no generation.

    Args:
        model: causal LM in memory.
        tokenizer: its tokenizer.
        rows: :class:`UtilityRow` or mappings with ``prompt`` and ``response``.
        system_prompt: optional system turn.
        batch_size: rows per forward. Default 8.

    Raises:
        EvalError: no rows, or a row lacks a prompt/response.

    Example:
        >>> utility_nll(model, tok, [{"prompt": "2+2?", "response": "4"}]).perplexity  # doctest: +SKIP
    """
    if not rows:
        raise EvalError("utility_nll needs at least one row")
    rs = [r if isinstance(r, UtilityRow) else _row_from_mapping(r, i) for i, r in enumerate(rows)]
    scores = continuation_logprobs(model, tokenizer, [r.prompt for r in rs], [r.response for r in rs],
                                   system_prompt=system_prompt, batch_size=batch_size)
    total_lp = sum(lp for lp, _ in scores)
    n_tok = sum(n for _, n in scores)
    nll = -total_lp / n_tok
    return NLLResult(nll, math.exp(nll), n_tok, len(rs), [-lp / n for lp, n in scores])


def _row_from_mapping(r: Mapping[str, str], i: int) -> UtilityRow:
    if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
        raise EvalError(f"utility row {i} needs string 'prompt' and 'response' fields")
    return UtilityRow(r["prompt"], r["response"], f"row {i}")


def normalize_answer(text: str) -> str:
    """Exact-match normal form: strip, lower-case, collapse runs of whitespace."""
    return " ".join(text.strip().lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per-row ``normalize(prediction) == normalize(reference)``."""
    if len(predictions) != len(references):
        raise EvalError(f"{len(predictions)} predictions but {len(references)} references")
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numeric_match(predictions: Sequence[str], references: Sequence[str], tolerance: float = 1e-6) -> list[bool]:
    """Per-row: the last number in the prediction equals the reference's last number (GSM8K-style answers)."""
    if len(predictions) != len(references):
        raise EvalError(f"{len(predictions)} predictions but {len(references)} references")

    def last(text: str) -> float | None:
        found = _NUMBER.findall(text.replace(",", ""))
        return float(found[-1]) if found else None

    out = []
    for p, r in zip(predictions, references):
        a, b = last(p), last(r)
        out.append(a is not None and b is not None and abs(a - b) <= tolerance * max(1.0, abs(b)))
    return out


#: Task metrics scored on generated answers against the utility rows' references (higher is better, per row
#: in [0, 1]); ``--utility-metric`` also takes ``module:function`` with the same signature.
TASK_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], list[bool]]] = {
    "exact_match": exact_match,
    "numeric": numeric_match,
}


def task_metric(name: str) -> Callable[[Sequence[str], Sequence[str]], Sequence[float]]:
    """The scorer named ``name``: a :data:`TASK_METRICS` entry or ``package.module:function``.

    A user scorer takes ``(predictions, references)`` and returns one score in [0, 1] per row.

    Raises:
        EvalError: an unknown name, or a ``module:function`` that cannot be imported.
    """
    if name in TASK_METRICS:
        return TASK_METRICS[name]
    if ":" not in name:
        raise EvalError(f"--utility-metric {name!r}: choose nll, {', '.join(TASK_METRICS)} or module:function")
    mod, _, fn = name.partition(":")
    try:
        scorer = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise EvalError(f"--utility-metric {name!r}: cannot import the scorer ({e})") from None
    if not callable(scorer):
        raise EvalError(f"--utility-metric {name!r}: not a function")
    return scorer


def lm_eval_available() -> bool:
    """True when the optional ``lm_eval`` package can be imported."""
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, batch_size: int = 8,
                limit: int | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on the in-memory model (bridge; needs ``pip install lm-eval``).

    Returns:
        ``{task: {metric: value}}`` as lm-eval reports it.

    Raises:
        EvalError: lm-eval is not installed.
    """
    if not lm_eval_available():
        raise EvalError(f"--lm-eval-tasks {','.join(tasks)} needs the lm-eval package; pip install lm-eval")
    import lm_eval  # type: ignore[import-not-found]
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-not-found]

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in res["results"].items()}
