"""``mergekit-safe eval``: the click command; thin: parse flags, call the API, print and write the report."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_safe.eval.evaluate import evaluate
from mergekit_safe.eval.generate import GenerationConfig, load_model
from mergekit_safe.io.dtypes import DTYPES
from mergekit_safe.kernels import resolve_device
from mergekit_safe.kernels.runtime import DEVICE_ENV, DEVICE_HELP
from mergekit_safe.eval.judges import JUDGES, get_judge, load_phrases
from mergekit_safe.eval.prompts import FRAMINGS, load_prompts, parse_tasks, sample_prompts
from mergekit_safe.eval.proxy import DEFAULT_COMPLIANCE_OPENINGS, DEFAULT_REFUSAL_OPENINGS
from mergekit_safe.eval.utility import load_utility_rows


def _csv_list(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


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
@click.option("--judge", type=click.Choice(list(JUDGES)), default="keyword", show_default=True,
              help="; ".join(f"{s.name}: {s.description}" for s in JUDGES.values()))
@click.option("--judge-model", type=click.Path(file_okay=False, path_type=Path),
              help="Local sequence-classification model for --judge classifier.")
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
                 judge_model: Path | None, unsafe_labels: str | None, judge_input: str,
                 refusal_phrases: Path | None, tasks: str, limit: int | None, seed: int,
                 system_prompt: str | None, max_new_tokens: int, batch_size: int, device: str, dtype: str,
                 trust_remote_code: bool, proxy: bool, refusal_openings: tuple[str, ...],
                 compliance_openings: tuple[str, ...],
                 lm_eval_tasks: str | None, output: Path | None, save_generations: Path | None) -> None:
    """Measure unsafe-response rate, over-refusal and utility of MODEL (a local safetensors directory).

    \b
    mergekit-safe eval ./model --harmful builtin --benign builtin --utility data.jsonl -o report.json
    mergekit-safe eval ./model --harmful advbench.csv --column goal --judge keyword --tasks all
    """
    # package errors become one "Error:" line in the CLI group (mergekit_safe.cli), the one place that does it
    # validate every cheap input before the (slow) model load
    device = str(resolve_device(device))
    task_list = parse_tasks(tasks)
    opts = {"field": field, "column": column, "category_field": category_column}
    harmful_p = None if harmful == "none" else sample_prompts(load_prompts(harmful, kind="harmful", **opts),
                                                               limit, seed)
    benign_p = None if benign == "none" else sample_prompts(load_prompts(benign, kind="benign", **opts),
                                                             limit, seed)
    rows = sample_prompts(load_utility_rows(utility), limit, seed) if utility else None  # type: ignore[arg-type]
    judge_options: dict = {}
    if refusal_phrases:
        judge_options["phrases"] = load_phrases(refusal_phrases)
    if judge == "classifier":
        judge_options.update(model_path=judge_model, unsafe_labels=_csv_list(unsafe_labels),
                             judge_input=judge_input, batch_size=batch_size,
                             device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                              system_prompt=system_prompt, progress=True)
    # the judge (and its label mapping) is checked before the slow model load
    built_judge = get_judge(judge, **judge_options)
    m, tok = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    report = evaluate(
        m, tok, harmful=harmful_p, benign=benign_p, utility=rows, judge=built_judge, judge_options=judge_options,
        tasks=task_list, config=config, proxy=proxy,
        refusal_openings=refusal_openings, compliance_openings=compliance_openings,
        exact_match_utility=exact_match, lm_eval_tasks=_csv_list(lm_eval_tasks) or (), model_name=str(model),
    )
    report.settings.update(limit=limit, seed=seed, dtype=dtype, device=str(next(m.parameters()).device))
    if output:
        report.write_json(output)
    if save_generations:
        report.write_generations(save_generations)
    click.echo(report.table(), nl=False)
