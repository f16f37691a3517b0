"""Coefficient groups: which tensors share a coefficient, and the inverse, recipe rules that give each its own.

``--groups`` splits the tensors so each group gets its own coefficient:

* ``global`` (default): one coefficient for everything;
* ``layers:K``: K contiguous bands of transformer blocks (block ``i`` of ``L`` is in band ``i*K // L``; the
  embeddings go with the first band, the final norm and the head with the last);
* ``modules``: one coefficient per module type (attention, mlp, embed, norm, head, other);
* ``layers:K,modules``: the cross product (band x module type, e.g. ``layers0-1/attention``); groups no tensor
  falls into are dropped;
* ``auto:K``: K groups chosen by measured sensitivity (:mod:`mergekit_safe.repair.sensitivity`): every block's
  module types are units, ranked by refusal regained per utility given back, cut into K groups. The cross product was chosen over concatenation because a coefficient then has one
  meaning (how far this module type of these blocks moves), and the exact-name recipe rules stay exact.

:func:`group_of` maps a tensor to its group; :func:`coefficient_rules` is its inverse, the recipe parameter that
gives every tensor its group's coefficient. Both live here so the two directions cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergekit_safe.errors import SearchError
from mergekit_safe.merge.recipe import MAX_REGEX_LEN, layer_index, module_type


@dataclass(frozen=True)
class GroupSpec:
    """How tensors are split into coefficient groups.

    Attributes:
        layers: number of contiguous layer bands (0: no split by depth).
        modules: split by module type.
        auto: number of sensitivity-chosen groups (0: none); the tensors start in per-block module units.
    """

    layers: int = 0
    modules: bool = False
    auto: int = 0

    def __str__(self) -> str:
        if self.auto:
            return f"auto:{self.auto}"
        parts = ([f"layers:{self.layers}"] if self.layers else []) + (["modules"] if self.modules else [])
        return ",".join(parts) or "global"


def parse_groups(spec: str | None) -> GroupSpec:
    """Parse ``--groups``: ``global``, ``layers:K``, ``modules`` or ``layers:K,modules``.

    Args:
        spec: the flag's value (None or empty: ``global``).

    Returns:
        The parsed :class:`GroupSpec`.

    Raises:
        SearchError: an unknown part or a bad K.

    Example:
        >>> parse_groups("layers:3,modules")
        GroupSpec(layers=3, modules=True)
    """
    if spec is None or spec.strip() in ("", "global"):
        return GroupSpec()
    if spec.strip().startswith("auto:"):
        try:
            k = int(spec.strip()[5:])
        except ValueError:
            k = 0
        if k < 1:
            raise SearchError(f"--groups {spec!r}: auto:K needs a whole number K >= 1, e.g. auto:4")
        return GroupSpec(auto=k)
    layers, modules = 0, False
    for part in (p.strip() for p in spec.split(",")):
        if part == "modules":
            modules = True
        elif part.startswith("layers:"):
            try:
                layers = int(part.split(":", 1)[1])
            except ValueError:
                layers = 0
            if layers < 1:
                raise SearchError(f"--groups {spec!r}: layers:K needs a whole number K >= 1, e.g. layers:3")
        else:
            raise SearchError(f"--groups {spec!r}: unknown part {part!r}; use global, layers:K, modules, "
                              "layers:K,modules or auto:K")
    return GroupSpec(layers, modules)


def _band(index: int, bands: int, num_layers: int) -> int:
    return index * bands // num_layers


def _band_name(band: int, bands: int, num_layers: int) -> str:
    members = [i for i in range(num_layers) if _band(i, bands, num_layers) == band]
    return f"layers{members[0]}-{members[-1]}" if len(members) > 1 else f"layers{members[0]}"


def group_of(name: str, spec: GroupSpec, num_layers: int) -> str:
    """The coefficient group of tensor ``name`` (``all`` when there is one group).

    Args:
        name: checkpoint tensor name.
        spec: the grouping.
        num_layers: transformer blocks of the model.

    Returns:
        The group's name, e.g. ``layers0-1/attention``.

    Example:
        >>> group_of("model.layers.1.mlp.up_proj.weight", GroupSpec(2, True), 2)
        'layers1/mlp'
    """
    if spec.auto:  # the units sensitivities are measured on; repair.sensitivity regroups them
        return group_of(name, GroupSpec(num_layers, True), num_layers)
    parts = []
    if spec.layers:
        i = layer_index(name)
        if i is None:
            i = 0 if module_type(name) == "embed" else num_layers - 1
        parts.append(_band_name(_band(min(i, num_layers - 1), spec.layers, num_layers), spec.layers, num_layers))
    if spec.modules:
        parts.append(module_type(name))
    return "/".join(parts) or "all"


def check_groups(spec: GroupSpec, num_layers: int) -> None:
    """Refuse ``layers:K`` with more bands than the model has layers.

    Raises:
        SearchError: naming the largest K allowed.
    """
    if spec.layers > num_layers:
        raise SearchError(f"--groups {spec}: the model has {num_layers} layers; use at most layers:{num_layers}")


def coefficient_rules(assignment: Mapping[str, str], spec: GroupSpec, coeffs: Mapping[str, float]) -> Any:
    """The recipe parameter value giving every tensor its group's coefficient, exactly (inverse of :func:`group_of`).

    One group: the number. Module groups: ``{module: ..., value: ...}`` rules. Anything else: one rule per group
    whose regex lists the group's tensor names (exact, whatever the naming scheme). Tensors not in
    ``assignment`` get 0 (they do not change).

    Args:
        assignment: tensor name -> group, for every tensor a candidate changes (insertion order kept).
        spec: the grouping that produced ``assignment``.
        coeffs: coefficient per group.

    Returns:
        A float or a list of rule dicts for a recipe parameter.

    Example:
        >>> coefficient_rules({"a.weight": "all"}, GroupSpec(), {"all": 0.5})
        0.5
    """
    groups = list(dict.fromkeys(assignment.values()))
    if len(groups) == 1:
        return float(coeffs[groups[0]])
    if spec.modules and not spec.layers:
        return [{"module": g, "value": float(coeffs[g])} for g in groups] + [{"value": 0.0}]
    rules: list[dict[str, Any]] = []
    for g in groups:
        members = [re.escape(n) for n, owner in assignment.items() if owner == g]
        rules += [{"regex": rx, "value": float(coeffs[g])} for rx in _alternations(members)]
    return rules + [{"value": 0.0}]


def _alternations(escaped: list[str]) -> list[str]:
    """``^(?:a|b|...)$`` patterns matching exactly the ``escaped`` names, each within the recipe's regex length limit
    (a per-block grouping of a real model lists hundreds of names: one pattern would be refused by ``validate``)."""
    out: list[str] = []
    part: list[str] = []
    for n in escaped:
        if part and len("^(?:)$") + sum(map(len, part)) + len(part) + len(n) > MAX_REGEX_LEN:
            out.append("^(?:" + "|".join(part) + ")$")
            part = []
        part.append(n)
    return out + (["^(?:" + "|".join(part) + ")$"] if part else [])


__all__ = ["GroupSpec", "check_groups", "coefficient_rules", "group_of", "parse_groups"]
