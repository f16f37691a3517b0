"""The in-memory candidate space: ``theta = base + sum_g a_g * tau_g`` written into one loaded model in place.

One model is loaded once. The task vector ``tau`` (fine-tune minus base; for DARE / TIES the processed task
vector for the density and seed; for the safety vector ``aligned - unaligned`` on top of the fine-tune) is
computed once, and every candidate is written into the model's parameters in place with
:func:`mergekit_safe.kernels.apply_` (one Triton launch on GPU): no checkpoint is written per trial.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import SearchError
from mergekit_safe.io.source import TensorSource
from mergekit_safe.kernels import reference
from mergekit_safe.repair.groups import GroupSpec, group_of


@dataclass
class CandidateSpace:
    """A loaded model plus, per changed tensor, its base, its (processed) task vector and its group.

    Attributes:
        model: the model whose parameters are overwritten per candidate.
        names: checkpoint names of the tensors a candidate changes.
        groups: group names, in a fixed order.
        group_of: tensor name -> group.
        bases: fp32 (or the model's dtype) base tensors, by name.
        taus: task vectors, by name.
        targets: the model's parameter tensors, by name.
        method: the search method.
        current: the coefficients last applied (None: something else was loaded).
    """

    model: Any
    names: list[str]
    groups: list[str]
    group_of: dict[str, str]
    bases: dict[str, torch.Tensor]
    taus: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    method: str = "lerp"
    current: dict[str, float] | None = None

    def apply(self, coeffs: dict[str, float]) -> None:
        """Write ``base + a_g * tau`` into every changed parameter, in place (one kernels.apply_ call).

        Args:
            coeffs: coefficient per group.

        Raises:
            SearchError: a group has no coefficient.
        """
        missing = [g for g in self.groups if g not in coeffs]
        if missing:
            raise SearchError(f"no coefficient for group(s) {missing}; groups: {', '.join(self.groups)}")
        with torch.no_grad():
            kernels.apply_([self.targets[n] for n in self.names], [self.bases[n] for n in self.names],
                           [[self.taus[n]] for n in self.names],
                           [[float(coeffs[self.group_of[n]])] for n in self.names])
        self.current = dict(coeffs)

    def load(self, get: Callable[[str], torch.Tensor]) -> None:
        """Copy another checkpoint's tensors (``get(name)``) into the changed parameters (reference points)."""
        with torch.no_grad():
            for n in self.names:
                self.targets[n].copy_(get(n).view(self.targets[n].shape))
        self.current = None

    def uniform(self, value: float) -> dict[str, float]:
        """The same coefficient for every group."""
        return {g: float(value) for g in self.groups}


def _params_by_name(model: Any) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update({k: v for k, v in model.named_buffers() if k not in out})
    return out


def process_tau(name: str, tau: torch.Tensor, method: str, density: float, seed: int) -> torch.Tensor:
    """The task vector a method adds: raw (lerp, safety_vector), DARE drop-and-rescale, or TIES trim.

    Matches the engine's ``dare_linear`` / ``ties`` with one model, weight 1, so the written checkpoint of a
    candidate is the candidate.

    Args:
        name: the tensor's name (DARE's per-tensor random stream is keyed by it).
        tau: the raw task vector.
        method: a search method name.
        density, seed: DARE / TIES settings.

    Returns:
        The processed task vector (``tau`` itself for lerp and the safety vector).
    """
    if method == "dare_linear":
        return kernels.dare(tau, 1.0 - float(density), int(seed), reference.tensor_id(name, 0), rescale=True)
    if method == "ties":
        return kernels.ties([tau], [1.0], [float(density)], True)
    return tau


def build_space(
    model: Any,
    base: TensorSource,
    plus: TensorSource,
    minus: TensorSource | None,
    *,
    method: str = "lerp",
    groups: GroupSpec = GroupSpec(),
    num_layers: int,
    density: float = 0.5,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> CandidateSpace:
    """Build the candidate space on an already loaded ``model``.

    ``tau = plus - minus`` (``minus`` None: ``plus - base``), processed per :func:`process_tau`; tensors whose
    task vector is all zero are left out (they never change).

    Args:
        model: causal LM in memory; its parameter names must match the checkpoints' tensor names.
        base: checkpoint (``.get(name)``) the candidates start from.
        plus, minus: checkpoints whose difference is the task vector.
        method: a search method name (see :mod:`mergekit_safe.repair.strategies`).
        groups: the coefficient groups.
        num_layers: transformer blocks of the model.
        density, seed: DARE / TIES settings.
        names: tensors to consider (default: every floating tensor of ``base``).

    Returns:
        The :class:`CandidateSpace`.

    Raises:
        SearchError: a checkpoint tensor the model does not have, or a shape mismatch.
    """
    params = _params_by_name(model)
    bases, taus, gmap = {}, {}, {}
    for name in names if names is not None else base.keys():
        b = base.get(name)
        if not b.is_floating_point():
            continue
        if name not in params:
            raise SearchError(f"tensor {name!r} of {base.path} is not a parameter of the loaded model")
        target = params[name]
        p = plus.get(name).float()
        m = minus.get(name).float() if minus is not None else b.float()
        if p.shape != m.shape or p.numel() != target.numel():
            raise SearchError(f"tensor {name!r}: shapes {list(p.shape)} and {list(m.shape)} do not match the "
                              f"model's {list(target.shape)}")
        tau = process_tau(name, p - m, method, density, seed).view(target.shape)
        if minus is None and not bool(tau.any()):
            continue
        bases[name] = b.float().view(target.shape).to(target.device, target.dtype).clone()
        taus[name] = tau.to(target.device, target.dtype).contiguous()
        gmap[name] = group_of(name, groups, num_layers)
    if not bases:
        raise SearchError("the fine-tune does not differ from the base in any tensor; nothing to repair")
    order = list(dict.fromkeys(gmap.values()))
    names_out = list(bases)
    return CandidateSpace(model, names_out, order, gmap, bases, taus, {n: params[n].data for n in names_out},
                          method)


__all__ = ["CandidateSpace", "build_space", "process_tau"]
