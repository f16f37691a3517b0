"""Rates with Wilson intervals, the :class:`EvalReport`, its JSON form and a readable table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_safe.errors import EvalError

# Two-sided 95% normal quantile, Phi^-1(0.975), to full double precision.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    ``center = (p + z^2/(2n)) / (1 + z^2/n)``, ``half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2))``.
    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at k = 0 or k = n, which
    matters here: a repaired model often has a handful of unsafe responses out of a few hundred.

    Args:
        k: successes, ``0 <= k <= n``.
        n: trials; ``n = 0`` gives the uninformative ``(0, 1)``.
        z: normal quantile; default 95% two-sided.

    Returns:
        ``(low, high)``.

    Raises:
        EvalError: ``k`` outside ``[0, n]``.

    Example:
        >>> [round(x, 4) for x in wilson_interval(0, 10)]
        [0.0, 0.2775]
    """
    if n < 0 or k < 0 or k > n:
        raise EvalError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 (k = n) the exact lower (upper) bound is 0 (1); center - half leaves an ulp-sized residue
    # there, which would put the bound above the rate itself, so the ends are set exactly and both clamped.
    low = 0.0 if k == 0 else center - half
    high = 1.0 if k == n else center + half
    return (min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0))


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with the Wilson 95% interval.

    Attributes:
        k: count (e.g. unsafe responses).
        n: total.
        rate: ``k / n`` (NaN when ``n == 0``).
        low, high: Wilson 95% interval.
    """

    k: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, flags: Iterable[bool]) -> Rate:
        """The rate of True in ``flags``."""
        fl = [bool(f) for f in flags]
        k, n = sum(fl), len(fl)
        low, high = wilson_interval(k, n)
        return cls(k, n, k / n if n else math.nan, low, high)

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        return f"{100 * self.rate:5.1f}% [{100 * self.low:4.1f}, {100 * self.high:4.1f}]  ({self.k}/{self.n})"


@dataclass
class EvalReport:
    """Everything one evaluation measured. ``to_dict`` gives the JSON layout.

    Attributes:
        model: model name or path.
        judge: judge name.
        unsafe: unsafe rate on direct (unframed) harmful prompts; None when no harmful set.
        unsafe_by_category: unsafe rate per harm category (direct prompts).
        unsafe_by_framing: unsafe rate per task framing, ``direct`` included.
        over_refusal: refusal rate on benign prompts; None when no benign set.
        over_refusal_by_category: per benign category.
        utility: ``nll``, ``perplexity``, ``n_tokens``, ``exact_match`` (a Rate as dict), ``lm_eval``...
        proxy: refusal-margin summary and its agreement with the judge.
        judges: every judge's ``unsafe`` rate and ``safe_but_degenerate`` rate (direct harmful prompts).
        agreement: Cohen's kappa and the confusion table of every pair of judges.
        throughput: ``prompts``, ``seconds``, ``prompts_per_s``, ``new_tokens``, ``tokens_per_s`` of the
            generation call (tokenize + generate + decode; judging and the proxy are not counted).
        settings: the options the run used (for reproducibility).
        generations: per-prompt records (prompt, category, framing, response, verdict); not in the JSON
            unless asked, since they can be large.
    """

    model: str
    judge: str
    unsafe: Rate | None = None
    unsafe_by_category: dict[str, Rate] = field(default_factory=dict)
    unsafe_by_framing: dict[str, Rate] = field(default_factory=dict)
    over_refusal: Rate | None = None
    over_refusal_by_category: dict[str, Rate] = field(default_factory=dict)
    utility: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    judges: dict[str, dict[str, Rate]] = field(default_factory=dict)
    agreement: list[Any] = field(default_factory=list)
    throughput: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, include_generations: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (Rates become ``{k, n, rate, low, high}``; NaN becomes null)."""
        d = asdict(self)
        if not include_generations:
            d.pop("generations")
        return _nan_to_none(d)

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as indented JSON.

        Raises:
            EvalError: the file cannot be written.
        """
        try:
            Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            raise EvalError(f"{path}: cannot write report ({e.strerror})") from None

    def write_generations(self, path: str | Path) -> None:
        """Write one JSON object per generation (JSONL).

        Raises:
            EvalError: the file cannot be written.
        """
        try:
            with Path(path).open("w", encoding="utf-8") as f:
                for g in self.generations:
                    f.write(json.dumps(g, ensure_ascii=False) + "\n")
        except OSError as e:
            raise EvalError(f"{path}: cannot write generations ({e.strerror})") from None

    def table(self) -> str:
        """A readable fixed-width summary."""
        lines = [f"model: {self.model}    judge: {self.judge}", ""]

        def block(title: str, rates: dict[str, Rate]) -> None:
            if not rates:
                return
            lines.append(title)
            w = max(len(k) for k in rates)
            lines.extend(f"  {k:<{w}}  {v}" for k, v in rates.items())
            lines.append("")

        if self.unsafe is not None:
            lines += [f"unsafe rate (harmful, direct)   {self.unsafe}", ""]
        block("unsafe rate by category", self.unsafe_by_category)
        if len(self.unsafe_by_framing) > 1:
            block("unsafe rate by task framing", self.unsafe_by_framing)
        self._judge_lines(lines)
        if self.over_refusal is not None:
            lines += [f"over-refusal (benign)           {self.over_refusal}", ""]
            block("over-refusal by category", self.over_refusal_by_category)
        if self.utility:
            lines.append("utility")
            u = self.utility
            if "nll" in u:
                lines.append(f"  NLL {u['nll']:.4f} nats/token   perplexity {u['perplexity']:.3f}   "
                             f"({u['n_tokens']} tokens, {u['n_rows']} rows)")
            if "exact_match" in u:
                lines.append(f"  exact match  {Rate(**u['exact_match'])}")
            for task, metrics in u.get("lm_eval", {}).items():
                lines.append(f"  lm-eval {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            lines.append("")
        if self.proxy:
            p = self.proxy
            au = "n/a (judge saw one class only)" if p.get("auroc") is None else f"{p['auroc']:.3f}"
            acc = "n/a" if p.get("sign_accuracy") is None else f"{p['sign_accuracy']:.3f}"
            lines += [f"refusal margin  mean {p['mean_margin']:+.3f} nats   AUROC vs judge {au}   "
                      f"sign accuracy {acc}", ""]
        if self.throughput:
            t = self.throughput
            lines.append(f"throughput  {t['prompts_per_s']:.2f} prompts/s   {t['tokens_per_s']:.1f} new tokens/s   "
                         f"({t['prompts']} prompts, {t['new_tokens']} tokens, {t['seconds']:.2f} s)")
        return "\n".join(lines).rstrip() + "\n"

    def _judge_lines(self, lines: list[str]) -> None:
        """Each judge's rate beside its coherence check, then every pair's agreement."""
        if not self.judges:
            return
        w = max(len(k) for k in self.judges)
        lines += ["judges (direct harmful prompts)", f"  {'':<{w}}  {'unsafe':<35}safe but degenerate"]
        lines.extend(f"  {k:<{w}}  {v['unsafe']!s:<35}{v['safe_but_degenerate']}" for k, v in self.judges.items())
        for a in self.agreement:
            kappa = "n/a" if a.kappa != a.kappa else f"{a.kappa:+.3f}"
            (n00, n01), (n10, n11) = a.table
            lines.append(f"  {a.a} vs {a.b}: kappa {kappa}, agree {100 * a.agreement:.1f}%   "
                         f"both safe {n00}, {a.a} only unsafe {n10}, {a.b} only unsafe {n01}, both unsafe {n11}")
        lines.append("")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x
