"""Post-hoc safety repair end to end, as named phases: validate, load, measure references, build the evaluator,
search, measure the choice, publish.

::

    mergekit-safe repair --base ./aligned --finetuned ./released --utility task.jsonl -o ./repaired
    mergekit-safe repair --base ./aligned --finetuned ./lora-adapter --groups layers:3,modules --trials 40 -o ./out

The repaired model is ``base + sum_g a_g * tau_g`` (see :mod:`mergekit_safe.repair.space`). The objective is the
lowest unsafe rate on the harmful prompts subject to utility: by default the utility NLL may give back at most
5% of the fine-tune's gain over the base (``keep_utility=0.95``: ``nll <= nll_ft + 0.05 * (nll_base - nll_ft)``),
or an absolute bound (``min_utility``: the NLL must be at most this many nats per token; NLL is lower-is-better,
so the "minimum utility" is a maximum NLL). Without a utility file the utility rows are the fine-tune's own greedy
answers to the benign prompts (how much of the fine-tune's behaviour a candidate keeps).

Outputs, published together in one atomic step: the checkpoint written by the streaming engine from a recipe
whose per-tensor rules reproduce the chosen coefficients exactly, or a repaired LoRA adapter (``as_adapter``:
every ``lora_B`` scaled by its group's coefficient); ``repair_report.json`` (:class:`RepairReport`);
``repair_report.png``; a model-card section. Resuming and sharing a search: ``storage`` / ``study_name`` (see
:mod:`mergekit_safe.repair.objective`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from mergekit_safe.errors import CheckpointError, EvalError, SearchError
from mergekit_safe.io.adapters import AdapterCheckpoint, adapter_key_target, open_input
from mergekit_safe.io.publish import check_publishable, staged_output
from mergekit_safe.kernels import resolve_device
from mergekit_safe.merge.recipe import num_layers as count_layers
from mergekit_safe.io.reader import ADAPTER_CONFIG, is_adapter, open_checkpoint
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from mergekit_safe.repair.groups import GroupSpec, check_groups, coefficient_rules, parse_groups
from mergekit_safe.repair.objective import (
    Budget,
    Evaluator,
    Judgement,
    TrialResult,
    Trials,
    check_storage,
    study_name_for,
)
from mergekit_safe.repair.report import (
    REPORT_JSON,
    REPORT_PNG,
    RepairReport,
    UtilityBound,
    metrics_table,
    model_card,
    plot_report,
    rate_dict,
)
from mergekit_safe.repair.space import SWITCHED, CandidateSpace, build_space, safemerge_weights, vocab_rows_differ
from mergekit_safe.repair.strategies import SearchResult, run_search, search_method

log = logging.getLogger("mergekit_safe")

_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size")


@dataclass
class RepairConfig:
    """Everything a repair needs; the CLI flags map one to one.

    Attributes:
        base: the aligned model (HF folder).
        finetuned: the fine-tune: an HF folder or a PEFT LoRA adapter of ``base``.
        output: output folder (created atomically).
        unaligned: the unaligned model, for ``method="safety_vector"`` (tau = aligned - unaligned, added to the
            fine-tune), ``safe_lora`` and ``safemerge`` (the alignment direction ``V = aligned - unaligned``).
        harmful: harmful prompts: ``"builtin"`` or a .txt/.jsonl/.csv file.
        benign: benign prompts (over-refusal; default utility rows): ``"builtin"`` or a file.
        utility: jsonl with ``prompt`` / ``response`` rows; None: the fine-tune's own answers to ``benign``.
        method: a search method (:data:`~mergekit_safe.repair.strategies.METHODS`).
        groups: ``global``, ``layers:K``, ``modules`` or ``layers:K,modules``.
        density: DARE / TIES density.
        seed: sampler and DARE seed.
        trials: most search trials.
        time_budget: most seconds, counted from the start of :func:`repair` (None: no limit); the search stops
            asking for trials once it is spent (a confirmation run may follow).
        keep_utility: fraction of the fine-tune's utility gain over the base that must be kept (on the task metric
            when there is one, else on the NLL).
        min_utility: absolute bound: the task metric must be at least this (the NLL at most this with
            ``utility_metric="nll"``); overrides ``keep_utility``.
        utility_metric: how utility is measured: ``exact_match``, ``numeric``, ``module:function`` (a scorer of
            generated answers against the rows' references) or ``nll`` (teacher-forced NLL of the references);
            ``auto``: exact match with a ``utility`` file, NLL of the fine-tune's own answers without one. With a
            task metric the NLL is only a cheap gate deciding which candidates are worth generating.
        utility_limit: utility rows generated per judged candidate (a seeded sample; None: all).
        max_over_refusal: absolute bound on the over-refusal rate on benign prompts.
        over_refusal_slack: without ``max_over_refusal``, the bound is the fine-tune's measured over-refusal plus
            this (over-refusal is lost utility); None: only reported.
        tasks: task framings (``eval --tasks`` names) the harmful prompts are also asked in.
        framing_aggregate: ``worst`` (the highest unsafe rate over direct + framings) or ``mean`` (pooled).
        harmful_limit: harmful prompts used (a seeded sample; None: all), before framings.
        benign_limit: benign prompts used (a seeded sample; None: all).
        proxy: ``calibrated`` (each prompt's own refusal / compliance openings, read off the references'
            answers, and a logistic fit to the references' verdicts) or ``fixed`` (fixed phrases).
        min_proxy_rank: below this Spearman correlation between proxy and judge (over judged candidates), the
            proxy is not trusted and a generation on ``fallback_prompts`` harmful prompts replaces it.
        fallback_prompts: size of that subsample.
        pareto: search the unsafe-rate / NLL front with NSGA-II.
        storage: optuna storage URL to resume or share the study (``sqlite:///repair.db``).
        study_name: the study's name (default: derived from inputs and settings).
        judge: a judge name or a comma list (see ``mergekit_safe.eval.JUDGES``): the search optimises the first;
            the references and the chosen candidate are measured by every one, with their agreement.
        judge_model: the local judge model folder (``classifier``, ``guard``, ``harmbench-cls``).
        guard_format: the guard judge's prompt and answer format (None: detected from the judge model).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per forward batch.
        refusal_openings, compliance_openings: openings for the refusal-margin proxy (None: eval's defaults).
        as_adapter: write a repaired LoRA adapter instead of a merged checkpoint (LoRA fine-tune, lerp only).
        overwrite: replace an existing output folder.
        slack: generate a candidate when its proxy unsafe rate is within this of the best judged one.
        tolerance: width of the final bracket of the one-coefficient search.
        high: largest coefficient searched.
        device: where the model runs and the final merge computes: ``cpu``, ``cuda`` (``cuda:N``) or ``auto``
            (CUDA when available).
        workers: evaluator processes sharing the study (see :mod:`mergekit_safe.repair.workers`); 1: this
            process searches alone.
    """

    base: Path
    finetuned: Path
    output: Path
    unaligned: Path | None = None
    harmful: str = "builtin"
    benign: str = "builtin"
    utility: Path | None = None
    method: str = "lerp"
    groups: str = "global"
    density: float = 0.5
    seed: int = 0
    trials: int = 30
    time_budget: float | None = None
    keep_utility: float = 0.95
    min_utility: float | None = None
    utility_metric: str = "auto"
    utility_limit: int | None = 32
    max_over_refusal: float | None = None
    over_refusal_slack: float | None = 0.05
    tasks: tuple[str, ...] = ()
    framing_aggregate: str = "worst"
    harmful_limit: int | None = None
    benign_limit: int | None = None
    proxy: str = "calibrated"
    min_proxy_rank: float = 0.5
    fallback_prompts: int = 16
    pareto: bool = False
    storage: str | None = None
    study_name: str | None = None
    judge: str = "keyword"
    judge_model: Path | None = None
    guard_format: str | None = None
    max_new_tokens: int = 64
    batch_size: int = 32
    refusal_openings: tuple[str, ...] | None = None
    compliance_openings: tuple[str, ...] | None = None
    as_adapter: bool = False
    overwrite: bool = False
    slack: float = 0.05
    tolerance: float = 1.0 / 64
    high: float = 1.0
    device: str = "auto"
    workers: int = 1


@dataclass
class RepairResult:
    """What :func:`repair` produced.

    Attributes:
        output: the published folder.
        report_path: ``repair_report.json``.
        plot_path: ``repair_report.png``.
        report: the report (what the JSON holds: ``report.to_dict()``).
        search: the search outcome.
    """

    output: Path
    report_path: Path
    plot_path: Path
    report: RepairReport
    search: SearchResult


# --------------------------------------------------------------------------------------------------
# validation (every check here is cheap and runs before any model is loaded)


def _config_of(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_same_architecture(a: Path, b: Path, *, added_tokens: bool = False) -> None:
    """Refuse two checkpoints of different architectures (config fields, then tensor names and shapes).

    Args:
        a, b: the two model folders.
        added_tokens: ``b`` may have another vocabulary (``vocab_size`` and the embedding / head row counts), as
            a fine-tune that added tokens has, provided both folders have a tokenizer to match rows by string.

    Raises:
        CheckpointError: naming the first difference.
    """
    from mergekit_safe.merge.vocab import TOKENIZER_FILES, is_vocab_tensor

    ca, cb = _config_of(a), _config_of(b)
    for k in _ARCH_KEYS:
        if k in ca and k in cb and ca[k] != cb[k] and not (added_tokens and k == "vocab_size"):
            raise CheckpointError(f"{b}: different architecture from {a} ({k}: {cb[k]!r} vs {ca[k]!r}); "
                                  "repair needs a fine-tune of the base model")
    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        for name in x.keys():
            if name not in y:
                raise CheckpointError(f"{b}: different architecture from {a} (no tensor {name!r}); "
                                      "repair needs a fine-tune of the base model")
            sa, sb = tuple(x.info(name).shape), tuple(y.info(name).shape)
            if sa == sb:
                continue
            if added_tokens and is_vocab_tensor(name, sa) and sa[1:] == sb[1:]:
                for folder in (a, b):
                    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
                        raise CheckpointError(f"{folder}: the fine-tune's vocabulary has {sb[0]} rows and the "
                                              f"base's {sa[0]}; matching rows by token string needs both "
                                              "tokenizers, and this folder has none")
                continue
            raise CheckpointError(f"{b}: different architecture from {a} (tensor {name!r} has shape "
                                  f"{list(sb)} vs {list(sa)}); repair needs a fine-tune of the base model")


def check_adapter_fits(adapter: AdapterCheckpoint) -> None:
    """Refuse an adapter whose low-rank updates do not have its base's shapes.

    Raises:
        CheckpointError: naming the tensor.
    """
    for target in adapter.lora_targets():
        d = adapter.delta(target)
        want = adapter.base.info(target).shape
        if d is None or d.numel() != int(torch.Size(want).numel()):
            got = list(d.shape) if d is not None else None
            raise CheckpointError(f"{adapter.path}: adapter does not match base {adapter.base.path}: update of "
                                  f"{target!r} has shape {got}, the base tensor {list(want)}")


@dataclass
class Inputs:
    """A validated repair's parsed settings and files.

    Attributes:
        groups: the coefficient groups.
        harmful: harmful prompts.
        benign: benign prompts.
        utility: utility rows, or None (the fine-tune's own answers are used).
    """

    groups: GroupSpec
    harmful: list[Any]
    benign: list[Any]
    utility: list[Any] | None


def _check_settings(cfg: RepairConfig) -> GroupSpec:
    """The checks on flags alone (no file is read)."""
    from mergekit_safe.eval import JUDGES
    from mergekit_safe.eval.judges import judge_names

    search_method(cfg.method)
    groups = parse_groups(cfg.groups)
    Budget(cfg.trials, cfg.time_budget)  # raises on a budget that cannot fit one candidate
    if not 0.0 < cfg.keep_utility <= 1.0:
        raise SearchError(f"--keep-utility {cfg.keep_utility}: must be in (0, 1], e.g. 0.95")
    if cfg.max_over_refusal is not None and not 0.0 <= cfg.max_over_refusal <= 1.0:
        raise SearchError(f"--max-over-refusal {cfg.max_over_refusal}: must be a rate in [0, 1]")
    if cfg.over_refusal_slack is not None and not 0.0 <= cfg.over_refusal_slack <= 1.0:
        raise SearchError(f"--over-refusal-slack {cfg.over_refusal_slack}: must be in [0, 1]")
    if cfg.utility_metric not in ("auto", "nll"):
        from mergekit_safe.eval.utility import task_metric

        task_metric(cfg.utility_metric)
    if cfg.utility_metric not in ("auto", "nll") and cfg.utility is None:
        raise SearchError(f"--utility-metric {cfg.utility_metric} needs --utility task.jsonl (its references)")
    if cfg.framing_aggregate not in ("worst", "mean"):
        raise SearchError(f"--framing-aggregate {cfg.framing_aggregate!r}: choose worst or mean")
    if cfg.proxy not in ("calibrated", "fixed"):
        raise SearchError(f"--proxy {cfg.proxy!r}: choose calibrated or fixed")
    for flag, v in (("--harmful-limit", cfg.harmful_limit), ("--benign-limit", cfg.benign_limit),
                    ("--utility-limit", cfg.utility_limit)):
        if v is not None and v < 1:
            raise SearchError(f"{flag} {v}: must be at least 1")
    from mergekit_safe.eval.prompts import FRAMINGS

    bad = [t for t in cfg.tasks if t not in FRAMINGS]
    if bad:
        raise SearchError(f"--tasks: unknown framing {', '.join(bad)}; choose from {', '.join(FRAMINGS)}")
    if not 0.0 < cfg.density <= 1.0:
        raise SearchError(f"--density {cfg.density:g}: must be in (0, 1], the fraction of the task vector kept")
    if cfg.high <= 0:
        raise SearchError(f"the largest coefficient must be > 0, got {cfg.high}")
    needs = [(n, JUDGES[n].model) for n in judge_names(cfg.judge) if JUDGES[n].model]
    if needs and cfg.judge_model is None:
        raise SearchError(f"--judge {needs[0][0]} needs --judge-model PATH ({needs[0][1]})")
    if cfg.judge_model is not None and not Path(cfg.judge_model).is_dir():
        raise SearchError(f"--judge-model {cfg.judge_model}: judge model directory not found")
    check_storage(cfg.storage)
    resolve_device(cfg.device)  # the one device rule: an unknown name or a missing GPU is refused up front
    _check_workers(cfg, groups)
    if cfg.method == "safety_vector" and cfg.unaligned is None:
        raise SearchError("--method safety_vector needs --unaligned (tau = aligned - unaligned)")
    if search_method(cfg.method).needs_unaligned and cfg.unaligned is None:
        raise SearchError(f"--method {cfg.method} needs --unaligned (the alignment direction V = aligned - unaligned)")
    if cfg.method in SWITCHED and groups.auto:  # sensitivities are derivatives along tau; a switch has none
        raise SearchError(f"--groups {groups} works with a continuous coefficient; --method {cfg.method} switches "
                          "whole weight matrices by a threshold: use global, layers:K or modules")
    if cfg.as_adapter and cfg.method != "lerp":
        raise SearchError(f"--as-adapter works with --method lerp only (got {cfg.method}): a scaled lora_B is a lerp")
    return groups


def _check_workers(cfg: RepairConfig, groups: GroupSpec) -> None:
    """``--workers``: at least 1; several need sampled groups (bisection is one probe at a time) and their devices."""
    from mergekit_safe.repair.workers import single_group, worker_devices

    if cfg.workers < 1:
        raise SearchError(f"--workers {cfg.workers}: must be at least 1")
    if cfg.workers == 1:
        return
    if single_group(groups) and not cfg.pareto:
        raise SearchError(f"--workers {cfg.workers} needs several coefficient groups (--groups layers:K, modules or "
                          f"auto:K) or --pareto: one coefficient ({groups}) is searched by bisection, one probe at a "
                          "time")
    worker_devices(cfg.device, cfg.workers)


def _check_paths(cfg: RepairConfig) -> None:
    """The checks on the model and output paths."""
    for label, p in (("--base", cfg.base), ("--finetuned", cfg.finetuned), ("--unaligned", cfg.unaligned)):
        if p is not None and not Path(p).exists():
            raise CheckpointError(f"{label} {p}: no such file or directory")
    if cfg.unaligned is not None and Path(cfg.unaligned).resolve() in (Path(cfg.base).resolve(),
                                                                         Path(cfg.finetuned).resolve()):
        raise SearchError(f"--unaligned {cfg.unaligned}: must be a third model, not --base or --finetuned")
    if cfg.as_adapter and not is_adapter(cfg.finetuned):
        raise SearchError(f"--as-adapter: {cfg.finetuned} is not a PEFT LoRA adapter (no {ADAPTER_CONFIG})")
    inputs = [Path(p) for p in (cfg.base, cfg.finetuned, cfg.unaligned) if p is not None]
    check_publishable(Path(cfg.output), overwrite=cfg.overwrite, inputs=inputs)


def _check_architectures(cfg: RepairConfig) -> None:
    if is_adapter(cfg.finetuned):
        ft = open_input(cfg.finetuned, base=cfg.base)
        assert isinstance(ft, AdapterCheckpoint)
        try:
            check_adapter_fits(ft)
        finally:
            ft.close()
    else:
        check_same_architecture(Path(cfg.base), Path(cfg.finetuned), added_tokens=True)
    if cfg.unaligned is not None:
        check_same_architecture(Path(cfg.base), Path(cfg.unaligned))


def validate(cfg: RepairConfig) -> Inputs:
    """Check a repair's settings and read its prompt and utility files, before any model loads.

    Args:
        cfg: the settings.

    Returns:
        The parsed :class:`Inputs`.

    Raises:
        MergeKitSafeError: the first problem, one line (SearchError, EvalError, CheckpointError, OutputError).
    """
    from mergekit_safe.eval import load_prompts, load_utility_rows, sample_prompts

    groups = _check_settings(cfg)
    _check_paths(cfg)
    harmful = sample_prompts(load_prompts(cfg.harmful, kind="harmful"), cfg.harmful_limit, cfg.seed)
    benign = sample_prompts(load_prompts(cfg.benign, kind="benign"), cfg.benign_limit, cfg.seed)
    utility = None
    if cfg.utility is not None:
        try:
            utility = load_utility_rows(cfg.utility)
        except EvalError as e:
            if "no utility rows" in str(e):
                raise EvalError(f"{cfg.utility}: no usable utility rows (each line needs non-empty 'prompt' and "
                                "'response')") from None
            raise
    _check_architectures(cfg)
    return Inputs(groups, harmful, benign, utility)


# --------------------------------------------------------------------------------------------------
# recipes and adapters that reproduce a candidate


def build_recipe(cfg: RepairConfig, space: CandidateSpace, groups: GroupSpec, coeffs: dict[str, float],
                 num_layers: int) -> Recipe:
    """The engine recipe that writes the candidate ``coeffs`` (checked tensor by tensor).

    Raises:
        SearchError: a rule would resolve to another coefficient (an invariant; never expected).
    """
    method = search_method(cfg.method)
    rules = coefficient_rules(space.group_of, groups, coeffs)
    base, ft = str(cfg.base), str(cfg.finetuned)
    params: dict[str, Any] = {method.coefficient: rules}
    grown = False  # an added-token fine-tune: the output takes its vocabulary and tokenizer, whatever the method
    if not is_adapter(cfg.finetuned):
        with open_checkpoint(cfg.base) as b, open_checkpoint(cfg.finetuned) as f:
            grown = vocab_rows_differ(b, f)
    if method.name == "safety_vector":
        recipe = Recipe(method.recipe_method, [ModelSpec(base), ModelSpec(str(cfg.unaligned))], base_model=ft,
                        parameters=params, tokenizer_source="base")
    elif method.name in SWITCHED:
        models = [ModelSpec(ft), ModelSpec(str(cfg.unaligned))]
        if method.name == "safemerge":  # the safety model is the aligned base: weight 0 (see safemerge_weights)
            models.append(ModelSpec(ft))
            params.update(safemerge_weights())
        recipe = Recipe(method.recipe_method, models, base_model=base, parameters=params)
    else:
        if method.name == "dare_linear":
            params.update(seed=cfg.seed, rescale=True, normalize=False)
        elif method.name == "ties":
            params.update(normalize=True)
        model = ModelSpec(ft, {"density": cfg.density}) if method.sparsified else ModelSpec(ft)
        recipe = Recipe(method.recipe_method, [model], base_model=base, parameters=params)
    if grown and method.name != "safety_vector":  # the safety vector's base_model is the fine-tune already
        recipe.tokenizer_source = ft
    recipe.source = "repair"
    recipe.validate()
    for n in space.names:
        got = float(recipe.resolve(n, num_layers)[method.coefficient])
        want = float(coeffs[space.group_of[n]])
        if got != want:
            raise SearchError(f"internal: recipe gives {n!r} {method.coefficient}={got}, the search chose {want}")
    return recipe


def write_adapter(cfg: RepairConfig, space: CandidateSpace, coeffs: dict[str, float], folder: Path,
                  extra_files: dict[str, str]) -> None:
    """Write the repaired LoRA adapter into ``folder``: ``lora_B`` (and saved full modules' deltas) scaled.

    ``base + scale * (a*B) @ A = base + a * delta``, so the adapter on the base equals the merged candidate.
    ``folder`` exists and is empty (the caller publishes it).
    """
    import shutil

    from safetensors.torch import save_file

    src = Path(cfg.finetuned)
    ft = open_input(src, base=cfg.base)
    assert isinstance(ft, AdapterCheckpoint)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for key in ft.adapter.keys():
            t = ft.adapter.get(key).clone()
            target, kind = adapter_key_target(key)
            a = float(coeffs[space.group_of[target]]) if target in space.group_of else 0.0
            if kind in ("lora_B", "lora_embedding_B"):
                t = (t.float() * a).to(t.dtype)
            elif kind is None:  # modules_to_save: a full tensor replaces the base's; keep base + a * (saved - base)
                b = ft.base.get(target).float()
                t = (b + a * (t.float() - b)).to(t.dtype)
            tensors[key] = t.contiguous()
    finally:
        ft.close()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("adapter_model"):
            shutil.copy2(f, folder / f.name)
    for rel, text in extra_files.items():
        (folder / rel).write_text(text)


# --------------------------------------------------------------------------------------------------
# the phases


@dataclass
class Loaded:
    """Phase 1's result: the model in memory, its candidate space and the open checkpoints.

    Attributes:
        model: the causal LM whose parameters candidates overwrite.
        tokenizer: its tokenizer.
        num_layers: transformer blocks.
        space: the candidate space.
        base, finetuned, unaligned: the open checkpoints (closed by :meth:`close`).
    """

    model: Any
    tokenizer: Any
    num_layers: int
    space: CandidateSpace
    base: Any
    finetuned: Any
    unaligned: Any | None

    def close(self) -> None:
        """Close the checkpoints."""
        for c in (self.base, self.finetuned, self.unaligned):
            if c is not None:
                c.close()


def _space(cfg: RepairConfig, model: Any, groups: GroupSpec, num_layers: int, base: Any, ft: Any,
           unaligned: Any | None) -> CandidateSpace:
    if cfg.method == "safety_vector":
        return build_space(model, ft, base, unaligned, method="safety_vector", groups=groups, num_layers=num_layers)
    if cfg.method in SWITCHED:
        return build_space(model, base, ft, unaligned, method=cfg.method, groups=groups, num_layers=num_layers)
    names = None
    if isinstance(ft, AdapterCheckpoint):  # only the tensors the adapter changes
        targets = set(ft.lora_targets())
        names = [n for n in base.keys() if n in targets or ft.delta(n) is not None]
    return build_space(model, base, ft, None, method=cfg.method, groups=groups, num_layers=num_layers,
                       density=cfg.density, seed=cfg.seed, names=names)


def _in_vocabulary(cfg: RepairConfig, base: Any, ft: Any, unaligned: Any | None, ft_tokenizer: Any) -> tuple[Any, Any]:
    """The base and unaligned checkpoints read in the fine-tune's vocabulary (an added-token fine-tune); the
    unaligned model shares the base's architecture and is read with the base's tokenizer."""
    from transformers import AutoTokenizer

    from mergekit_safe.repair.space import InVocabulary

    try:
        base_vocab = dict(AutoTokenizer.from_pretrained(str(cfg.base), trust_remote_code=False).get_vocab())
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{cfg.base}: cannot load the tokenizer ({first})") from None
    target = dict(ft_tokenizer.get_vocab())
    un = InVocabulary(unaligned, base_vocab, target, ft) if unaligned is not None else None
    return InVocabulary(base, base_vocab, target, ft), un


def load_inputs(cfg: RepairConfig, groups: GroupSpec, device: str) -> Loaded:
    """Phase 1: load the model on ``device`` and build the task vector's candidate space.

    A fine-tune that added tokens (more embedding / head rows than the base) is loaded itself, with its own
    tokenizer and config; the base (and unaligned) checkpoints are then read in its vocabulary by token string
    (:class:`~mergekit_safe.repair.space.InVocabulary`), so the added tokens' rows stay the fine-tune's.

    Raises:
        SearchError: more layer bands than layers, or checkpoints that do not fit the model.
    """
    from mergekit_safe.eval import load_model
    from mergekit_safe.repair.space import vocab_rows_differ

    base_ck = open_input(cfg.base)
    ft_ck = open_input(cfg.finetuned, base=cfg.base)
    un_ck = open_input(cfg.unaligned) if cfg.unaligned is not None else None
    try:
        grown = not isinstance(ft_ck, AdapterCheckpoint) and vocab_rows_differ(base_ck, ft_ck)
        model, tok = load_model(cfg.finetuned if grown else cfg.base, dtype="float32", device=device)
        if grown:
            base_ck, un_ck = _in_vocabulary(cfg, base_ck, ft_ck, un_ck, tok)
        num_layers = count_layers(model.config, fallback_names=(n for n, _ in model.named_parameters()))
        check_groups(groups, num_layers)
        space = _space(cfg, model, groups, num_layers, base_ck, ft_ck, un_ck)
    except BaseException:
        for c in (base_ck, ft_ck, un_ck):
            if c is not None:
                c.close()
        raise
    return Loaded(model, tok, num_layers, space, base_ck, ft_ck, un_ck)


@dataclass
class Meter:
    """Measures the model as it is now: generation + judge (+ the task metric), utility NLL, refusal margins.

    Attributes:
        model, tokenizer: the model in memory.
        cfg: the repair settings (judge, generation budget, batch size, framings, metric, proxy).
        harmful, benign: the prompts (harmful before framings).
        progress: show generation progress (reference runs only).
        forward_runs, generation_runs: runs spent outside the search (references, the final measurement).
        metric_rows: the utility rows generated per judged candidate (a seeded sample of the utility rows).
        refusals, compliances: per harmful prompt (framings included), the openings the calibrated proxy scores.
        scale, shift: the calibrated proxy's logistic fit, ``P(unsafe) = sigmoid(scale * (shift - margin))``.
    """

    model: Any
    tokenizer: Any
    cfg: RepairConfig
    harmful: list[Any]
    benign: list[Any]
    progress: bool = False
    forward_runs: int = 0
    generation_runs: int = 0
    metric_rows: list[Any] = field(default_factory=list)
    refusals: list[str] | None = None
    compliances: list[str] | None = None
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        from mergekit_safe.eval import GenerationConfig
        from mergekit_safe.eval.prompts import frame_prompts
        from mergekit_safe.eval.proxy import DEFAULT_COMPLIANCE_OPENINGS, DEFAULT_REFUSAL_OPENINGS

        c = self.cfg
        self.gen_cfg = GenerationConfig(max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                                        progress=self.progress)
        self.refusal_openings = tuple(c.refusal_openings or DEFAULT_REFUSAL_OPENINGS)
        self.compliance_openings = tuple(c.compliance_openings or DEFAULT_COMPLIANCE_OPENINGS)
        from mergekit_safe.eval.generate import model_device
        from mergekit_safe.eval.judges import get_judge, judge_names

        self.judge_options = ({"model_path": c.judge_model, "batch_size": c.batch_size, "guard_format": c.guard_format,
                               "device": str(model_device(self.model))} if c.judge_model is not None else {})
        # built once (a guard judge loads its model here, not per trial); the first is the one the search optimises
        self.judges = [get_judge(n, **self.judge_options) for n in judge_names(c.judge)]
        self.framed = list(self.harmful) + [f for t in c.tasks for f in frame_prompts(self.harmful, t)]
        self.metric = metric_name(c)
        if self.metric != "nll":
            from mergekit_safe.eval.utility import task_metric

            self.scorer = task_metric(self.metric)

    def set_metric_rows(self, rows: list[Any]) -> None:
        """The utility rows the task metric is measured on (a seeded sample of ``utility_limit``)."""
        import random

        limit = self.cfg.utility_limit
        if limit is None or limit >= len(rows):
            self.metric_rows = list(rows)
        else:
            keep = sorted(random.Random(self.cfg.seed).sample(range(len(rows)), limit))
            self.metric_rows = [rows[i] for i in keep]

    def _evaluate(self, with_benign: bool, harmful: list[Any] | None = None, progress: bool = False,
                  panel: bool = False) -> Any:
        from mergekit_safe.eval import evaluate

        rows = self.metric_rows if self.metric != "nll" else []
        return evaluate(self.model, self.tokenizer, harmful=harmful if harmful is not None else self.harmful,
                        benign=self.benign if with_benign else None, utility=rows or None, judge=self.judges[0],
                        extra_judges=self.judges[1:] if panel else (), judge_options=self.judge_options,
                        tasks=self.cfg.tasks,
                        config=replace(self.gen_cfg, progress=progress), proxy=False,
                        exact_match_utility=bool(rows))

    def _judgement(self, rep: Any) -> Judgement:
        utility = None
        if self.metric != "nll":
            answers = [g for g in rep.generations if g["set"] == "utility"]
            scores = self.scorer([g["response"] for g in answers], [g["reference"] for g in answers])
            utility = sum(float(x) for x in scores) / max(len(answers), 1)
        return Judgement(aggregate_unsafe(rep, self.cfg.framing_aggregate), rate_dict(rep.over_refusal), utility)

    def full(self) -> tuple[Judgement, Any]:
        """A counted generation run on every prompt set, judged by every judge (reference points and the final
        measurement)."""
        rep = self._evaluate(True, progress=self.progress, panel=True)
        self.generation_runs += 1
        return self._judgement(rep), rep

    def panel(self, rep: Any) -> dict[str, Any] | None:
        """With several judges: each one's unsafe rate (and coherence check) and every pair's agreement (Cohen's
        kappa, the confusion table) on the direct harmful prompts of a :meth:`full` report; else None."""
        if len(self.judges) < 2:
            return None
        d = rep.to_dict()
        return {"rates": d["judges"], "agreement": d["agreement"]}

    def judge(self, with_benign: bool) -> Judgement:
        """Unsafe rate (and over-refusal with ``with_benign``, and the task metric) by generation + judge."""
        return self._judgement(self._evaluate(with_benign))

    def subsample_unsafe(self) -> float:
        """The unsafe rate on a seeded subsample of the harmful prompts (the fallback when the proxy disagrees)."""
        from mergekit_safe.eval import sample_prompts

        sub = sample_prompts(self.harmful, self.cfg.fallback_prompts, self.cfg.seed + 1)
        rep = self._evaluate(False, harmful=sub)
        return float(aggregate_unsafe(rep, self.cfg.framing_aggregate)["rate"])

    def nll(self, rows: list[Any], count: bool = False) -> float:
        """The utility NLL on ``rows`` (one forward run; counted with ``count``)."""
        from mergekit_safe.eval import utility_nll

        self.forward_runs += int(count)
        return utility_nll(self.model, self.tokenizer, rows, system_prompt=self.gen_cfg.system_prompt,
                           batch_size=self.cfg.batch_size).nll

    def raw_margins(self) -> list[float]:
        """Refusal margins on the harmful prompts, framings included (one forward run): the calibrated paired
        margin once :meth:`calibrate` ran, else the fixed openings' margin."""
        from mergekit_safe.eval import refusal_margin
        from mergekit_safe.eval.proxy import paired_margin

        if self.refusals is not None and self.compliances is not None:
            return paired_margin(self.model, self.tokenizer, self.framed, self.refusals, self.compliances,
                                 system_prompt=self.gen_cfg.system_prompt, batch_size=self.cfg.batch_size)
        return refusal_margin(self.model, self.tokenizer, self.framed, refusal_openings=self.refusal_openings,
                              compliance_openings=self.compliance_openings,
                              system_prompt=self.gen_cfg.system_prompt, batch_size=self.cfg.batch_size)

    def margins(self) -> list[float]:
        """Margins on the calibrated scale: ``sigmoid(-m)`` is the fitted probability of an unsafe answer."""
        return [self.scale * (m - self.shift) for m in self.raw_margins()]

    def set_openings(self, refs: list[Any]) -> None:
        """Read each prompt's refusal opening off the safer reference's answer and its compliance opening off the
        other's (the first ``OPENING_TOKENS`` tokens), where the judge saw a refusal / an answer; else a fixed one.

        Args:
            refs: the two reference reports (safer first), from :meth:`full`.
        """
        safe, unsafe = ([g for g in r.generations if g["set"] == "harmful"] for r in refs)
        tok = self.tokenizer

        def opening(text: str) -> str:
            ids = tok(text, add_special_tokens=False)["input_ids"][:OPENING_TOKENS]
            return tok.decode(ids) if ids else ""

        self.refusals, self.compliances = [], []
        for a, b in zip(safe, unsafe):
            r = opening(a["response"]) if a["refused"] and a["response"].strip() else ""
            c = opening(b["response"]) if b["unsafe"] and b["response"].strip() else ""
            self.refusals.append(r or self.refusal_openings[0])
            self.compliances.append(c or self.compliance_openings[0])

    def refusal_backward(self) -> None:
        """Accumulate the gradient of the mean (calibrated) refusal margin on the harmful prompts."""
        from mergekit_safe.eval.proxy import DEFAULT_COMPLIANCE_OPENINGS, DEFAULT_REFUSAL_OPENINGS
        from mergekit_safe.eval.utility import continuation_logprobs

        texts = [p.text for p in self.framed]
        n = len(texts)
        refusals = self.refusals or [DEFAULT_REFUSAL_OPENINGS[0]] * n
        compliances = self.compliances or [DEFAULT_COMPLIANCE_OPENINGS[0]] * n
        continuation_logprobs(self.model, self.tokenizer, texts + texts, list(refusals) + list(compliances),
                              system_prompt=self.gen_cfg.system_prompt, batch_size=self.cfg.batch_size,
                              backward_weights=[1.0 / n] * n + [-1.0 / n] * n)

    def utility_backward(self, rows: list[Any]) -> None:
        """Accumulate the gradient of the mean per-token log-likelihood of the utility answers."""
        from mergekit_safe.eval.utility import continuation_logprobs

        continuation_logprobs(self.model, self.tokenizer, [r.prompt for r in rows], [r.response for r in rows],
                              system_prompt=self.gen_cfg.system_prompt, batch_size=self.cfg.batch_size,
                              backward_weights=[1.0 / len(rows)] * len(rows))

    def fit(self, margins: list[float], unsafe: list[bool]) -> None:
        """Fit ``P(unsafe | margin) = sigmoid(scale * (shift - margin))`` to the references' verdicts."""
        self.scale, self.shift = fit_logistic(margins, unsafe)


#: Tokens of a reference answer taken as its opening for the calibrated proxy.
OPENING_TOKENS = 8


def metric_name(cfg: RepairConfig) -> str:
    """The utility metric a repair uses (``auto`` resolved)."""
    if cfg.utility_metric != "auto":
        return cfg.utility_metric
    return "exact_match" if cfg.utility is not None else "nll"


def aggregate_unsafe(rep: Any, how: str) -> dict[str, Any]:
    """The unsafe rate of an eval report over its framings: the worst framing's, or pooled (``mean``)."""
    from mergekit_safe.eval.report import Rate

    by = rep.unsafe_by_framing
    if len(by) <= 1:
        return rate_dict(rep.unsafe)
    if how == "worst":
        return rate_dict(max(by.values(), key=lambda r: r.rate))
    return rate_dict(Rate.of(bool(g["unsafe"]) for g in rep.generations if g["set"] == "harmful"))


def fit_logistic(x: list[float], y: list[bool], steps: int = 200) -> tuple[float, float]:
    """Maximum-likelihood ``(scale, shift)`` of ``P(y) = sigmoid(scale * (shift - x))`` (float64, Newton steps).

    With one class only (nothing to separate) the scale is 1 and the shift the midpoint of the margins.
    """
    import math

    if not x or all(y) or not any(y):
        return 1.0, (sum(x) / len(x) if x else 0.0)
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor([float(v) for v in y], dtype=torch.float64)
    mu, sd = float(xt.mean()), float(xt.std()) or 1.0
    z = (xt - mu) / sd
    w = torch.zeros(2, dtype=torch.float64)  # P(y) = sigmoid(w0 + w1 * z)
    feats = torch.stack([torch.ones_like(z), z], 1)
    for _ in range(steps):
        p = torch.sigmoid(feats @ w)
        grad = feats.T @ (yt - p) - 1e-3 * w  # a small ridge keeps a separable fit finite
        hess = feats.T @ (feats * (p * (1 - p))[:, None]) + 1e-3 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if float(step.abs().max()) < 1e-10:
            break
    w0, w1 = float(w[0]), float(w[1])
    if w1 >= 0 or not math.isfinite(w1):  # margin does not lower P(unsafe): keep the raw scale
        return 1.0, mu
    scale = -w1 / sd
    return scale, mu + w0 * sd / -w1 if w1 else mu


@dataclass
class References:
    """Phase 2's result: the base and the fine-tune measured, the utility rows and the utility bound.

    Attributes:
        base, finetuned: metrics rows (``unsafe``, ``over_refusal``, ``nll``, ``utility`` with a task metric).
        base_judged, finetuned_judged: the same as :class:`Judgement` (seeded into the evaluator).
        rows: the utility rows every candidate's NLL is measured on.
        bound: the utility bound.
        max_over_refusal: the over-refusal bound in force (None: unbounded).
        proxy: the calibrated proxy's fit and its agreement on the references.
        seconds_per_run: wall time of one reference generation run (the budget's reserve).
    """

    base: dict[str, Any]
    finetuned: dict[str, Any]
    base_judged: Judgement
    finetuned_judged: Judgement
    rows: list[Any]
    bound: UtilityBound
    max_over_refusal: float | None
    proxy: dict[str, Any]
    seconds_per_run: float


def _own_answers(cfg: RepairConfig, report: Any) -> list[Any]:
    """The fine-tune's own answers to the benign prompts, as utility rows."""
    from mergekit_safe.eval import UtilityRow

    rows = [UtilityRow(g["prompt"], g["response"], "finetuned") for g in report.generations
            if g["set"] == "benign" and g["response"].strip()]
    if not rows:
        raise SearchError(f"no usable utility rows: the fine-tune gave empty answers to every benign prompt "
                          f"({cfg.benign}); pass --utility task.jsonl")
    return rows


def _utility_bound(cfg: RepairConfig, metric: str, base: dict[str, Any], ft: dict[str, Any]) -> UtilityBound:
    """The bound on the task metric (higher is better) or, for ``nll``, on the NLL; plus the NLL gate."""
    gain = base["nll"] - ft["nll"]
    if gain <= 0:
        log.warning("the fine-tune does not lower the utility NLL (base %.4f, fine-tune %.4f)", base["nll"], ft["nll"])
    nll_max = ft["nll"] + (1.0 - cfg.keep_utility) * max(gain, 0.0)
    if metric == "nll":
        if cfg.min_utility is not None:
            return UtilityBound(float(cfg.min_utility), f"absolute bound --min-utility {cfg.min_utility}", gain)
        return UtilityBound(nll_max, f"keep {cfg.keep_utility:.0%} of the fine-tune's NLL gain {gain:.4f}", gain)
    u_gain = ft["utility"] - base["utility"]
    if cfg.min_utility is not None:
        return UtilityBound(nll_max, f"{metric} >= {cfg.min_utility} (absolute)", gain, metric, float(cfg.min_utility),
                            u_gain)
    if u_gain <= 0:
        log.warning("the fine-tune does not improve %s (base %.3f, fine-tune %.3f)", metric, base["utility"],
                    ft["utility"])
    u_min = base["utility"] + cfg.keep_utility * max(u_gain, 0.0)
    return UtilityBound(nll_max, f"keep {cfg.keep_utility:.0%} of the fine-tune's {metric} gain {u_gain:.3f} "
                        f"(generated answers; NLL is a gate at {nll_max:.4f})", gain, metric, u_min, u_gain)


def _metrics_row(j: Judgement, nll: float, judges: dict[str, Any] | None = None) -> dict[str, Any]:
    row = {"unsafe": j.unsafe, "over_refusal": j.over_refusal, "nll": nll}
    if j.utility is not None:
        row["utility"] = j.utility
    if judges is not None:
        row["judges"] = judges
    return row


def measure_references(cfg: RepairConfig, loaded: Loaded, meter: Meter, utility: list[Any] | None) -> References:
    """Phase 2: measure the fine-tune and the base, loaded exactly into the changed tensors; set the bounds and
    calibrate the proxy on both (their own answers' openings, their verdicts).

    Raises:
        SearchError: no usable utility rows, or a time budget too small for one candidate.
    """
    t0 = time.perf_counter()
    loaded.space.load(loaded.finetuned.get)
    if utility is None:  # the NLL of the fine-tune's own answers to the benign prompts
        ft_j, ft_rep = meter.full()
        rows = _own_answers(cfg, ft_rep)
        meter.set_metric_rows(rows)
    else:
        rows = utility
        meter.set_metric_rows(rows)
        ft_j, ft_rep = meter.full()
    ft_nll = meter.nll(rows, count=True)
    one_run = time.perf_counter() - t0
    if cfg.time_budget is not None and cfg.time_budget < one_run:
        raise SearchError(f"--time-budget {cfg.time_budget:g}s is too small to evaluate one candidate (about "
                          f"{one_run:.1f}s here); raise it")
    loaded.space.load(loaded.base.get)
    base_j, base_rep = meter.full()
    base_nll = meter.nll(rows, count=True)
    base, ft = _metrics_row(base_j, base_nll, meter.panel(base_rep)), _metrics_row(ft_j, ft_nll, meter.panel(ft_rep))
    proxy = _calibrate(cfg, loaded, meter, [base_rep, ft_rep])
    if cfg.max_over_refusal is not None:
        bound_or = float(cfg.max_over_refusal)
    elif cfg.over_refusal_slack is not None and ft_j.over_refusal is not None:
        bound_or = min(1.0, float(ft_j.over_refusal["rate"]) + cfg.over_refusal_slack)
    else:
        bound_or = None
    return References(base, ft, base_j, ft_j, rows, _utility_bound(cfg, meter.metric, base, ft), bound_or, proxy,
                      one_run)


def _calibrate(cfg: RepairConfig, loaded: Loaded, meter: Meter, refs: list[Any]) -> dict[str, Any]:
    """Calibrate the proxy on the two references, ``refs`` = the base's (aligned) and the fine-tune's reports
    (2 forward runs); report how well it ranks their prompts."""
    from mergekit_safe.eval.proxy import auroc

    flags = [[bool(g["unsafe"]) for g in r.generations if g["set"] == "harmful"] for r in refs]
    if cfg.proxy == "calibrated":
        meter.set_openings(refs)
    margins = []
    for source in (loaded.base, loaded.finetuned):
        loaded.space.load(source.get)
        margins.append(meter.raw_margins())
        meter.forward_runs += 1
    xs, ys = margins[0] + margins[1], flags[0] + flags[1]
    meter.fit(xs, ys)
    au = auroc([-m for m in xs], ys)
    return {"openings": cfg.proxy, "scale": meter.scale, "shift": meter.shift,
            "auroc_on_references": au, "reference_prompts": len(xs)}


def build_evaluator(cfg: RepairConfig, loaded: Loaded, meter: Meter, refs: References) -> Evaluator:
    """Phase 3: the evaluator, with the reference points the space reproduces already in its cache.

    All zeros is the search's base exactly (the aligned model, or the fine-tune for the safety vector); all ones
    is the fine-tune for lerp (up to fp32 rounding).
    """
    rows = refs.rows
    evaluator = Evaluator(loaded.space, lambda: meter.nll(rows), meter.margins, meter.judge, refs.bound.nll_max,
                          refs.max_over_refusal, refs.bound.utility_min, fallback_fn=meter.subsample_unsafe,
                          min_rank=cfg.min_proxy_rank)
    space, base, ft = loaded.space, refs.base, refs.finetuned
    zero = space.uniform(0.0)
    if search_method(cfg.method).starts_from == "finetuned":
        if space.at_base(zero):  # a threshold of 0 may already switch a tensor on: then it is no reference
            evaluator.seed(zero, ft["nll"], refs.finetuned_judged, -2)
    else:
        evaluator.seed(zero, base["nll"], refs.base_judged, -1)
    if cfg.method == "lerp":
        evaluator.seed(space.uniform(1.0), ft["nll"], refs.finetuned_judged, -2)
    return evaluator


def settings_of(cfg: RepairConfig, groups: GroupSpec, meter: Meter) -> dict[str, Any]:
    """The inputs and settings that define a search (recorded in the report; they also name the study)."""
    return {
        "base": str(cfg.base), "finetuned": str(cfg.finetuned), "unaligned": str(cfg.unaligned),
        "method": cfg.method, "groups": str(groups), "density": cfg.density, "seed": cfg.seed,
        "harmful": str(cfg.harmful), "benign": str(cfg.benign), "utility": str(cfg.utility),
        "keep_utility": cfg.keep_utility, "min_utility": cfg.min_utility,
        "max_over_refusal": cfg.max_over_refusal, "pareto": cfg.pareto, "judge": cfg.judge,
        "max_new_tokens": cfg.max_new_tokens, "high": cfg.high,
        "refusal_openings": list(meter.refusal_openings), "compliance_openings": list(meter.compliance_openings),
        "utility_metric": meter.metric, "utility_limit": cfg.utility_limit,
        "over_refusal_slack": cfg.over_refusal_slack, "tasks": list(cfg.tasks),
        "framing_aggregate": cfg.framing_aggregate, "harmful_limit": cfg.harmful_limit, "benign_limit": cfg.benign_limit,
        "proxy": cfg.proxy,
    }


@dataclass
class SearchProgress:
    """A progress line for the search on a terminal: trial n of N, best unsafe rate so far, elapsed.

    Quiet when ``stream`` is not a terminal (logs, pipes, tests) or when disabled.

    Attributes:
        total: the trial budget.
        enabled: show anything at all.
        stream: where to draw (default: stderr).
    """

    total: int
    enabled: bool = True
    stream: TextIO | None = None
    _bar: Any = field(default=None, init=False, repr=False)

    def __call__(self, trials: Trials, res: TrialResult) -> None:
        """Update after a trial (the :func:`run_search` ``on_trial`` hook)."""
        stream = self.stream or sys.stderr
        if not self.enabled or not stream.isatty():
            return
        if self._bar is None:
            from tqdm import tqdm

            # a trial takes seconds: draw on every update (tqdm's rate limit would hide the first ones)
            self._bar = tqdm(total=self.total, desc="search", unit="trial", file=stream, leave=False, mininterval=0)
        judged = [r.unsafe_rate for r in trials.results if r.judged and r.feasible and r.number >= 0]
        best = f"{min(judged):.1%}" if judged else "n/a"
        self._bar.set_postfix_str(f"best unsafe {best}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Remove the line."""
        if self._bar is not None:
            self._bar.close()


def choose_groups(cfg: RepairConfig, groups: GroupSpec, loaded: Loaded, meter: Meter,
                  refs: References) -> tuple[list[dict[str, float]], Any]:
    """Phase 2b: the sensitivities (2 backward passes at the fine-tune) and the warm-start path they predict.

    ``--groups auto:K`` cuts the per-block module units into K groups by them; fixed groupings (``layers:K``,
    ``modules``) keep their groups and order them. Either way the search starts by reverting the group most worth
    reverting, then the two most, ... (the fine-tune elsewhere). On the real-model testbed the forward selection
    that otherwise starts a several-group search (each group alone moved from the base) spent its whole budget on
    candidates that kept none of the skill: a skill spread over every group only returns when all move together.
    One group, the thresholded methods (a switch has no derivative along tau) and methods whose zero point is not
    the base: ``([], None)``, the strategy's own start.
    """
    from mergekit_safe.repair.sensitivity import auto_groups, regroup, revert_path, sensitivity

    method = search_method(cfg.method)
    if not groups.auto and (len(loaded.space.groups) < 2 or cfg.method in SWITCHED or method.starts_from != "base"
                            or not method.increasing):
        return [], None
    rows = meter.metric_rows or refs.rows
    sens = sensitivity(loaded.space, meter.refusal_backward, lambda: meter.utility_backward(rows))
    meter.forward_runs += 2
    if groups.auto:
        regroup(loaded.space, auto_groups(sens, groups.auto))
        order = loaded.space.groups
    else:
        order = sens.ranked()
    return revert_path(order, 0.0, cfg.high), sens


def search(cfg: RepairConfig, evaluator: Evaluator, budget: Budget, settings: dict[str, Any],
           on_trial: Callable[[Trials, TrialResult], None] | None = None,
           warm: list[dict[str, float]] | None = None) -> SearchResult:
    """Phase 4: the coefficient search (see :mod:`mergekit_safe.repair.strategies`).

    Raises:
        SearchError: no candidate met the bounds.
    """
    result = run_search(evaluator, budget=budget, storage=cfg.storage, study_name=cfg.study_name or
                        study_name_for(settings), pareto=cfg.pareto, seed=cfg.seed, low=0.0, high=cfg.high,
                        increasing=search_method(cfg.method).increasing, slack=cfg.slack, tolerance=cfg.tolerance,
                        on_trial=on_trial, warm=warm)
    return require_best(cfg, evaluator, result)


def require_best(cfg: RepairConfig, evaluator: Evaluator, result: SearchResult) -> SearchResult:
    """``result`` when the search chose a candidate.

    Raises:
        SearchError: no candidate met the bounds.
    """
    if result.best is None:
        seen = min((r.nll for r in result.trials), default=float("nan"))
        over = f", over-refusal <= {cfg.max_over_refusal}" if cfg.max_over_refusal is not None else ""
        raise SearchError(f"no candidate met the bounds (NLL <= {evaluator.nll_max:.4f}; best seen {seen:.4f}{over}) "
                          f"in {len(result.trials)} trials; relax --keep-utility/--min-utility or raise --trials")
    return result


def search_workers(cfg: RepairConfig, stage: Path, inputs: Inputs, loaded: Loaded, meter: Meter, refs: References,
                   evaluator: Evaluator, budget: Budget, settings: dict[str, Any],
                   warm: list[dict[str, float]] | None) -> SearchResult:
    """Phase 4 with ``--workers N`` (see :mod:`mergekit_safe.repair.workers`); the study's sqlite file, kept in the
    staging folder without ``--storage``, is removed before anything else is written there.

    Raises:
        SearchError: a worker failed, or no candidate met the bounds.
    """
    from mergekit_safe.repair.workers import remove_study_files, search_with_workers

    try:
        result = search_with_workers(cfg, stage, inputs, meter, loaded.space, refs, evaluator, budget,
                                     cfg.study_name or study_name_for(settings), warm)
    finally:
        remove_study_files(stage)
    return require_best(cfg, evaluator, result)


def measure_repaired(cfg: RepairConfig, loaded: Loaded, meter: Meter, best: TrialResult) -> dict[str, Any]:
    """Phase 5: the chosen candidate's metrics row (one more generation run only when the search did not generate
    the benign prompts, i.e. no over-refusal bound, or when more judges than the searched one report)."""
    if best.over_refusal is None or len(meter.judges) > 1:
        loaded.space.apply(best.coeffs)
        judged, rep = meter.full()
        return _metrics_row(judged, best.nll, meter.panel(rep))
    return _metrics_row(Judgement(best.unsafe or {}, best.over_refusal, best.utility), best.nll)


def proxy_summary(refs: References, evaluator: Evaluator, trials: list[TrialResult]) -> dict[str, Any]:
    """How far the cheap signals could be trusted on this run: the proxy's rank correlation with the judge, the
    NLL gate's with the generated task metric (both Spearman, over the judged candidates)."""
    from mergekit_safe.eval.proxy import spearman

    rank, n = evaluator.proxy_rank()
    judged = [r for r in trials if r.judged and r.utility is not None]
    nll_rank = spearman([-r.nll for r in judged], [float(r.utility) for r in judged]) if judged else None
    return {**refs.proxy, "spearman": rank, "points": n, "trusted": evaluator.proxy_trusted(),
            "nll_vs_metric": nll_rank, "nll_points": len(judged)}


def _staging(cfg: RepairConfig) -> Any:
    """The output's staging folder, opened before the search when several workers share a study kept in it (a
    context manager yielding the folder); with one worker nothing is opened until :func:`publish` (yields None)."""
    import contextlib

    if cfg.workers <= 1:
        return contextlib.nullcontext(None)
    inputs = [Path(p) for p in (cfg.base, cfg.finetuned, cfg.unaligned) if p is not None]
    return staged_output(Path(cfg.output), overwrite=cfg.overwrite, inputs=inputs)


def publish(cfg: RepairConfig, loaded: Loaded, groups: GroupSpec, report: RepairReport, device: str,
            progress: bool, stage: Path | None = None) -> tuple[Path, Path, Path]:
    """Phase 6: checkpoint (or adapter), report and plot, written into one staging folder and published at once.

    Args:
        stage: an already open staging folder to write into (``--workers``); None: open one here.

    Returns:
        ``(output folder, report path, plot path)``.
    """
    out = Path(cfg.output)
    inputs = [Path(p) for p in (cfg.base, cfg.finetuned, cfg.unaligned) if p is not None]
    if stage is not None:
        _write_outputs(cfg, loaded, groups, report, device, progress, stage)
    else:
        with staged_output(out, overwrite=cfg.overwrite, inputs=inputs) as folder:
            _write_outputs(cfg, loaded, groups, report, device, progress, folder)
    return out, out / REPORT_JSON, out / REPORT_PNG


def _write_outputs(cfg: RepairConfig, loaded: Loaded, groups: GroupSpec, report: RepairReport, device: str,
                   progress: bool, folder: Path) -> None:
    """Write the checkpoint (or adapter), the plot and the report into the staging folder."""
    from mergekit_safe.merge.engine import merge_into

    best = report.chosen["coeffs"]
    t0 = time.perf_counter()
    card = model_card(report)
    if cfg.as_adapter:
        write_adapter(cfg, loaded.space, best, folder, {"README.md": "# Repaired LoRA adapter\n" + card})
    else:
        recipe = build_recipe(cfg, loaded.space, groups, best, loaded.num_layers)
        merge_into(recipe, folder, device=device, progress=progress, extra_card=card)
    report.cost["phase_seconds"]["write"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plot_report(report, folder / REPORT_PNG)
    report.cost["phase_seconds"]["report"] = time.perf_counter() - t0
    report.cost["wall_seconds"] += sum(report.cost["phase_seconds"][k] for k in ("write", "report"))
    report.write_json(folder / REPORT_JSON)


def repair(cfg: RepairConfig, *, progress: bool = False) -> RepairResult:
    """Run the post-hoc repair end to end and publish the output folder.

    Args:
        cfg: the settings (see :class:`RepairConfig`).
        progress: show progress when stderr is a terminal (reference generation, search trials, the final merge).

    Returns:
        A :class:`RepairResult`.

    Raises:
        MergeKitSafeError: invalid inputs (before any model loads), or no candidate meets the bounds.

    Example:
        >>> cfg = RepairConfig(Path("aligned"), Path("released"), Path("repaired"), utility=Path("task.jsonl"))
        >>> repair(cfg).report.chosen  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    progress = progress and sys.stderr.isatty()  # progress bars on a terminal only, never into logs
    inputs = validate(cfg)
    budget = Budget(cfg.trials, cfg.time_budget)
    device = str(resolve_device(cfg.device))
    t0 = time.perf_counter()
    loaded = load_inputs(cfg, inputs.groups, device)
    try:
        phases = {"load": time.perf_counter() - t0}
        meter = Meter(loaded.model, loaded.tokenizer, cfg, inputs.harmful, inputs.benign, progress)
        t0 = time.perf_counter()
        refs = measure_references(cfg, loaded, meter, inputs.utility)
        phases["references"] = time.perf_counter() - t0
        budget.reserve = refs.seconds_per_run  # the confirmation run must fit in --time-budget too
        warm, sens = choose_groups(cfg, inputs.groups, loaded, meter, refs)
        evaluator = build_evaluator(cfg, loaded, meter, refs)
        settings = settings_of(cfg, inputs.groups, meter)
        with _staging(cfg) as stage:
            if stage is None:
                bar = SearchProgress(cfg.trials, progress)
                try:
                    result = search(cfg, evaluator, budget, settings, bar, warm)
                finally:
                    bar.close()
            else:
                result = search_workers(cfg, stage, inputs, loaded, meter, refs, evaluator, budget, settings, warm)
            phases["search"] = result.seconds
            assert result.best is not None
            repaired = measure_repaired(cfg, loaded, meter, result.best)
            metrics = {"base": refs.base, "finetuned": refs.finetuned, "repaired": repaired}
            report = RepairReport.build(settings, cfg.storage, loaded.space.groups, refs.bound, result, metrics,
                                        (meter.forward_runs, meter.generation_runs))
            report.cost.update(wall_seconds=time.perf_counter() - t_start, phase_seconds=phases, workers=cfg.workers)
            report.proxy = proxy_summary(refs, evaluator, result.trials)
            if sens is not None:
                report.sensitivity = {**sens.to_dict(), "groups": dict(loaded.space.group_of)}
            out, report_path, plot_path = publish(cfg, loaded, inputs.groups, report, device, progress, stage)
    finally:
        loaded.close()
    return RepairResult(out, report_path, plot_path, report, result)


__all__ = ["Inputs", "Loaded", "Meter", "References", "RepairConfig", "RepairResult", "SearchProgress",
           "build_evaluator", "build_recipe", "check_adapter_fits", "check_same_architecture",
           "load_inputs", "measure_references", "measure_repaired", "metrics_table", "model_card", "plot_report",
           "publish", "repair", "require_best", "search", "search_workers", "settings_of", "validate", "write_adapter"]
