"""The ``mergekit-safe`` command line: parse, call the API, print. Errors become one line and exit code 1."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
import yaml

from mergekit_safe import __version__
from mergekit_safe.errors import MergeKitSafeError, RecipeError
from mergekit_safe.eval.command import eval_command
from mergekit_safe.eval.judges import JUDGES
from mergekit_safe.eval.guard import GUARD_FORMATS
from mergekit_safe.merge.methods import METHODS
from mergekit_safe.merge.recipe import ModelSpec, Recipe, capped, load_recipe
from mergekit_safe.io.dtypes import OUTPUT_DTYPE_NAMES
from mergekit_safe.io.writer import parse_size
from mergekit_safe.kernels import BACKENDS, resolve_device, use_backend
from mergekit_safe.kernels.runtime import BACKEND_ENV, DEVICE_ENV, DEVICE_HELP
from mergekit_safe.repair.strategies import METHODS as REPAIR_METHODS


class _Group(click.Group):
    """A click group that turns package errors and interrupts into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MergeKitSafeError as e:
            # click prints "Error: <message>" on stderr and exits 1, the same as its own usage errors
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: no partial output was left behind", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-safe")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.option("--backend", type=click.Choice(BACKENDS, case_sensitive=False), default="auto", envvar=BACKEND_ENV,
              show_default=True, show_envvar=True,
              help="Kernel backend: auto (Triton on CUDA tensors, torch otherwise), or force torch / triton.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, backend: str) -> None:
    """Merge checkpoints, measure safety, and repair fine-tunes that lost it."""
    # the environment is read here, once (click reads the envvar), and the choice is scoped to this command
    ctx.with_resource(use_backend(backend))
    # A polite kill (SIGTERM) unwinds like Ctrl-C, so partial outputs are removed on the way out.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    handler = logging.StreamHandler()
    handler.setFormatter(_LowerLevelFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


class _LowerLevelFormatter(logging.Formatter):
    """``warning: message``: the same spelling as the warnings the commands print themselves."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--param {item!r}: expected NAME=VALUE, e.g. --param density=0.5")
        params[key.strip()] = yaml.safe_load(value)
    return params


def _device_option() -> Any:
    """``--device`` of the commands that compute; ``$MERGEKIT_SAFE_DEVICE`` sets its default (eval: same rule)."""
    return click.option("--device", default="auto", envvar=DEVICE_ENV, show_envvar=True, help=DEVICE_HELP)


def _output_options(f: Any) -> Any:
    opts = [
        click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
                     help="Output folder (created atomically)."),
        click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 2GB."),
        click.option("--dtype", type=click.Choice(OUTPUT_DTYPE_NAMES), default=None,
                     help="Output dtype [default: the inputs']."),
        _device_option(),
        click.option("--overwrite", is_flag=True,
                     help="Replace a previous mergekit-safe output at -o (any other existing folder is refused)."),
        click.option("--strict", is_flag=True, help="NaN/Inf in an input is an error, not a warning."),
        click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin weights (loaded weights_only)."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
        click.option("--to-gguf", type=click.Choice(["F16", "BF16", "Q8_0"]), default=None,
                     help="Also write OUTPUT/model-TYPE.gguf for llama.cpp (needs the gguf extra)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _vocab_options(f: Any) -> Any:
    """``--tokenizer-source`` and ``--chat-template`` of the commands that merge (YAML: the same keys)."""
    f = click.option("--chat-template", "chat_template", default=None, metavar="base|PATH",
                     help="Chat template of the output: base, or an input path [default: the tokenizer source's].")(f)
    return click.option("--tokenizer-source", "tokenizer_source", default=None, metavar="base|union|PATH",
                        help="Vocabulary and tokenizer of the output: base, union (every input's tokens, embedding "
                             "rows matched by token), or an input path [default: the method's config source].")(f)


def _with_vocab(recipe: Recipe, tokenizer_source: str | None, chat_template: str | None) -> Recipe:
    """The recipe with the command line's vocabulary options (they override the YAML's), validated.

    A path is matched to the input it names however it is spelled (``./ft/`` is ``ft``).
    """
    def named(value: str) -> str:
        same = [p for p in recipe.input_paths() if value not in ("base", "union") and Path(p) == Path(value)]
        return same[0] if same else value

    if tokenizer_source is not None:
        recipe.tokenizer_source = named(tokenizer_source)
    if chat_template is not None:
        recipe.chat_template = named(chat_template)
    return recipe.validate()


def _run(recipe: Recipe, output: Path, max_shard_size: str, dtype: str | None, device: str, overwrite: bool,
         strict: bool, allow_pickle: bool, no_progress: bool, to_gguf: str | None = None) -> None:
    from mergekit_safe.merge.engine import merge, merge_into

    if dtype:
        recipe.dtype = dtype
    try:
        shard = parse_size(max_shard_size)
    except ValueError as e:
        raise RecipeError(f"--max-shard-size {e}") from None
    kw: dict[str, Any] = dict(max_shard_size=shard, device=str(resolve_device(device)), strict=strict,
                              allow_pickle=allow_pickle, progress=not no_progress)
    gguf_note = ""
    if to_gguf:
        from mergekit_safe.io.gguf import publish_with_gguf

        result, gguf_file, notes = publish_with_gguf(lambda stage: merge_into(recipe, stage, **kw), output, to_gguf,
                                                     overwrite=overwrite,
                                                     inputs=[Path(p) for p in recipe.input_paths()])
        result.warnings += notes
        gguf_note = f"; GGUF: {gguf_file}"
    else:
        result = merge(recipe, output, overwrite=overwrite, **kw)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    gbs = result.bytes_written / max(result.seconds, 1e-9) / 1e9
    click.echo(f"wrote {output} ({result.tensors} tensors, {result.bytes_written / 1e9:.2f} GB, "
               f"{result.seconds:.1f} s, {gbs:.2f} GB/s){gguf_note}")


@main.command()
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option("--config", "config", type=click.Path(path_type=Path), help="YAML recipe (mergekit's fields).")
@click.option("--method", type=click.Choice(sorted(METHODS)), help="Merge method (without --config).")
@click.option("--alpha", type=float, help="lerp: fraction of the way to the fine-tune.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A method parameter for every model, e.g. -p density=0.5 -p t='[0, 0.5, 1]'.")
@_vocab_options
@_output_options
def merge(models: tuple[Path, ...], config: Path | None, method: str | None, alpha: float | None,
          params: tuple[str, ...], tokenizer_source: str | None, chat_template: str | None, **out: Any) -> None:
    """Merge checkpoints: MODELS are the base (for methods that take one) followed by the other models.

    \b
    mergekit-safe merge --method lerp --alpha 0.3 ./aligned ./finetuned -o ./merged
    mergekit-safe merge --config recipe.yml -o ./merged
    """
    if config is not None:
        if models or method:
            raise RecipeError("give either --config or --method with MODELS, not both")
        recipe = load_recipe(config)
    else:
        if not method:
            raise RecipeError(f"give --config recipe.yml or --method ({', '.join(sorted(METHODS))})")
        parameters = _parse_params(params)
        if alpha is not None:
            parameters["alpha"] = alpha
        paths = [str(m) for m in models]
        needs_base = METHODS[method].base == "required"
        if needs_base and len(paths) < 2:
            raise RecipeError(f"--method {method} needs the base model and at least one more model")
        base = paths[0] if needs_base else None
        recipe = Recipe(method, [ModelSpec(p) for p in (paths[1:] if needs_base else paths)], base_model=base,
                        parameters=parameters, source="command line").validate()
    _run(_with_vocab(recipe, tokenizer_source, chat_template), **out)


@main.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--beta", type=float, default=0.9, show_default=True, help="Decay per checkpoint.")
@click.option("--start", type=click.Path(path_type=Path), help="Start point e_0 (the aligned model) [default: c_0].")
@_vocab_options
@_output_options
def ema(checkpoints: tuple[Path, ...], beta: float, start: Path | None, tokenizer_source: str | None,
        chat_template: str | None, **out: Any) -> None:
    """Offline EMA over CHECKPOINTS: e_t = beta*e_(t-1) + (1-beta)*c_t.

    Trainer-style checkpoint-N folders are sorted by step N. A run that added tokens keeps them: the vocabulary
    is the last checkpoint's (--tokenizer-source to change it), earlier checkpoints' missing rows are filled
    by token (see README, "Tokenizers and vocabularies").

    \b
    mergekit-safe ema ./run/checkpoint-100 ./run/checkpoint-200 --beta 0.9 --start ./aligned -o ./ema
    """
    from mergekit_safe.io.reader import sort_checkpoints

    ordered = sort_checkpoints(list(checkpoints))
    recipe = Recipe("ema", [ModelSpec(str(p)) for p in ordered], base_model=str(start) if start else None,
                    parameters={"beta": beta}, source="command line").validate()
    _run(_with_vocab(recipe, tokenizer_source, chat_template), **out)


@main.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--top", type=int, default=20, show_default=True, help="Tensors to list, largest change first.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin weights (loaded weights_only).")
@_device_option()
def inspect(a: Path, b: Path, as_json: bool, top: int, allow_pickle: bool, device: str) -> None:
    """Where did B (a fine-tune) move the weights of A? Per tensor and per layer."""
    from mergekit_safe.merge.inspect import diff_checkpoints, per_layer, to_json

    diffs, only = diff_checkpoints(str(a), str(b), allow_pickle=allow_pickle, device=str(resolve_device(device)))
    if as_json:
        click.echo(json.dumps(to_json(diffs, only), indent=2))
        return
    click.echo(f"{'group':<16}{'tensors':>8}{'rel_delta':>12}{'min_cos':>10}{'max_abs':>12}")
    for row in per_layer(diffs):
        click.echo(f"{row['group']:<16}{row['tensors']:>8}{row['rel_delta']:>12.4g}{row['min_cosine']:>10.4f}"
                   f"{row['max_abs']:>12.4g}")
    click.echo("")
    key = lambda d: -d.rel_delta if math.isfinite(d.rel_delta) else 0.0  # noqa: E731
    click.echo(f"{'tensor':<48}{'rel_delta':>12}{'cosine':>10}{'max_abs':>12}  note")
    for d in sorted(diffs, key=key)[:top]:
        note = "" if d.shape_a == d.shape_b else f"shape {d.shape_a} -> {d.shape_b}"
        if d.dtype_a != d.dtype_b:
            note += f" dtype {d.dtype_a} -> {d.dtype_b}"
        click.echo(f"{d.name:<48}{d.rel_delta:>12.4g}{d.cosine:>10.4f}{d.max_abs:>12.4g}  {note}")
    for line in only:
        click.echo(line)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin inputs, as merge --allow-pickle would.")
def validate(recipe: Path, allow_pickle: bool) -> None:
    """Check a YAML recipe and its inputs without merging: every problem merge would stop at, listed at once."""
    from mergekit_safe.merge.check import check_recipe_file

    r, problems = check_recipe_file(recipe, allow_pickle=allow_pickle)
    if problems or r is None:
        raise RecipeError(capped(problems), str(recipe))
    click.echo(f"{recipe}: ok ({r.merge_method}, {len(r.input_paths())} inputs)")


@main.command("extract-lora")
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The base the adapter applies to.")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="The checkpoint to reproduce.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Adapter folder (atomic).")
@click.option("--rank", type=int, help="Fixed rank per module [default: 32 when no rule is given].")
@click.option("--energy", type=float, help="Per module, keep this fraction of the squared singular values.")
@click.option("--sv-threshold", type=float, help="Per module, keep singular values >= this fraction of the largest.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Adapter dtype [default: the model's].")
@click.option("--device", default="auto", envvar=DEVICE_ENV, show_envvar=True, help=DEVICE_HELP)
@click.option("--randomized/--full-svd", default=None,
              help="With --rank: seeded randomized SVD (fast) or the full SVD [default: randomized on cuda].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def extract_lora(base: Path, model: Path, output: Path, rank: int | None, energy: float | None,
                 sv_threshold: float | None, dtype: str | None, device: str, randomized: bool | None, seed: int,
                 overwrite: bool) -> None:
    """Write MODEL - BASE as a PEFT LoRA adapter (truncated SVD per linear module) plus an error report.

    \b
    mergekit-safe extract-lora --base ./aligned --model ./repaired --rank 16 -o ./repaired-lora
    mergekit-safe extract-lora --base ./aligned --model ./merged --energy 0.9 -o ./merged-lora
    """
    from mergekit_safe.merge.extract_lora import RankRule
    from mergekit_safe.merge.extract_lora import extract_lora as run_extract
    from mergekit_safe.merge.recipe import DTYPES

    if rank is None and energy is None and sv_threshold is None:
        rank = 32
    rule = RankRule(rank=rank, energy=energy, sv_threshold=sv_threshold)
    result = run_extract(base, model, output, rule, dtype=DTYPES[dtype] if dtype else None,
                         device=str(resolve_device(device)),
                         overwrite=overwrite, randomized=randomized, seed=seed)
    ranks = [m.rank for m in result.modules]
    click.echo(f"wrote {result.out_dir}: {len(ranks)} LoRA modules (rank {min(ranks, default=0)}.."
               f"{max(ranks, default=0)}), {len(result.modules_to_save)} modules saved whole, relative error "
               f"{result.relative_error:.3g}\nreport: {result.report_path}")


_STORAGE_HELP = ("Optuna storage URL, e.g. sqlite:///repair.db: the same command resumes an interrupted search "
                 "(completed trials are reused); workers given the same URL and --study-name share one study "
                 "(optuna's distributed mode; a PostgreSQL/MySQL URL across machines).")


@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The aligned model (HF folder).")
@click.option("--finetuned", required=True, type=click.Path(path_type=Path),
              help="The fine-tune: an HF folder or a PEFT LoRA adapter of --base.")
@click.option("--unaligned", type=click.Path(path_type=Path),
              help="The unaligned model, for --method safety_vector, safe_lora and safemerge (V = aligned - unaligned).")
@click.option("--harmful", default="builtin", show_default=True,
              help="Harmful prompts: builtin or a .txt/.jsonl/.csv file.")
@click.option("--benign", default="builtin", show_default=True,
              help="Benign prompts (over-refusal): builtin or a file.")
@click.option("--utility", type=click.Path(path_type=Path),
              help="Utility rows, .jsonl with prompt/response [default: the fine-tune's own answers to --benign].")
@click.option("--method", type=click.Choice(list(REPAIR_METHODS)), default="lerp", show_default=True,
              help="How a coefficient moves the model: " + "; ".join(f"{m.name}: {m.help}"
                                                                   for m in REPAIR_METHODS.values()) + ".")
@click.option("--groups", default="global", show_default=True,
              help="One coefficient per group: global, layers:K (K layer bands), modules, or layers:K,modules "
                   "(cross product).")
@click.option("--density", type=float, default=0.5, show_default=True, help="DARE / TIES density.")
@click.option("--trials", type=int, default=30, show_default=True, help="Most search trials.")
@click.option("--time-budget", type=float,
              help="Most seconds, counted from the start (reference evaluations included); the search stops there.")
@click.option("--keep-utility", type=float, default=0.95, show_default=True,
              help="Keep this fraction of the fine-tune's utility gain over the base (on --utility-metric).")
@click.option("--min-utility", type=float,
              help="Absolute utility bound instead: the task metric must be at least this (with nll: the NLL at "
                   "most this, nats/token).")
@click.option("--utility-metric", default="auto", show_default=True,
              help="Utility on generated answers: exact_match, numeric, or package.module:function (a scorer "
                   "(predictions, references) -> scores in [0, 1]); nll: teacher-forced NLL of the references; "
                   "auto: exact_match with --utility, nll of the fine-tune's own answers without.")
@click.option("--utility-limit", type=int, default=32, show_default=True,
              help="Utility rows generated per judged candidate (a seeded sample).")
@click.option("--max-over-refusal", type=float, help="Absolute bound on the refusal rate on benign prompts.")
@click.option("--over-refusal-slack", type=float, default=0.05, show_default=True,
              help="Without --max-over-refusal: over-refusal may exceed the fine-tune's by at most this.")
@click.option("--tasks", "tasks", default="none", show_default=True,
              help="Task framings the harmful prompts are also asked in: none, all, or a comma list "
                   "(translate, summarize, code, classify).")
@click.option("--framing-aggregate", type=click.Choice(["worst", "mean"]), default="worst", show_default=True,
              help="Unsafe rate over direct + framed prompts: the worst framing's, or pooled.")
@click.option("--harmful-limit", type=int, help="Use a seeded sample of this many harmful prompts.")
@click.option("--benign-limit", type=int, help="Use a seeded sample of this many benign prompts.")
@click.option("--proxy", type=click.Choice(["calibrated", "fixed"]), default="calibrated", show_default=True,
              help="Refusal-margin proxy: each prompt's own openings read off the references' answers "
                   "(calibrated), or fixed phrases.")
@click.option("--pareto", is_flag=True, help="Search the unsafe-rate / utility front (NSGA-II).")
@click.option("--storage", help=_STORAGE_HELP)
@click.option("--study-name", help="Study name in --storage [default: derived from the inputs and settings].")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Evaluator processes sharing the study and the --trials / --time-budget budget: one per GPU with "
                   "--device cuda, else CPU processes splitting the threads (needs several --groups or --pareto).")
@click.option("--judge", default="keyword", show_default=True,
              help="Judge of unsafe responses, or a comma list: the search optimises the first; the references and "
                   "the result are reported by every one, with their agreement (kappa). "
                   + "; ".join(f"{j.name}: {j.description}" for j in JUDGES.values()) + ".")
@click.option("--judge-model", type=click.Path(file_okay=False, path_type=Path),
              help="Local judge model folder (classifier, guard, harmbench-cls).")
@click.option("--guard-format", type=click.Choice(list(GUARD_FORMATS)),
              help="The guard judge's format [default: detected from --judge-model's config].")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Generation budget per prompt.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Prompts per forward batch.")
@click.option("--device", default="auto", envvar=DEVICE_ENV, show_envvar=True,
              help="Where the model runs and the final merge computes. "
              + DEVICE_HELP)
@click.option("--refusal-opening", "refusal_openings", multiple=True,
              help="Opening of a refusal for the cheap proxy (repeatable) [default: the eval defaults].")
@click.option("--compliance-opening", "compliance_openings", multiple=True,
              help="Opening of compliance for the cheap proxy (repeatable).")
@click.option("--as-adapter", is_flag=True, help="Write a repaired LoRA adapter (LoRA fine-tune, lerp).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler and DARE seed.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True,
              help="Replace a previous mergekit-safe output at -o (any other existing folder is refused).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def repair(output: Path, no_progress: bool, refusal_openings: tuple[str, ...], compliance_openings: tuple[str, ...],
           tasks: str, **opts: Any) -> None:
    """Repair a fine-tune's safety: search base + sum_g a_g * (finetuned - base) in memory, write the best.

    Minimises the unsafe rate on harmful prompts while keeping --keep-utility of the fine-tune's utility gain.
    Cheap signals (utility NLL, refusal margin) come first; generation only for candidates that can win.
    Writes the repaired checkpoint (or adapter), repair_report.json, repair_report.png and a model-card section.

    \b
    mergekit-safe repair --base ./aligned --finetuned ./released --utility task.jsonl -o ./repaired
    mergekit-safe repair --base ./aligned --finetuned ./lora-adapter --groups layers:3,modules --trials 40 -o ./repaired
    mergekit-safe repair ... --storage sqlite:///repair.db     # rerun the same command to resume
    mergekit-safe repair ... --groups layers:4 --workers 4 --device cuda   # 4 GPUs, one study
    """
    from mergekit_safe.repair.command import RepairConfig, metrics_table
    from mergekit_safe.repair.command import repair as run_repair

    from mergekit_safe.eval.prompts import parse_tasks

    cfg = RepairConfig(output=output, refusal_openings=refusal_openings or None,
                       compliance_openings=compliance_openings or None, tasks=tuple(parse_tasks(tasks)), **opts)
    result = run_repair(cfg, progress=not no_progress)
    _print_repair(result.report, metrics_table, result.output, result.report_path, result.plot_path)


def _print_repair(report: Any, table: Any, out: Path, report_path: Path, plot_path: Path) -> None:
    cost = report.cost
    click.echo(table(report.metrics))
    coeffs = ", ".join(f"{g}={v:.3f}" for g, v in report.chosen["coeffs"].items())
    click.echo(f"\nchosen ({report.strategy}): {coeffs}")
    click.echo(f"cost: {cost['trials']} trials ({cost['reused_trials']} reused), {cost['forward_runs']} forward-only "
               f"runs, {cost['generation_runs']} generation runs, {cost['wall_seconds']:.1f} s")
    click.echo(f"repaired model: {out}\nreport: {report_path}\nplot: {plot_path}")


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("mergekit_safe_demo"),
              show_default=True, help="Folder for the demo's repaired model, report and plot.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model organism and the search.")
@click.option("--trials", type=click.IntRange(min=1), default=60, show_default=True, help="Search trials.")
@click.option("--cache", type=click.Path(path_type=Path), help="Organism cache [default: $MERGEKIT_SAFE_CACHE or "
              "~/.cache/mergekit_safe/organism].")
@click.option("--device", default="auto", envvar=DEVICE_ENV, show_envvar=True,
              help="Where the repair runs; the organism builds on the CPU. "
              + DEVICE_HELP)
def demo(output: Path, seed: int, trials: int, cache: Path | None, device: str) -> None:
    """The whole repair on the built-in model organism (no download, a few minutes on 2 CPU cores).

    Builds (or reuses) a tiny aligned model and a benign fine-tune that lost its refusals, measures both, runs
    `mergekit-safe repair` on them and prints the before/after table and the report and plot paths.
    """
    import torch

    from mergekit_safe.organism.build import build_organism, default_cache_dir, is_built
    from mergekit_safe.repair.command import RepairConfig, metrics_table
    from mergekit_safe.repair.command import repair as run_repair

    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = cache or default_cache_dir()
    if is_built(root, seed):
        click.echo(f"using the cached model organism at {root}")
    else:
        click.echo(f"building the model organism in {root} (a few minutes; cached for the next run) ...")
    org = build_organism(root, seed=seed, progress=True)
    click.echo("measuring aligned and fine-tune, then searching the repair ...")
    cfg = RepairConfig(org.aligned, org.finetuned, output / "repaired", harmful=str(org.harmful),
                       benign=str(org.benign), utility=org.skill, groups="layers:2,modules", trials=trials,
                       seed=seed, max_new_tokens=16, batch_size=64, overwrite=True, keep_utility=0.85,
                       refusal_openings=("I'm sorry",), compliance_openings=("Sure", "Step"), device=device)
    result = run_repair(cfg, progress=True)
    click.echo("")
    _print_repair(result.report, metrics_table, result.output, result.report_path, result.plot_path)


main.add_command(eval_command, "eval")

if __name__ == "__main__":  # pragma: no cover
    main()
