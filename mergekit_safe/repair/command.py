"""Post-hoc safety repair end to end: validate, search coefficients in memory, write the repaired model + report.

::

    mergekit-safe repair --base ./aligned --finetuned ./released --utility task.jsonl -o ./repaired
    mergekit-safe repair --base ./aligned --finetuned ./lora-adapter --groups layers:3,modules --trials 40 -o ./out

The repaired model is ``base + sum_g a_g * tau_g`` (see :mod:`mergekit_safe.repair.search`). The objective is the
lowest unsafe rate on the harmful prompts subject to utility: by default the utility NLL may give back at most
5% of the fine-tune's gain over the base (``keep_utility=0.95``: ``nll <= nll_ft + 0.05 * (nll_base - nll_ft)``),
or an absolute bound (``min_utility``: the NLL must be at most this many nats per token; NLL is lower-is-better,
so the "minimum utility" is a maximum NLL). Without a utility file the utility rows are the fine-tune's own greedy
answers to the benign prompts (how much of the fine-tune's behaviour a candidate keeps).

Outputs in the output folder: the checkpoint written by the streaming engine from a lerp (or DARE / TIES / safety
vector) recipe whose per-tensor rules reproduce the chosen coefficients exactly, or a repaired LoRA adapter
(``as_adapter``: every ``lora_B`` scaled by its group's coefficient); ``repair_report.json`` (every trial, the
choice, base / fine-tune / repaired metrics with Wilson intervals, costs); ``repair_report.png``; a model-card
section. Resuming and sharing a search: ``storage`` / ``study_name`` (see :mod:`mergekit_safe.repair.search`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.io.adapters import AdapterCheckpoint, open_input
from mergekit_safe.io.reader import ADAPTER_CONFIG, is_adapter, open_checkpoint
from mergekit_safe.errors import CheckpointError, EvalError, SearchError
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from mergekit_safe.merge.recipe import num_layers as count_layers
from mergekit_safe.repair.search import (
    SEARCH_METHODS,
    Budget,
    CandidateSpace,
    Evaluator,
    GroupSpec,
    SearchResult,
    build_space,
    check_groups,
    parse_groups,
    run_search,
    study_name_for,
)

log = logging.getLogger("mergekit_safe")

REPORT_JSON = "repair_report.json"
REPORT_PNG = "repair_report.png"
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
            fine-tune).
        harmful: harmful prompts: ``"builtin"`` or a .txt/.jsonl/.csv file.
        benign: benign prompts (over-refusal; default utility rows): ``"builtin"`` or a file.
        utility: jsonl with ``prompt`` / ``response`` rows; None: the fine-tune's own answers to ``benign``.
        method: one of :data:`~mergekit_safe.repair.search.SEARCH_METHODS`.
        groups: ``global``, ``layers:K``, ``modules`` or ``layers:K,modules``.
        density: DARE / TIES density.
        seed: sampler and DARE seed.
        trials: most search trials.
        time_budget: most seconds, counted from the start of :func:`repair` (None: no limit); the search stops
            asking for trials once it is spent (a confirmation run may follow).
        keep_utility: fraction of the fine-tune's NLL gain that must be kept.
        min_utility: absolute bound: the utility NLL must be at most this (overrides ``keep_utility``).
        max_over_refusal: bound on the over-refusal rate on benign prompts (None: only reported).
        pareto: search the unsafe-rate / NLL front with NSGA-II.
        storage: optuna storage URL to resume or share the study (``sqlite:///repair.db``).
        study_name: the study's name (default: derived from inputs and settings).
        judge: judge name (see ``mergekit_safe.eval.JUDGES``).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per forward batch.
        refusal_openings, compliance_openings: openings for the refusal-margin proxy (None: eval's defaults).
        exact_match: also score exact match on the utility rows for base / fine-tune / repaired.
        as_adapter: write a repaired LoRA adapter instead of a merged checkpoint (LoRA fine-tune, lerp only).
        overwrite: replace an existing output folder.
        slack: generate a candidate when its proxy unsafe rate is within this of the best judged one.
        tolerance: width of the final bracket of the one-coefficient search.
        high: largest coefficient searched.
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
    max_over_refusal: float | None = None
    pareto: bool = False
    storage: str | None = None
    study_name: str | None = None
    judge: str = "keyword"
    max_new_tokens: int = 64
    batch_size: int = 32
    refusal_openings: tuple[str, ...] | None = None
    compliance_openings: tuple[str, ...] | None = None
    exact_match: bool = False
    as_adapter: bool = False
    overwrite: bool = False
    slack: float = 0.05
    tolerance: float = 1.0 / 64
    high: float = 1.0


@dataclass
class RepairResult:
    """What :func:`repair` produced.

    Attributes:
        output: the published folder.
        report_path: ``repair_report.json``.
        plot_path: ``repair_report.png``.
        report: the report as a dict (what the JSON holds).
        search: the search outcome.
    """

    output: Path
    report_path: Path
    plot_path: Path
    report: dict[str, Any]
    search: SearchResult


# --------------------------------------------------------------------------------------------------
# validation (every check here is cheap and runs before any model is loaded)


def _config_of(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_same_architecture(a: Path, b: Path) -> None:
    """Refuse two checkpoints of different architectures (config fields, then tensor names and shapes).

    Raises:
        CheckpointError: naming the first difference.
    """
    ca, cb = _config_of(a), _config_of(b)
    for k in _ARCH_KEYS:
        if k in ca and k in cb and ca[k] != cb[k]:
            raise CheckpointError(f"{b}: different architecture from {a} ({k}: {cb[k]!r} vs {ca[k]!r}); "
                                  "repair needs a fine-tune of the base model")
    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        for name in x.keys():
            if name not in y:
                raise CheckpointError(f"{b}: different architecture from {a} (no tensor {name!r}); "
                                      "repair needs a fine-tune of the base model")
            if x.info(name).shape != y.info(name).shape:
                raise CheckpointError(f"{b}: different architecture from {a} (tensor {name!r} has shape "
                                      f"{list(y.info(name).shape)} vs {list(x.info(name).shape)}); "
                                      "repair needs a fine-tune of the base model")


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


def validate(cfg: RepairConfig) -> tuple[GroupSpec, list[Any], list[Any], list[Any] | None]:
    """Check a repair's settings and read its prompt and utility files, before any long work.

    Returns:
        ``(groups, harmful prompts, benign prompts, utility rows or None)``.

    Raises:
        MergeKitSafeError: the first problem, one line (SearchError, EvalError, CheckpointError, OutputError).
    """
    from mergekit_safe.eval import load_prompts, load_utility_rows

    if cfg.method not in SEARCH_METHODS:
        raise SearchError(f"--method {cfg.method!r}: the repair search supports {', '.join(SEARCH_METHODS)}")
    groups = parse_groups(cfg.groups)
    Budget(cfg.trials, cfg.time_budget)  # raises on a budget that cannot fit one candidate
    if not 0.0 < cfg.keep_utility <= 1.0:
        raise SearchError(f"--keep-utility {cfg.keep_utility}: must be in (0, 1], e.g. 0.95")
    if cfg.max_over_refusal is not None and not 0.0 <= cfg.max_over_refusal <= 1.0:
        raise SearchError(f"--max-over-refusal {cfg.max_over_refusal}: must be a rate in [0, 1]")
    if cfg.high <= 0:
        raise SearchError(f"the largest coefficient must be > 0, got {cfg.high}")
    for label, p in (("--base", cfg.base), ("--finetuned", cfg.finetuned), ("--unaligned", cfg.unaligned)):
        if p is not None and not Path(p).exists():
            raise CheckpointError(f"{label} {p}: no such file or directory")
    if cfg.method == "safety_vector" and cfg.unaligned is None:
        raise SearchError("--method safety_vector needs --unaligned (tau = aligned - unaligned)")
    if cfg.unaligned is not None and Path(cfg.unaligned).resolve() in (Path(cfg.base).resolve(),
                                                                         Path(cfg.finetuned).resolve()):
        raise SearchError(f"--unaligned {cfg.unaligned}: must be a third model, not --base or --finetuned")
    adapter = is_adapter(cfg.finetuned)
    if cfg.as_adapter and not adapter:
        raise SearchError(f"--as-adapter: {cfg.finetuned} is not a PEFT LoRA adapter (no {ADAPTER_CONFIG})")
    if cfg.as_adapter and cfg.method != "lerp":
        raise SearchError(f"--as-adapter works with --method lerp only (got {cfg.method}): a scaled lora_B is a lerp")
    from mergekit_safe.io.publish import check_publishable

    inputs = [Path(p) for p in (cfg.base, cfg.finetuned, cfg.unaligned) if p is not None]
    check_publishable(Path(cfg.output), overwrite=cfg.overwrite, inputs=inputs)
    harmful = load_prompts(cfg.harmful, kind="harmful")
    benign = load_prompts(cfg.benign, kind="benign")
    utility = None
    if cfg.utility is not None:
        try:
            utility = load_utility_rows(cfg.utility)
        except EvalError as e:
            if "no utility rows" in str(e):
                raise EvalError(f"{cfg.utility}: no usable utility rows (each line needs non-empty 'prompt' and "
                                "'response')") from None
            raise
    if adapter:
        ft = open_input(cfg.finetuned, base=cfg.base)
        assert isinstance(ft, AdapterCheckpoint)
        try:
            check_adapter_fits(ft)
        finally:
            ft.close()
    else:
        check_same_architecture(Path(cfg.base), Path(cfg.finetuned))
    if cfg.unaligned is not None:
        check_same_architecture(Path(cfg.base), Path(cfg.unaligned))
    return groups, harmful, benign, utility


# --------------------------------------------------------------------------------------------------
# recipes and adapters that reproduce a candidate


def coefficient_rules(space: CandidateSpace, groups: GroupSpec, coeffs: dict[str, float]) -> Any:
    """Recipe parameter value giving every tensor of ``space`` its group's coefficient, exactly.

    One group: the number. Module groups: ``{module: ..., value: ...}`` rules. Anything else: one rule per
    group whose regex lists the group's tensor names (exact, whatever the naming scheme).
    """
    if len(space.groups) == 1:
        return float(coeffs[space.groups[0]])
    if groups.modules and not groups.layers:
        return [{"module": g, "value": float(coeffs[g])} for g in space.groups] + [{"value": 0.0}]
    rules: list[dict[str, Any]] = []
    for g in space.groups:
        members = [n for n in space.names if space.group_of[n] == g]
        rules.append({"regex": "^(?:" + "|".join(re.escape(n) for n in members) + ")$", "value": float(coeffs[g])})
    return rules + [{"value": 0.0}]


def build_recipe(cfg: RepairConfig, space: CandidateSpace, groups: GroupSpec, coeffs: dict[str, float],
                 num_layers: int) -> Recipe:
    """The engine recipe that writes the candidate ``coeffs`` (checked tensor by tensor).

    Raises:
        SearchError: a rule would resolve to another coefficient (an invariant; never expected).
    """
    rules = coefficient_rules(space, groups, coeffs)
    base, ft = str(cfg.base), str(cfg.finetuned)
    if cfg.method == "lerp":
        recipe = Recipe("lerp", [ModelSpec(ft)], base_model=base, parameters={"alpha": rules})
        key = "alpha"
    elif cfg.method == "dare_linear":
        recipe = Recipe("dare_linear", [ModelSpec(ft, {"density": cfg.density})], base_model=base,
                        parameters={"lambda": rules, "seed": cfg.seed, "rescale": True, "normalize": False})
        key = "lambda"
    elif cfg.method == "ties":
        recipe = Recipe("ties", [ModelSpec(ft, {"density": cfg.density})], base_model=base,
                        parameters={"lambda": rules, "normalize": True})
        key = "lambda"
    else:
        recipe = Recipe("safety_vector", [ModelSpec(base), ModelSpec(str(cfg.unaligned))], base_model=ft,
                        parameters={"scale": rules}, tokenizer_source="base")
        key = "scale"
    recipe.source = "repair"
    recipe.validate()
    for n in space.names:
        got = float(recipe.resolve(n, num_layers)[key])
        want = float(coeffs[space.group_of[n]])
        if got != want:
            raise SearchError(f"internal: recipe gives {n!r} {key}={got}, the search chose {want}")
    return recipe


def write_adapter(cfg: RepairConfig, space: CandidateSpace, coeffs: dict[str, float], folder: Path,
                  extra_files: dict[str, str]) -> None:
    """Write the repaired LoRA adapter: ``lora_B`` (and saved full modules' deltas) scaled by the coefficient.

    ``base + scale * (a*B) @ A = base + a * delta``, so the adapter on the base equals the merged candidate.
    It is written into ``folder``, an existing (staging) folder the caller publishes.
    """
    from safetensors.torch import save_file

    from mergekit_safe.io.adapters import _LORA_RE, _LORA_RE_EMB, _PREFIX

    src = Path(cfg.finetuned)
    ft = open_input(src, base=cfg.base)
    assert isinstance(ft, AdapterCheckpoint)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for key in ft.adapter.keys():
            t = ft.adapter.get(key).clone()
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_RE.match(name) or _LORA_RE_EMB.match(name)
            if m:
                target = m.group("module") + ".weight"
                a = float(coeffs[space.group_of[target]]) if target in space.group_of else 0.0
                if m.group("kind") in ("lora_B", "lora_embedding_B"):
                    t = (t.float() * a).to(t.dtype)
            else:  # modules_to_save: a full tensor replaces the base's; keep base + a * (saved - base)
                target = name.replace(".modules_to_save.default", "")
                a = float(coeffs[space.group_of[target]]) if target in space.group_of else 0.0
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
# report, card, plot


def _rate(r: Any) -> dict[str, Any] | None:
    return None if r is None else asdict(r)


def _fmt_rate(r: dict[str, Any] | None) -> str:
    if not r or not r.get("n"):
        return "n/a"
    return f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Plain-text before/after table (the demo and the CLI print it)."""
    head = (f"{'model':<11}{'unsafe rate [95% CI]':<26}{'over-refusal [95% CI]':<26}{'utility EM [95% CI]':<26}"
            f"{'NLL':>8}")
    lines = [head, "-" * len(head)]
    for name, m in metrics.items():
        em = m.get("exact_match")
        lines.append(f"{name:<11}{_fmt_rate(m.get('unsafe')):<26}{_fmt_rate(m.get('over_refusal')):<26}"
                     f"{_fmt_rate(em):<26}{m['nll']:>8.3f}")
    return "\n".join(lines)


def model_card(report: dict[str, Any]) -> str:
    """The model-card section for the repaired checkpoint (Markdown)."""
    m = report["metrics"]
    lines = ["", "## Safety repair (mergekit-safe repair)", "",
             f"Search: `{report['strategy']}` over `{report['settings']['method']}` with groups "
             f"`{report['settings']['groups']}`; {report['cost']['trials']} trials, "
             f"{report['cost']['forward_runs']} forward-only runs, {report['cost']['generation_runs']} generation "
             f"runs, {report['cost']['wall_seconds']:.1f} s.", "",
             f"Utility bound: NLL <= {report['utility_bound']['nll_max']:.4f} "
             f"({report['utility_bound']['rule']}).", "",
             "| model | unsafe rate [95% CI] | over-refusal [95% CI] | utility NLL |", "|---|---|---|---|"]
    for name, row in m.items():
        lines.append(f"| {name} | {_fmt_rate(row.get('unsafe'))} | {_fmt_rate(row.get('over_refusal'))} | "
                     f"{row['nll']:.4f} |")
    lines += ["", "Chosen coefficients (0 = base, 1 = fine-tune for lerp):", "", "| group | coefficient |", "|---|---|"]
    lines += [f"| `{g}` | {v:.4f} |" for g, v in report["chosen"]["coeffs"].items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Unsafe rate vs utility NLL for every trial, the Pareto front, and base / fine-tune / repaired."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    trials = report["trials"]
    judged = [t for t in trials if t["judged"]]
    proxy = [t for t in trials if not t["judged"] and t["proxy_unsafe"] is not None]
    utility_only = [t for t in trials if not t["judged"] and t["proxy_unsafe"] is None]
    if utility_only:
        ax.scatter([t["nll"] for t in utility_only], [-0.02] * len(utility_only), marker="|", color="grey", s=80,
                   label="trial (utility only)")
    if proxy:
        ax.scatter([t["nll"] for t in proxy], [t["proxy_unsafe"] for t in proxy], facecolors="none",
                   edgecolors="grey", label="trial (proxy estimate)")
    if judged:
        ax.scatter([t["nll"] for t in judged], [t["unsafe"]["rate"] for t in judged], color="tab:blue",
                   label="trial (generation + judge)")
    front = [t for t in judged if t["number"] in set(report["pareto_front"])]
    if front:
        front.sort(key=lambda t: t["nll"])
        ax.plot([t["nll"] for t in front], [t["unsafe"]["rate"] for t in front], "-", color="tab:blue", alpha=0.6,
                label="Pareto front")
    marks = {"base": ("tab:green", "s"), "finetuned": ("tab:red", "^"), "repaired": ("black", "*")}
    for name, (color, marker) in marks.items():
        m = report["metrics"].get(name)
        if m and m.get("unsafe"):
            ax.scatter([m["nll"]], [m["unsafe"]["rate"]], color=color, marker=marker, s=140, zorder=5, label=name)
    ax.axvline(report["utility_bound"]["nll_max"], color="grey", ls="--", lw=1, label="utility bound")
    xs = [t["nll"] for t in trials] + [m["nll"] for m in report["metrics"].values()]
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("utility NLL (nats/token, lower is better)")
    ax.set_ylabel("unsafe rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("mergekit-safe repair")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the pipeline


def repair(cfg: RepairConfig, *, progress: bool = False) -> RepairResult:
    """Run the post-hoc repair end to end and publish the output folder.

    Args:
        cfg: the settings (see :class:`RepairConfig`).
        progress: show progress bars.

    Returns:
        A :class:`RepairResult`.

    Raises:
        MergeKitSafeError: invalid inputs (before any long work), or no candidate meets the bounds.

    Example:
        >>> cfg = RepairConfig(Path("aligned"), Path("released"), Path("repaired"), utility=Path("task.jsonl"))
        >>> repair(cfg).report["chosen"]  # doctest: +SKIP
    """
    from mergekit_safe.eval import GenerationConfig, evaluate, load_model, refusal_margin, utility_nll

    t_start = time.perf_counter()
    groups, harmful, benign, utility = validate(cfg)
    budget = Budget(cfg.trials, cfg.time_budget)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
    from mergekit_safe.eval.proxy import DEFAULT_COMPLIANCE_OPENINGS, DEFAULT_REFUSAL_OPENINGS

    ref_open = tuple(cfg.refusal_openings or DEFAULT_REFUSAL_OPENINGS)
    comp_open = tuple(cfg.compliance_openings or DEFAULT_COMPLIANCE_OPENINGS)

    phases: dict[str, float] = {}
    t_phase = time.perf_counter()
    model, tok = load_model(cfg.base, dtype="float32", device="auto")
    num_layers = count_layers(model.config, fallback_names=(n for n, _ in model.named_parameters()))
    check_groups(groups, num_layers)
    base_ck = open_input(cfg.base)
    ft_ck = open_input(cfg.finetuned, base=cfg.base)
    un_ck = open_input(cfg.unaligned) if cfg.unaligned is not None else None
    try:
        if cfg.method == "safety_vector":
            space = build_space(model, ft_ck, base_ck, un_ck, method="safety_vector", groups=groups,
                                num_layers=num_layers)
        else:
            names = None
            if isinstance(ft_ck, AdapterCheckpoint):  # only the tensors the adapter changes
                targets = set(ft_ck.lora_targets())
                names = [n for n in base_ck.keys() if n in targets or ft_ck.delta(n) is not None]
            space = build_space(model, base_ck, ft_ck, None, method=cfg.method, groups=groups, num_layers=num_layers,
                                density=cfg.density, seed=cfg.seed, names=names)
        forward_runs = generation_runs = 0
        phases["load"] = time.perf_counter() - t_phase

        def full_eval(rows: list[Any] | None) -> tuple[dict[str, Any], Any]:
            nonlocal generation_runs
            rep = evaluate(model, tok, harmful=harmful, benign=benign, utility=rows if cfg.exact_match else None,
                           judge=cfg.judge, config=gen_cfg, proxy=False, exact_match_utility=cfg.exact_match)
            generation_runs += 1
            out = {"unsafe": _rate(rep.unsafe), "over_refusal": _rate(rep.over_refusal)}
            if cfg.exact_match and rows:
                out["exact_match"] = rep.utility.get("exact_match")
            return out, rep

        def nll_now(rows: list[Any]) -> float:
            nonlocal forward_runs
            forward_runs += 1
            return utility_nll(model, tok, rows, system_prompt=gen_cfg.system_prompt, batch_size=cfg.batch_size).nll

        # reference points: the aligned model and the fine-tune, loaded exactly into the changed tensors
        t_ref = time.perf_counter()
        space.load(lambda n: ft_ck.get(n))
        ft_metrics, ft_rep = full_eval(utility)
        rows = utility
        if rows is None:  # the fine-tune's own answers to the benign prompts
            from mergekit_safe.eval import UtilityRow

            rows = [UtilityRow(g["prompt"], g["response"], "finetuned") for g in ft_rep.generations
                    if g["set"] == "benign" and g["response"].strip()]
            if not rows:
                raise SearchError(f"no usable utility rows: the fine-tune gave empty answers to every benign prompt "
                                  f"({cfg.benign}); pass --utility task.jsonl")
            if cfg.exact_match:
                ft_metrics, ft_rep = full_eval(rows)
        ft_metrics["nll"] = nll_now(rows)
        one_candidate = time.perf_counter() - t_ref
        if cfg.time_budget is not None and cfg.time_budget < one_candidate:
            raise SearchError(f"--time-budget {cfg.time_budget:g}s is too small to evaluate one candidate (about "
                              f"{one_candidate:.1f}s here); raise it")
        aligned_ck = base_ck
        space.load(lambda n: aligned_ck.get(n))
        base_metrics, _ = full_eval(rows)
        base_metrics["nll"] = nll_now(rows)

        phases["references"] = time.perf_counter() - t_ref
        gain = base_metrics["nll"] - ft_metrics["nll"]
        if cfg.min_utility is not None:
            nll_max, rule = float(cfg.min_utility), f"absolute bound --min-utility {cfg.min_utility}"
        else:
            nll_max = ft_metrics["nll"] + (1.0 - cfg.keep_utility) * max(gain, 0.0)
            rule = f"keep {cfg.keep_utility:.0%} of the fine-tune's NLL gain {gain:.4f}"
        if gain <= 0:
            log.warning("the fine-tune does not lower the utility NLL (base %.4f, fine-tune %.4f); every "
                        "coefficient keeps its utility", base_metrics["nll"], ft_metrics["nll"])

        def margins() -> list[float]:
            return refusal_margin(model, tok, harmful, refusal_openings=ref_open, compliance_openings=comp_open,
                                  system_prompt=gen_cfg.system_prompt, batch_size=cfg.batch_size)

        def judge(with_benign: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
            rep = evaluate(model, tok, harmful=harmful, benign=benign if with_benign else None, judge=cfg.judge,
                           config=gen_cfg, proxy=False)
            return _rate(rep.unsafe), _rate(rep.over_refusal)

        evaluator = Evaluator(space, lambda: utility_nll(model, tok, rows, system_prompt=gen_cfg.system_prompt,
                                                         batch_size=cfg.batch_size).nll,
                              margins, judge, nll_max, cfg.max_over_refusal)
        # reference points the space reproduces: all zeros is the search's base exactly (the aligned model, or
        # the fine-tune for the safety vector); all ones is the fine-tune for lerp (up to fp32 rounding)
        if cfg.method == "safety_vector":
            evaluator.seed(space.uniform(0.0), ft_metrics["nll"], ft_metrics["unsafe"], ft_metrics["over_refusal"], -2)
        else:
            evaluator.seed(space.uniform(0.0), base_metrics["nll"], base_metrics["unsafe"],
                           base_metrics["over_refusal"], -1)
        if cfg.method == "lerp":
            evaluator.seed(space.uniform(1.0), ft_metrics["nll"], ft_metrics["unsafe"], ft_metrics["over_refusal"], -2)
        settings = {
            "base": str(cfg.base), "finetuned": str(cfg.finetuned), "unaligned": str(cfg.unaligned),
            "method": cfg.method, "groups": str(groups), "density": cfg.density, "seed": cfg.seed,
            "harmful": str(cfg.harmful), "benign": str(cfg.benign), "utility": str(cfg.utility),
            "keep_utility": cfg.keep_utility, "min_utility": cfg.min_utility,
            "max_over_refusal": cfg.max_over_refusal, "pareto": cfg.pareto, "judge": cfg.judge,
            "max_new_tokens": cfg.max_new_tokens, "high": cfg.high,
            "refusal_openings": list(ref_open), "compliance_openings": list(comp_open),
        }
        study_name = cfg.study_name or study_name_for(settings)
        result = run_search(evaluator, budget=budget, storage=cfg.storage, study_name=study_name, pareto=cfg.pareto,
                            seed=cfg.seed, low=0.0, high=cfg.high, increasing=cfg.method != "safety_vector",
                            slack=cfg.slack, tolerance=cfg.tolerance)
        phases["search"] = result.seconds
        best = result.best
        if best is None:
            seen = min((r.nll for r in result.trials), default=float("nan"))
            over = f", over-refusal <= {cfg.max_over_refusal}" if cfg.max_over_refusal is not None else ""
            raise SearchError(f"no candidate met the bounds (NLL <= {nll_max:.4f}; best seen {seen:.4f}{over}) in "
                              f"{len(result.trials)} trials; relax --keep-utility/--min-utility or raise --trials")
        if cfg.exact_match or best.over_refusal is None:  # one more generation run: benign prompts, exact match
            space.apply(best.coeffs)
            rep_metrics, _ = full_eval(rows)
        else:  # the chosen candidate was judged in the search with the same prompts and judge
            rep_metrics = {"unsafe": best.unsafe, "over_refusal": best.over_refusal}
        rep_metrics["nll"] = best.nll

        costs = result.costs
        report: dict[str, Any] = {
            "settings": settings, "study": {"name": result.study_name, "storage": cfg.storage},
            "strategy": result.strategy, "groups": space.groups,
            "utility_bound": {"nll_max": nll_max, "rule": rule, "gain": gain},
            "chosen": {"coeffs": best.coeffs, "trial": best.number, "nll": best.nll,
                       "unsafe": best.unsafe, "over_refusal": best.over_refusal},
            "metrics": {"base": base_metrics, "finetuned": ft_metrics, "repaired": rep_metrics},
            "pareto_front": result.front,
            "trials": [r.to_dict() for r in result.trials],
            "cost": {"trials": costs.trials, "reused_trials": costs.reused_trials,
                     "forward_runs": costs.forward_runs + forward_runs,
                     "generation_runs": costs.generation_runs + generation_runs,
                     "search_forward_runs": costs.forward_runs, "search_generation_runs": costs.generation_runs,
                     "search_seconds": result.seconds, "wall_seconds": 0.0},
        }
        report["cost"]["wall_seconds"] = time.perf_counter() - t_start
        report["cost"]["phase_seconds"] = phases
        card = model_card(report)
        t_phase = time.perf_counter()
        out = Path(cfg.output)
        # checkpoint (or adapter), report and plot are published together, in one rename
        from mergekit_safe.io.publish import staged_output
        from mergekit_safe.merge.engine import merge_into

        inputs = [Path(p) for p in (cfg.base, cfg.finetuned, cfg.unaligned) if p is not None]
        with staged_output(out, overwrite=cfg.overwrite, inputs=inputs) as folder:
            if cfg.as_adapter:
                write_adapter(cfg, space, best.coeffs, folder, {"README.md": "# Repaired LoRA adapter\n" + card})
            else:
                recipe = build_recipe(cfg, space, groups, best.coeffs, num_layers)
                merge_into(recipe, folder, progress=progress, extra_card=card)
            phases["write"] = time.perf_counter() - t_phase
            t_phase = time.perf_counter()
            plot_report(report, folder / REPORT_PNG)
            phases["report"] = time.perf_counter() - t_phase
            report["cost"]["wall_seconds"] = time.perf_counter() - t_start
            (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        return RepairResult(out, out / REPORT_JSON, out / REPORT_PNG, report, result)
    finally:
        for c in (base_ck, ft_ck, un_ck):
            if c is not None:
                c.close()


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


__all__ = ["REPORT_JSON", "REPORT_PNG", "RepairConfig", "RepairResult", "build_recipe", "check_adapter_fits",
           "check_same_architecture", "coefficient_rules", "metrics_table", "model_card", "plot_report", "repair",
           "validate", "write_adapter"]
