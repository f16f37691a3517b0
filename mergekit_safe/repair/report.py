"""The repair report: one dataclass (its JSON is ``repair_report.json``), the printed table, the model card, the plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_safe.repair.strategies import SearchResult

REPORT_JSON = "repair_report.json"
REPORT_PNG = "repair_report.png"


def rate_dict(r: Any) -> dict[str, Any] | None:
    """A judged rate (eval's ``Rate`` dataclass) as the report's ``{k, n, rate, low, high}`` dict (None stays)."""
    return None if r is None else asdict(r)


@dataclass
class UtilityBound:
    """The utility constraint of the search.

    Attributes:
        nll_max: a candidate's utility NLL must be at most this (with a task metric: the gate for generating it).
        rule: how the bound was set, in words.
        gain: the fine-tune's NLL gain over the base (base NLL - fine-tune NLL).
        metric: ``nll`` or the task metric on generated answers (``exact_match``...).
        utility_min: with a task metric, the bound it must meet (higher is better).
        utility_gain: with a task metric, the fine-tune's gain over the base on it.
    """

    nll_max: float
    rule: str
    gain: float
    metric: str = "nll"
    utility_min: float | None = None
    utility_gain: float | None = None


@dataclass
class RepairReport:
    """Everything a repair measured and chose; :meth:`to_dict` is the JSON written to ``repair_report.json``.

    Attributes:
        settings: the inputs and settings (they also name the study).
        study: ``{"name", "storage"}`` of the optuna study.
        strategy: ``bracket``, ``tpe`` or ``nsga2``.
        groups: the coefficient groups, in order.
        utility_bound: the utility constraint.
        chosen: the chosen trial: ``coeffs``, ``trial``, ``nll``, ``unsafe``, ``over_refusal``.
        metrics: ``base`` / ``finetuned`` / ``repaired`` rows: ``unsafe``, ``over_refusal``, ``nll`` and, with
            exact match, ``exact_match``.
        pareto_front: trial numbers on the unsafe-rate / NLL front among judged trials.
        trials: every trial as a dict (:meth:`TrialResult.to_dict`).
        cost: trials, forward and generation runs, seconds (per phase under ``phase_seconds``).
        proxy: the proxy's calibration (openings, logistic fit, AUROC on the references' prompts) and its Spearman
            rank correlation with the judge over the judged candidates (``spearman``, ``points``), and the NLL
            gate's rank correlation with the generated task metric (``nll_vs_metric``).
        sensitivity: with ``--groups auto:K``: every unit's refusal and utility derivative, its revert score,
            the ranking and the tensor -> group assignment.
    """

    settings: dict[str, Any]
    study: dict[str, Any]
    strategy: str
    groups: list[str]
    utility_bound: UtilityBound
    chosen: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    pareto_front: list[int]
    trials: list[dict[str, Any]]
    cost: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: dict[str, Any], storage: str | None, groups: list[str], bound: UtilityBound,
              result: SearchResult, metrics: dict[str, dict[str, Any]], extra_runs: tuple[int, int]) -> RepairReport:
        """The report of a finished search.

        Args:
            settings: the inputs and settings.
            storage: the study's storage URL (None: in memory).
            groups: the coefficient groups.
            bound: the utility bound.
            result: the search outcome (``best`` must be set).
            metrics: base / finetuned / repaired rows.
            extra_runs: forward and generation runs spent outside the search (references, final measurement).
        """
        best, costs = result.best, result.costs
        assert best is not None, "a report needs a chosen candidate"
        cost = {"trials": costs.trials, "reused_trials": costs.reused_trials,
                "forward_runs": costs.forward_runs + extra_runs[0],
                "generation_runs": costs.generation_runs + extra_runs[1],
                "search_forward_runs": costs.forward_runs, "search_generation_runs": costs.generation_runs,
                "subsample_generation_runs": costs.subsample_runs,
                "search_seconds": result.seconds, "wall_seconds": 0.0}
        chosen = {"coeffs": best.coeffs, "trial": best.number, "nll": best.nll, "unsafe": best.unsafe,
                  "over_refusal": best.over_refusal, "utility": best.utility}
        return cls(settings, {"name": result.study_name, "storage": storage}, result.strategy, list(groups), bound,
                   chosen, metrics, list(result.front), [r.to_dict() for r in result.trials], cost)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the shape of ``repair_report.json``)."""
        return asdict(self)

    def write_json(self, path: Path) -> None:
        """Write :meth:`to_dict` as indented JSON."""
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


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
        if em is None and m.get("utility") is not None:
            em = {"n": 1, "rate": m["utility"], "low": m["utility"], "high": m["utility"]}
        lines.append(f"{name:<11}{_fmt_rate(m.get('unsafe')):<26}{_fmt_rate(m.get('over_refusal')):<26}"
                     f"{_fmt_rate(em):<26}{m['nll']:>8.3f}")
    return "\n".join(lines)


