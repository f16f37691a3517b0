"""``mergekit-safe eval``: the click command; thin: parse flags, call the API, print and write the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.evaluate import evaluate
from mergekit_safe.eval.fast import HFFastBackend
from mergekit_safe.eval.generate import GenerationBackend, GenerationConfig, load_model
from mergekit_safe.eval.guard import GUARD_FORMATS
from mergekit_safe.io.dtypes import DTYPES
from mergekit_safe.kernels import resolve_device
from mergekit_safe.kernels.runtime import DEVICE_ENV, DEVICE_HELP
from mergekit_safe.eval.judges import JUDGES, get_judge, judge_names, load_phrases
from mergekit_safe.eval.openai_engine import OpenAIBackend, ResponseCache, default_cache_dir
from mergekit_safe.eval.prompts import FRAMINGS, load_prompts, parse_tasks, sample_prompts
from mergekit_safe.eval.proxy import DEFAULT_COMPLIANCE_OPENINGS, DEFAULT_REFUSAL_OPENINGS
from mergekit_safe.eval.utility import load_utility_rows


def _csv_list(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _served(base_url: str, model: str, api_key_env: str, concurrency: int, cache_dir: Path | None,
            no_cache: bool) -> OpenAIBackend:
    """An OpenAI-compatible backend; the key comes from the environment, never from a flag (shell history)."""
    cache = None if no_cache else ResponseCache(cache_dir or default_cache_dir())
    return OpenAIBackend(base_url, model, api_key=os.environ.get(api_key_env) or None, concurrency=concurrency,
                         cache=cache)


@click.command("eval")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@click.option("--harmful", default="builtin", show_default=True,
              help="Harmful prompts: 'builtin', 'none', or a .txt/.jsonl/.csv file.")
@click.option("--benign", default="builtin", show_default=True,
              help="Benign prompts for over-refusal: 'builtin', 'none', or a file.")
@click.option("--utility", type=click.Path(dir_okay=False, path_type=Path),
              help=".jsonl with 'prompt' and 'response': NLL / perplexity of the responses.")
@click.option("--exact-match", is_flag=True, help="Also generate answers for --utility rows and score exact match.")
@click.option("--field", default=None, help="JSONL field holding the prompt (default 'prompt').")
@click.option("--column", default=None, help="CSV column holding the prompt (default 'prompt'; AdvBench: goal, "
              "HarmBench: Behavior).")
@click.option("--category-column", default=None, help="JSONL field / CSV column holding the category (optional).")
@click.option("--judge", default="keyword", show_default=True,
              help="A judge or a comma list (the first is the main one; all are reported with their kappa). "
              + "; ".join(f"{s.name}: {s.description}" for s in JUDGES.values()))
@click.option("--judge-model", type=click.Path(file_okay=False, path_type=Path),
              help="Local judge model folder (classifier, guard, harmbench-cls), or the served guard's name "
              "with --judge-base-url.")
@click.option("--guard-format", type=click.Choice(list(GUARD_FORMATS)), default=None,
              help="Guard family for --judge guard [default: detected from the model's config and template].")
@click.option("--judge-base-url", default=None, help="Served guard (llama_guard format): OpenAI-compatible URL.")
@click.option("--engine", type=click.Choice(["hf", "hf-fast", "openai"]), default="hf", show_default=True,
              help="hf: transformers generate; hf-fast: continuous batching; openai: a served model (MODEL is "
              "its name, needs --base-url; no proxy or utility NLL).")
@click.option("--base-url", default=None, help="OpenAI-compatible API root for --engine openai, e.g. "
              "http://localhost:8000/v1.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key (unset: no key is sent).")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Requests in flight (--engine openai).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Response cache for served engines [default: $MERGEKIT_SAFE_CACHE/responses or "
              "~/.cache/mergekit_safe/responses].")
@click.option("--no-cache", is_flag=True, help="Send every request, cache nothing.")
@click.option("--unsafe-labels", default=None, help="Comma list of classifier labels that mean unsafe.")
@click.option("--judge-input", type=click.Choice(["pair", "response"]), default="pair", show_default=True,
              help="What the classifier reads: (prompt, response) pair or the response alone.")
@click.option("--refusal-phrases", type=click.Path(dir_okay=False, path_type=Path),
              help="Text file, one refusal phrase a line (replaces the default list).")
@click.option("--tasks", default="none", show_default=True,
              help=f"Task framings of the harmful prompts: none, all, or a comma list of {', '.join(FRAMINGS)}.")
@click.option("--limit", type=int, default=None, help="Evaluate a seeded random sample of N prompts per set.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --limit sampling.")
@click.option("--system-prompt", default=None, help="System turn added through the chat template.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Most tokens generated per response (greedy); a longer answer is cut there before judging.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Prompts per generation / forward batch (lower it if memory runs out).")
@click.option("--device", default="auto", envvar=DEVICE_ENV, show_envvar=True, help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Run the checkpoint's own Python code (off by default).")
@click.option("--proxy/--no-proxy", default=True, show_default=True,
              help="Compute the refusal-margin proxy and its agreement with the judge.")
# repeatable rather than comma lists: the openings themselves contain commas ("I'm sorry, but")
@click.option("--refusal-opening", "refusal_openings", multiple=True, default=DEFAULT_REFUSAL_OPENINGS,
              show_default=True, help="A refusal opening for the margin (repeat the flag for several).")
@click.option("--compliance-opening", "compliance_openings", multiple=True, default=DEFAULT_COMPLIANCE_OPENINGS,
              show_default=True, help="A compliance opening for the margin (repeat the flag for several).")
@click.option("--lm-eval-tasks", default=None, help="Comma list of lm-evaluation-harness tasks (needs lm-eval).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
@click.option("--save-generations", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every prompt, response and verdict as JSONL.")
def eval_command(model: Path, harmful: str, benign: str, utility: Path | None, exact_match: bool,
                 field: str | None, column: str | None, category_column: str | None, judge: str,
                 judge_model: Path | None, guard_format: str | None, judge_base_url: str | None, engine: str,
                 base_url: str | None, api_key_env: str, concurrency: int, cache_dir: Path | None,
                 no_cache: bool, unsafe_labels: str | None, judge_input: str,
                 refusal_phrases: Path | None, tasks: str, limit: int | None, seed: int,
                 system_prompt: str | None, max_new_tokens: int, batch_size: int, device: str, dtype: str,
                 trust_remote_code: bool, proxy: bool, refusal_openings: tuple[str, ...],
                 compliance_openings: tuple[str, ...],
                 lm_eval_tasks: str | None, output: Path | None, save_generations: Path | None) -> None:
    """Measure unsafe-response rate, over-refusal and utility of MODEL (a local safetensors directory).

    \b
    mergekit-safe eval ./model --harmful builtin --benign builtin --utility data.jsonl -o report.json
    mergekit-safe eval ./model --harmful advbench.csv --column goal --judge keyword --tasks all
    mergekit-safe eval my-model --engine openai --base-url http://localhost:8000/v1 --judge keyword,guard \\
        --judge-model ./Llama-Guard-3-1B
    """
    # package errors become one "Error:" line in the CLI group (mergekit_safe.cli), the one place that does it;
    # every cheap input is validated before the (slow) model load
    device = str(resolve_device(device)) if engine != "openai" else device
    task_list = parse_tasks(tasks)
    opts = {"field": field, "column": column, "category_field": category_column}
    harmful_p = None if harmful == "none" else sample_prompts(load_prompts(harmful, kind="harmful", **opts),
                                                               limit, seed)
    benign_p = None if benign == "none" else sample_prompts(load_prompts(benign, kind="benign", **opts),
                                                             limit, seed)
    rows = sample_prompts(load_utility_rows(utility), limit, seed) if utility else None  # type: ignore[arg-type]
    names = judge_names(judge)
    if engine == "openai" and not base_url:
        raise EvalError("--engine openai needs --base-url (e.g. http://localhost:8000/v1)")
    judge_options: dict[str, Any] = {}
    if refusal_phrases:
        judge_options["phrases"] = load_phrases(refusal_phrases)
    if judge_model is not None or judge_base_url:
        judge_options.update(model_path=judge_model, unsafe_labels=_csv_list(unsafe_labels),
                             judge_input=judge_input, batch_size=batch_size, guard_format=guard_format,
                             device=device)
    if judge_base_url:
        judge_options["guard_backend"] = _served(judge_base_url, str(judge_model or ""), api_key_env,
                                                 concurrency, cache_dir, no_cache)
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                              system_prompt=system_prompt, progress=True)
    # the judge (and its label mapping) is checked before the slow model load
    built = [get_judge(n, **judge_options) for n in names]
    m, tok, backend = _engine(engine, model, base_url, api_key_env, concurrency, cache_dir, no_cache,
                              dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    report = evaluate(
        m, tok, harmful=harmful_p, benign=benign_p, utility=rows, judge=built[0], judge_options=judge_options,
        extra_judges=built[1:], tasks=task_list, config=config, proxy=proxy, backend=backend,
        refusal_openings=refusal_openings, compliance_openings=compliance_openings,
        exact_match_utility=exact_match, lm_eval_tasks=_csv_list(lm_eval_tasks) or (), model_name=str(model),
    )
    report.settings.update(limit=limit, seed=seed, dtype=dtype, engine=engine,
                           device=str(next(m.parameters()).device) if m is not None else base_url)
    if output:
        report.write_json(output)
    if save_generations:
        report.write_generations(save_generations)
    click.echo(report.table(), nl=False)


def _engine(engine: str, model: Path, base_url: str | None, api_key_env: str, concurrency: int,
            cache_dir: Path | None, no_cache: bool, **load: Any) -> tuple[Any, Any, GenerationBackend | None]:
    """``(model, tokenizer, backend)``: nothing is loaded for a served model; None backend means plain HF."""
    if engine == "openai":
        return None, None, _served(str(base_url), str(model), api_key_env, concurrency, cache_dir, no_cache)
    m, tok = load_model(model, **load)
    return m, tok, HFFastBackend(m, tok) if engine == "hf-fast" else None
