"""Which weights carry the refusal: per-unit sensitivities, and coefficient groups chosen by them (``auto:K``).

A *unit* is one module type of one transformer block (``layers:L,modules`` with L the model's depth). At the
fine-tune (every coefficient 1) one backward pass gives, for every unit ``u``, the derivative of the mean
calibrated refusal margin on the harmful prompts, ``dR/da_u = sum_{t in u} <grad_t R, tau_t>``, and one more the
derivative of the mean per-token log-likelihood of the utility answers, ``dU/da_u``. Moving a unit back towards
the base (lowering ``a_u``) changes the margin by about ``-dR/da_u`` and the utility by ``-dU/da_u``, so the units
worth reverting first are those with the most refusal regained per utility given back:
``score_u = -dR/da_u / max(dU/da_u, eps)`` over units whose reversal raises the margin.

``auto:K`` sorts the units by that score and cuts the order into K groups of equal refusal regained (group
``auto0`` the most worth reverting). The search's first candidates then revert ``auto0``, ``auto0..1``, ...
(the fine-tune elsewhere), a one-dimensional path the sensitivities predict, before the sampler explores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


from mergekit_safe.repair.space import CandidateSpace


@dataclass
class Sensitivity:
    """Per-unit derivatives at the fine-tune.

    Attributes:
        refusal: ``dR/da_u``: the mean calibrated refusal margin's derivative (negative: the fine-tune's move in
            that unit lowers refusals).
        utility: ``dU/da_u``: the mean per-token log-likelihood of the utility answers' derivative.
        score: refusal regained per utility given back when the unit is reverted (higher: revert first).
    """

    refusal: dict[str, float]
    utility: dict[str, float]
    score: dict[str, float]

    def ranked(self) -> list[str]:
        """Units, most worth reverting first."""
        return sorted(self.score, key=lambda u: -self.score[u])

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the report's ``sensitivity``)."""
        return {"refusal": self.refusal, "utility": self.utility, "score": self.score, "ranked": self.ranked()}


def unit_derivatives(space: CandidateSpace, backward: Callable[[], None]) -> dict[str, float]:
    """``d f / d a_u`` for every group ``u`` of ``space`` at the model's current weights, where ``backward()``
    accumulates ``grad f`` into the parameters (one backward pass; the gradients are cleared before and after)."""
    params = dict(space.model.named_parameters())
    wanted = {n: params[n] for n in space.names if n in params}
    saved = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in wanted)
        p.grad = None
    try:
        backward()
        out: dict[str, float] = dict.fromkeys(space.groups, 0.0)
        for n, p in wanted.items():
            if p.grad is not None:
                out[space.group_of[n]] += float((p.grad.double() * space.taus[n].double()).sum())
        return out
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(saved[n])


def sensitivity(space: CandidateSpace, refusal_backward: Callable[[], None],
                utility_backward: Callable[[], None], eps: float = 1e-8) -> Sensitivity:
    """Both derivatives at the fine-tune (the space's all-ones point) and the revert score of every unit."""
    space.apply(space.uniform(1.0))
    r = unit_derivatives(space, refusal_backward)
    u = unit_derivatives(space, utility_backward)
    score = {g: (-r[g] / max(u[g], eps) if r[g] < 0 else -1.0 / (1.0 + abs(r[g]))) for g in space.groups}
    return Sensitivity(r, u, score)


def auto_groups(sens: Sensitivity, k: int) -> dict[str, str]:
    """Unit -> ``auto<i>``: the units in revert order cut into ``k`` groups of equal refusal regained (units that
    regain none go to the last group)."""
    order = sens.ranked()
    gain = {u: max(-sens.refusal[u], 0.0) for u in order}
    total = sum(gain.values())
    k = max(1, min(k, len(order)))
    out, acc = {}, 0.0
    for u in order:
        i = min(k - 1, int(k * acc / total)) if total > 0 else k - 1
        out[u] = f"auto{i}"
        acc += gain[u]
    return out


def regroup(space: CandidateSpace, unit_to_group: dict[str, str]) -> None:
    """Give ``space`` the coarser groups (in place): every tensor's group becomes its unit's group."""
    space.group_of = {n: unit_to_group[u] for n, u in space.group_of.items()}
    space.groups = sorted(set(space.group_of.values()), key=lambda g: int(g[4:]) if g[4:].isdigit() else 0)
    space.current = None


def revert_path(groups: Sequence[str], low: float = 0.0, high: float = 1.0) -> list[dict[str, float]]:
    """The warm-start candidates: groups reverted to ``low`` one more at a time in order (the rest ``high``)."""
    return [{g: (low if i < j else high) for i, g in enumerate(groups)} for j in range(1, len(groups))]


__all__ = ["Sensitivity", "auto_groups", "regroup", "revert_path", "sensitivity", "unit_derivatives"]