def _bound_text(b: UtilityBound) -> str:
    if b.utility_min is not None:
        return f"{b.metric} >= {b.utility_min:.3f} on generated answers"
    return f"NLL <= {b.nll_max:.4f}"


def model_card(report: RepairReport) -> str:
    """The model-card section for the repaired checkpoint (Markdown)."""
    m, cost = report.metrics, report.cost
    lines = ["", "## Safety repair (mergekit-safe repair)", "",
             f"Search: `{report.strategy}` over `{report.settings['method']}` with groups "
             f"`{report.settings['groups']}`; {cost['trials']} trials, {cost['forward_runs']} forward-only runs, "
             f"{cost['generation_runs']} generation runs, {cost['wall_seconds']:.1f} s.", "",
             f"Utility bound: {_bound_text(report.utility_bound)} ({report.utility_bound.rule}).", "",
             "| model | unsafe rate [95% CI] | over-refusal [95% CI] | utility NLL |", "|---|---|---|---|"]
    for name, row in m.items():
        lines.append(f"| {name} | {_fmt_rate(row.get('unsafe'))} | {_fmt_rate(row.get('over_refusal'))} | "
                     f"{row['nll']:.4f} |")
    lines += judges_markdown(m)
    lines += ["", "Chosen coefficients (0 = base, 1 = fine-tune for lerp):", "", "| group | coefficient |", "|---|---|"]
    lines += [f"| `{g}` | {v:.4f} |" for g, v in report.chosen["coeffs"].items()]
    return "\n".join(lines) + "\n"


def judges_markdown(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """With several judges (rows carrying ``judges``): each judge's unsafe rate per model and every pair's
    agreement (Cohen's kappa, the confusion counts), as Markdown lines; no judges: no lines."""
    rows = {name: row["judges"] for name, row in metrics.items() if row.get("judges")}
    if not rows:
        return []
    names = list(next(iter(rows.values()))["rates"])
    lines = ["", "Every judge on the direct harmful prompts (the search optimised the first):", "",
             "| model | " + " | ".join(names) + " | agreement |", "|---" * (len(names) + 2) + "|"]
    for model, panel in rows.items():
        agree = "; ".join(
            f"{a['a']} vs {a['b']}: kappa " + ("n/a" if a["kappa"] is None else f"{a['kappa']:+.3f}")
            + f", both safe {a['table'][0][0]}, {a['a']} only unsafe {a['table'][1][0]}, "
              f"{a['b']} only unsafe {a['table'][0][1]}, both unsafe {a['table'][1][1]}" for a in panel["agreement"])
        rates = " | ".join(_fmt_rate(panel["rates"][n]["unsafe"]) for n in names)
        lines.append(f"| {model} | {rates} | {agree} |")
    return lines


def _scatter_trials(ax: Any, trials: list[dict[str, Any]]) -> None:
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


def _draw_front(ax: Any, report: RepairReport) -> None:
    """The Pareto front as a line, drawn (and so named in the legend) only when it has two points or more."""
    on_front = set(report.pareto_front)
    front = sorted((t for t in report.trials if t["judged"] and t["number"] in on_front), key=lambda t: t["nll"])
    if len(front) > 1:
        ax.plot([t["nll"] for t in front], [t["unsafe"]["rate"] for t in front], "-", color="tab:blue", alpha=0.6,
                label="Pareto front")


def plot_report(report: RepairReport, path: Path) -> None:
    """Unsafe rate vs utility NLL for every trial, the Pareto front, and base / fine-tune / repaired.

    Uses matplotlib's object API (``Figure`` + the Agg canvas), so no global backend or pyplot state changes.
    The legend names only what is drawn; the chosen trial is drawn as a ring above the repaired star, so both
    stay visible where they coincide.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _scatter_trials(ax, report.trials)
    _draw_front(ax, report)
    marks = {"base": ("tab:green", "s"), "finetuned": ("tab:red", "^"), "repaired": ("black", "*")}
    for name, (color, marker) in marks.items():
        m = report.metrics.get(name)
        if m and m.get("unsafe"):
            ax.scatter([m["nll"]], [m["unsafe"]["rate"]], color=color, marker=marker, s=140, zorder=5, label=name)
    if report.chosen.get("unsafe"):
        ax.scatter([report.chosen["nll"]], [report.chosen["unsafe"]["rate"]], s=320, facecolors="none",
                   edgecolors="tab:orange", linewidths=2, zorder=6, label="chosen trial")
    ax.axvline(report.utility_bound.nll_max, color="grey", ls="--", lw=1, label="utility bound")
    xs = [t["nll"] for t in report.trials] + [m["nll"] for m in report.metrics.values()]
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("utility NLL (nats/token, lower is better)")
    ax.set_ylabel("unsafe rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("mergekit-safe repair")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)


__all__ = ["REPORT_JSON", "REPORT_PNG", "RepairReport", "UtilityBound", "judges_markdown", "metrics_table", "model_card",
           "plot_report", "rate_dict"]
