"""The in-memory candidate space: ``theta = base + sum_g a_g * tau_g`` written into one loaded model in place.

One model is loaded once. The task vector ``tau`` (fine-tune minus base; for DARE / TIES the processed task
vector for the density and seed; for the safety vector ``aligned - unaligned`` on top of the fine-tune) is
computed once, and every candidate is written into the model's parameters in place with
:func:`mergekit_safe.kernels.apply_` (one Triton launch on GPU): no checkpoint is written per trial.

The thresholded methods (Safe LoRA, SafeMERGE) are the same form with a per-tensor coefficient of 0 or 1: a
:class:`Switch` holds each weight matrix's score ``cos(P D, D)`` and its switched-on value (computed once by the
merge method's own function), and :meth:`Switch.is_on` is the one place that decides, from the group's threshold,
which of the two values a tensor takes. The value is copied, not recomputed, so the written checkpoint of a
candidate is the candidate bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_safe import kernels
from mergekit_safe.errors import SearchError
from mergekit_safe.io.source import TensorSource
from mergekit_safe.kernels import reference
from mergekit_safe.repair.groups import GroupSpec, group_of


@dataclass(frozen=True)
class Switch:
    """A thresholded method's per-tensor rule (``safe_lora``, ``safemerge``).

    Tensor ``n`` takes ``on[n]`` (the method's value for a drifting layer) when its score is at most its group's
    coefficient (below it with ``strict``), else the space's base (the fine-tune). The coefficient is the method's
    threshold, so a larger one switches more tensors on, i.e. adds safety.

    Attributes:
        scores: per tensor, ``cos(P D, D)`` (``+inf`` for a tensor the method never changes: never on).
        on: per switchable tensor, its switched-on value, already in the model's dtype and device.
        strict: on when ``score < threshold`` (SafeMERGE) instead of ``score <= threshold`` (Safe LoRA).
    """

    scores: dict[str, float]
    on: dict[str, torch.Tensor]
    strict: bool = False

    def is_on(self, name: str, threshold: float) -> bool:
        """Whether tensor ``name`` takes its switched-on value at ``threshold`` (the merge methods' rule)."""
        score = self.scores[name]
        return score < threshold if self.strict else score <= threshold


@dataclass
class CandidateSpace:
    """A loaded model plus, per changed tensor, its base, its (processed) task vector and its group.

    Attributes:
        model: the model whose parameters are overwritten per candidate.
        names: checkpoint names of the tensors a candidate changes.
        groups: group names, in a fixed order.
        group_of: tensor name -> group.
        bases: fp32 (or the model's dtype) base tensors, by name.
        taus: task vectors, by name (empty for a switched space: its values are in ``switch``).
        targets: the model's parameter tensors, by name.
        method: the search method.
        current: the coefficients last applied (None: something else was loaded).
        switch: for a thresholded method, the per-tensor rule (None: ``base + a_g * tau``).
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
    switch: Switch | None = None

    def apply(self, coeffs: dict[str, float]) -> None:
        """Write ``base + a_g * tau`` into every changed parameter, in place (one kernels.apply_ call); for a
        switched space, each tensor's switched-on value or its base (see :class:`Switch`).

        Args:
            coeffs: coefficient per group.

        Raises:
            SearchError: a group has no coefficient.
        """
        missing = [g for g in self.groups if g not in coeffs]
        if missing:
            raise SearchError(f"no coefficient for group(s) {missing}; groups: {', '.join(self.groups)}")
        with torch.no_grad():
            if self.switch is not None:
                for n in self.names:
                    on = self.switch.is_on(n, float(coeffs[self.group_of[n]]))
                    self.targets[n].copy_(self.switch.on[n] if on else self.bases[n])
            else:
                kernels.apply_([self.targets[n] for n in self.names], [self.bases[n] for n in self.names],
                               [[self.taus[n]] for n in self.names],
                               [[float(coeffs[self.group_of[n]])] for n in self.names])
        self.current = dict(coeffs)

    def at_base(self, coeffs: dict[str, float]) -> bool:
        """Whether ``coeffs`` leave every changed tensor at its base exactly (all zero; for a switched space, no
        tensor switched on), so the candidate is the measured base checkpoint itself."""
        if self.switch is not None:
            return not any(self.switch.is_on(n, float(coeffs[self.group_of[n]])) for n in self.names)
        return all(float(coeffs[g]) == 0.0 for g in self.groups)

    def load(self, get: Callable[[str], torch.Tensor]) -> None:
        """Copy another checkpoint's tensors (``get(name)``) into the changed parameters (reference points)."""
        with torch.no_grad():
            for n in self.names:
                self.targets[n].copy_(get(n).view(self.targets[n].shape))
        self.current = None

    def uniform(self, value: float) -> dict[str, float]:
        """The same coefficient for every group."""
        return {g: float(value) for g in self.groups}


def vocab_rows_differ(base: TensorSource, finetuned: TensorSource) -> bool:
    """Whether the fine-tune's embedding or head has another row count than the base's (it added tokens)."""
    from mergekit_safe.merge.vocab import is_vocab_tensor

    for name in base.keys():
        shape = tuple(base.info(name).shape)
        if is_vocab_tensor(name, shape) and name in finetuned and tuple(finetuned.info(name).shape) != shape:
            return True
    return False


@dataclass
class InVocabulary:
    """A checkpoint read in the fine-tune's vocabulary: its embedding and head rows laid out by token string.

    Row ``i`` of a vocabulary tensor is this checkpoint's row for the fine-tune's token ``i``, or the fine-tune's own
    row where this checkpoint lacks the token (:func:`~mergekit_safe.merge.vocab.align_rows`): the task vector is 0
    on the rows of added tokens, so every candidate keeps them as the fine-tune has them. That is also what the
    engine writes (a token the base lacks takes the row of the input that has it). Other tensors pass through.

    Attributes:
        source: the checkpoint (closed by :meth:`close`).
        vocab: its token string -> id.
        target: the fine-tune's token string -> id.
        fill: the fine-tune's checkpoint (rows for tokens ``source`` lacks; not closed here).
    """

    source: TensorSource
    vocab: dict[str, int]
    target: dict[str, int]
    fill: TensorSource

    @property
    def path(self) -> Any:
        """The checkpoint's path (for messages)."""
        return self.source.path

    def keys(self) -> list[str]:
        """Tensor names in storage order."""
        return self.source.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; a vocabulary tensor in the fine-tune's vocabulary (``[V_ft, H]``)."""
        from mergekit_safe.merge.vocab import align_rows, is_vocab_tensor

        t = self.source.get(name)
        if is_vocab_tensor(name, tuple(t.shape)) and name in self.fill:
            return align_rows(t, self.vocab, self.target, self.fill.get(name))
        return t

    def close(self) -> None:
        """Close the checkpoint."""
        self.source.close()


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


#: Search methods whose candidates are a per-tensor switch (see :class:`Switch`), and whether the switch is strict.
SWITCHED = {"safe_lora": False, "safemerge": True}


def safemerge_weights() -> dict[str, float]:
    """SafeMERGE's merge weights in a repair: the fine-tune's update keeps the merge method's default ``weight``;
    the safety model is the aligned base itself, i.e. ``safety_weight`` 0 (``aligned + sw * (aligned - aligned)``
    adds nothing, and a recipe cannot name its base as a model too), so a drifting layer becomes
    ``aligned + weight * (finetuned - aligned)``. The recipe that writes the candidate takes the same values."""
    from mergekit_safe.merge.methods import get_method

    default = next(p.default for p in get_method("safemerge").params if p.name == "weight")
    return {"weight": float(default), "safety_weight": 0.0}


def switched_value(name: str, method: str, aligned: torch.Tensor, finetuned: torch.Tensor,
                   unaligned: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """A weight matrix's switched-on value and score under ``safe_lora`` / ``safemerge``, from the merge methods'
    own per-tensor functions (so the engine writes the same value); None for a tensor they never change.

    A threshold of ``inf`` asks those functions for the switched-on branch whatever the score; the space applies
    the threshold itself (:class:`Switch`). SafeMERGE's weights: :func:`safemerge_weights`.
    """
    from mergekit_safe.merge import safety

    if not safety.applies(name, tuple(aligned.shape)):
        return None
    if method == "safe_lora":
        return safety.safe_lora_update(aligned, finetuned, unaligned, threshold=math.inf)
    return safety.safemerge_update(aligned, finetuned, unaligned, finetuned, threshold=math.inf,
                                   **safemerge_weights())


def _float_params(source: Any, names: Sequence[str] | None,
                  params: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, tensor, model parameter)`` for the floating-point tensors of ``source`` (``names``, or all).

    Raises:
        SearchError: a tensor is not a parameter of the loaded model.
    """
    for name in names if names is not None else source.keys():
        t = source.get(name)
        if not t.is_floating_point():
            continue
        if name not in params:
            raise SearchError(f"tensor {name!r} of {source.path} is not a parameter of the loaded model")
        yield name, t, params[name]


def _check_shapes(name: str, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse two checkpoint tensors whose shapes differ, or that do not fill the model's parameter."""
    if a.shape != b.shape or a.numel() != target.numel():
        raise SearchError(f"tensor {name!r}: shapes {list(a.shape)} and {list(b.shape)} do not match the "
                          f"model's {list(target.shape)}")


def _build_switched(model: Any, aligned: TensorSource, finetuned: TensorSource, unaligned: TensorSource, *,
                    method: str, groups: GroupSpec, num_layers: int,
                    names: Sequence[str] | None) -> CandidateSpace:
    """The switched space of ``safe_lora`` / ``safemerge``: bases are the fine-tune, each weight matrix switches
    to its :func:`switched_value`; tensors equal in both checkpoints are left out (they never change)."""
    params = _params_by_name(model)
    bases, on, scores, gmap = {}, {}, {}, {}
    for name, a, target in _float_params(aligned, names, params):
        f = finetuned.get(name)
        _check_shapes(name, f, a, target)
        if torch.equal(f, a):
            continue
        value = switched_value(name, method, a, f, unaligned.get(name)) if name in unaligned else None
        scores[name] = value[1] if value is not None else math.inf
        if value is not None:
            on[name] = value[0].view(target.shape).to(target.device, target.dtype).contiguous()
        bases[name] = f.view(target.shape).to(target.device, target.dtype).clone()
        gmap[name] = group_of(name, groups, num_layers)
    if not bases:
        raise SearchError("the fine-tune does not differ from the base in any tensor; nothing to repair")
    names_out = list(bases)
    return CandidateSpace(model, names_out, list(dict.fromkeys(gmap.values())), gmap, bases, {},
                          {n: params[n].data for n in names_out}, method, switch=Switch(scores, on, SWITCHED[method]))


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
    task vector is all zero are left out (they never change). For the thresholded methods (:data:`SWITCHED`)
    ``base`` is the aligned model, ``plus`` the fine-tune and ``minus`` the unaligned model, and the space is a
    :class:`Switch` whose coefficient is the threshold.

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
        SearchError: a checkpoint tensor the model does not have, a shape mismatch, or a thresholded method
            without ``minus``.
    """
    if method in SWITCHED:
        if minus is None:
            raise SearchError(f"--method {method} needs the unaligned model (V = aligned - unaligned)")
        return _build_switched(model, base, plus, minus, method=method, groups=groups, num_layers=num_layers,
                               names=names)
    params = _params_by_name(model)
    bases, taus, gmap = {}, {}, {}
    for name, b, target in _float_params(base, names, params):
        p = plus.get(name).float()
        m = minus.get(name).float() if minus is not None else b.float()
        _check_shapes(name, p, m, target)
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


__all__ = ["SWITCHED", "CandidateSpace", "InVocabulary", "Switch", "build_space", "process_tau", "safemerge_weights",
           "switched_value", "vocab_rows_differ"]
