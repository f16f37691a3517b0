"""Merge recipes: CLI flags or YAML (mergekit's field names), validation, per-tensor coefficients.

A parameter value in a recipe can be

* a number: the same everywhere;
* a list of numbers: a gradient over layer depth (mergekit's form), linearly interpolated; layer ``i`` of
  ``L`` sits at ``i / (L - 1)``, embeddings at 0, the final norm and head at 1;
* a list of rules, the first match winning: ``{filter: substring, value: v}`` (mergekit's form),
  ``{regex: pattern, value: v}`` or ``{module: attention|mlp|embed|norm|head|other, value: v}``, with a
  rule without a key as the fallback; a rule's value may itself be a gradient;
* a mapping from module types to values, with ``default``: ``{attention: 0.3, mlp: 0.6, default: 0.5}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_safe.errors import RecipeError
from mergekit_safe.io.dtypes import OUTPUT_DTYPES as DTYPES
from mergekit_safe.merge.methods import MergeMethod, Param, Resolved, clip, get_method, short_repr

try:  # the parser behind ``re``: a public module before Python 3.11, a private one (same API) since
    import re._parser as _sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MODULE_TYPES = ("attention", "mlp", "embed", "norm", "head", "other")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_RECIPE_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "tokenizer_source", "out_dtype",
                "chat_template"}

# Limits that turn a hostile or mistaken recipe into one clear line instead of minutes of work or a MemoryError.
MAX_MODELS = 256  # every chunk reads all inputs at once; EMA over a long run is the largest real use
MAX_RECIPE_BYTES = 1 << 20  # real recipes are a few KB
MAX_YAML_NODES = 100_000  # values after alias expansion: an alias bomb of 644 bytes expands to ~10^9
MAX_REGEX_LEN = 1000
MAX_REGEX_UNBOUNDED = 4  # sequential unbounded repeats cost O(len(name)^k) on a failing match
MAX_PROBLEMS = 20  # problems listed in one error; the rest are counted


def layer_index(name: str) -> int | None:
    """The transformer block index in a tensor name (``model.layers.7.mlp.up_proj.weight`` -> 7), or None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def num_layers(config_or_names: Any, *, fallback_names: Iterable[str] = ()) -> int:
    """How many transformer blocks a model has: the one place layers are counted.

    Args:
        config_or_names: a model config (a ``config.json`` dict or a ``transformers`` config object; a
            multimodal one's ``text_config`` counts) or an iterable of tensor names.
        fallback_names: tensor names counted when the config does not say. Default none.

    Returns:
        ``num_hidden_layers`` from the config; for names, one more than the largest :func:`layer_index`;
        1 when nothing says (a model without blocks is one band).

    Example:
        >>> num_layers({"num_hidden_layers": 4}), num_layers(["model.layers.2.mlp.up_proj.weight"])
        (4, 3)
    """
    if isinstance(config_or_names, dict) or hasattr(config_or_names, "to_dict"):
        cfg = config_or_names if isinstance(config_or_names, dict) else config_or_names.to_dict()
        n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
        return int(n) if n else num_layers(fallback_names)
    found = [i for name in config_or_names if (i := layer_index(name)) is not None]
    return max(found) + 1 if found else 1


def module_type(name: str) -> str:
    """Classify a tensor name as attention, mlp, embed, norm, head or other."""
    n = name.lower()
    if "lm_head" in n or n.startswith("output.") or n == "output.weight":
        return "head"
    if any(k in n for k in ("embed", "wte", "wpe")):
        return "embed"
    if "norm" in n or re.search(r"(^|\.)ln_?\w*\.", n):
        return "norm"
    if any(k in n for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(k in n for k in ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "experts")):
        return "mlp"
    return "other"


def depth_position(name: str, num_layers: int) -> float:
    """Where a tensor sits along the depth, in [0, 1]: layer i of L at i/(L-1); embed 0, head/final norm 1."""
    i = layer_index(name)
    if i is not None:
        return i / (num_layers - 1) if num_layers > 1 else 0.0
    return 1.0 if module_type(name) in ("head", "norm") else 0.0


def _interp(values: list[float], x: float) -> float:
    if len(values) == 1:
        return float(values[0])
    pos = x * (len(values) - 1)
    lo = min(int(math.floor(pos)), len(values) - 2)
    frac = pos - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


_REPEATS = ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")


def regex_problem(pattern: str) -> str | None:
    r"""Why a rule's regex is refused, or None when it is safe to run on every tensor name.

    ``re`` backtracks, so a pattern such as ``(a+)+b`` takes exponential time on a name that almost matches,
    and a merge hangs while ``validate`` says ok. We refuse, up front and the same way in ``validate`` and
    ``merge``, the shapes that backtrack catastrophically: a repeat inside a repeat, alternation inside a
    repeat, backreferences, and more than :data:`MAX_REGEX_UNBOUNDED` unbounded repeats. A static check (not
    a time limit) keeps the decision deterministic and independent of the machine's load; rule regexes select
    tensor names and never need those shapes (``layers\.(1|2)\..*`` and ``.*_proj`` are fine).
    """
    if len(pattern) > MAX_REGEX_LEN:
        return f"longer than {MAX_REGEX_LEN} characters"
    try:
        tree = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        return f"not a regular expression ({e})"
    unbounded = [0]
    problem = _walk_regex(list(tree), False, unbounded)
    if problem is None and unbounded[0] > MAX_REGEX_UNBOUNDED:
        problem = f"{unbounded[0]} unbounded repeats (at most {MAX_REGEX_UNBOUNDED})"
    if problem is None or problem.startswith(("not a regular", "longer than")):
        return problem
    return problem + ": such patterns can backtrack for minutes; simplify it"


def _walk_regex(items: list[Any], in_repeat: bool, unbounded: list[int]) -> str | None:
    for op, av in items:
        name, subs = str(op), []
        if name in _REPEATS:
            lo, hi, sub = av
            repeats = hi is _sre_parse.MAXREPEAT or hi > 1
            if repeats and in_repeat:
                return "a repeat nested inside a repeat"
            unbounded[0] += hi is _sre_parse.MAXREPEAT
            if (problem := _walk_regex(list(sub), in_repeat or repeats, unbounded)) is not None:
                return problem
            continue
        if name == "BRANCH":
            if in_repeat:
                return "an alternation inside a repeat"
            subs = av[1]
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            return "a backreference"
        elif name == "SUBPATTERN":
            subs = [av[-1]]
        elif name in ("ASSERT", "ASSERT_NOT"):
            subs = [av[1]]
        elif name == "ATOMIC_GROUP":
            subs = [av]
        for sub in subs:
            if (problem := _walk_regex(list(sub), in_repeat, unbounded)) is not None:
                return problem
    return None


def _rule_matches(rule: dict[str, Any], name: str) -> bool:
    if "filter" in rule:
        return str(rule["filter"]) in name
    if "regex" in rule:
        return re.search(str(rule["regex"]), name) is not None
    if "module" in rule:
        return module_type(name) == rule["module"]
    return True


def resolve_value(value: Any, name: str, num_layers: int) -> Any:
    """Resolve a recipe parameter value for the tensor ``name`` (see the module docstring for the forms)."""
    if isinstance(value, dict):
        return resolve_value(value.get(module_type(name), value.get("default")), name, num_layers)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for rule in value:
            if _rule_matches(rule, name):
                return resolve_value(rule.get("value"), name, num_layers)
        return None
    if isinstance(value, list):
        return _interp([float(v) for v in value], depth_position(name, num_layers))
    return value


def _value_problems(param: Param, value: Any, where: str) -> list[str]:
    """Check every number a (possibly rule-shaped) value can resolve to."""
    if isinstance(value, dict):
        bad = [k for k in value if k not in (*MODULE_TYPES, "default")]
        if bad:
            return [f"{where}: {param.name} has unknown module types {short_repr(bad)}; "
                    f"use {', '.join(MODULE_TYPES)} or default"]
        return [p for k, v in value.items() for p in _value_problems(param, v, f"{where}.{k}")]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = []
        for i, rule in enumerate(value):
            keys = set(rule) - {"value"}
            if len(keys) > 1 or keys - {"filter", "regex", "module"}:
                out.append(f"{where}[{i}]: a rule takes one of filter, regex or module, plus value; "
                           f"got {short_repr(sorted(map(str, rule)))}")
            if "value" not in rule:
                out.append(f"{where}[{i}]: rule has no value")
                continue
            if rule.get("module") is not None and rule["module"] not in MODULE_TYPES:
                out.append(f"{where}[{i}]: module {short_repr(rule['module'])} is not one of {', '.join(MODULE_TYPES)}")
            if "regex" in rule:
                if not isinstance(rule["regex"], str):
                    out.append(f"{where}[{i}]: regex must be a string, got {short_repr(rule['regex'])}")
                elif (problem := regex_problem(rule["regex"])) is not None:
                    out.append(f"{where}[{i}]: bad regex {short_repr(rule['regex'])}: {problem}")
            out += _value_problems(param, rule["value"], f"{where}[{i}].value")
        return out
    if isinstance(value, list):
        if not param.tensor:
            return [f"{where}: {param.name} takes one value, not a list"]
        if not value:
            return [f"{where}: {param.name} is an empty list"]
        return [p for i, v in enumerate(value) if (p := param.check(v, f"{where}[{i}]"))]
    problem = param.check(value, where)
    return [problem] if problem else []


@dataclass(frozen=True)
class SliceSpec:
    """One slice of a ``slices`` recipe (a frankenmerge): layers ``[start, stop)`` of one model, in order.

    Attributes:
        model: the source model's path.
        layer_range: ``(start, stop)``, half-open like mergekit's ``layer_range``.
    """

    model: str
    layer_range: tuple[int, int]


@dataclass
class ModelSpec:
    """One input model of a recipe: its path and its own parameters."""

    path: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A merge: method, inputs and parameters. Field names follow mergekit where the meaning is the same.

    Attributes:
        merge_method: a name from :data:`mergekit_safe.merge.methods.METHODS`.
        models: the models, in order (the base model is removed from this list if listed there too).
        base_model: path of the base model, or None.
        parameters: method parameters shared by all models.
        dtype: output dtype name (default: the inputs' dtype).
        tokenizer_source: where the output's vocabulary and tokenizer come from: ``"base"`` (the base model,
            else the first input), an input path, or ``"union"`` (every input's tokens, the base's ids first;
            embedding rows matched by token string, see :mod:`mergekit_safe.merge.vocab`). Default None: the
            input the method takes its config from (the base for most methods; the fine-tune for ``lerp``, the
            last checkpoint for ``ema``). Config and generation config come from the base for a union, else
            from the tokenizer source.
        chat_template: where the output's chat template comes from: ``"base"`` or an input path. Default
            None: the tokenizer source's, i.e. the base's for a union.
        source: where the recipe came from, for error messages.
        slices: a ``slices`` recipe's layer ranges, stacked in order (``passthrough`` only; then ``models`` is
            empty and the inputs are the slices' models).
    """

    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = None
    source: str | None = None
    chat_template: str | None = None
    slices: list[SliceSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.base_model is not None:
            self.models = [m for m in self.models if m.path != self.base_model]

    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def input_paths(self) -> list[str]:
        """Every input path, the base first when there is one (a slices recipe: each model once, in order)."""
        if self.slices:
            return list(dict.fromkeys(sl.model for sl in self.slices))
        return ([self.base_model] if self.base_model else []) + [m.path for m in self.models]

    def out_dtype(self) -> torch.dtype | None:
        """The requested output dtype, or None for 'same as the inputs'."""
        return DTYPES[self.dtype] if self.dtype else None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as mergekit-style YAML data."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.slices:
            return {**out, **slices_to_dict(self.slices, self.dtype)}
        if self.base_model:
            out["base_model"] = self.base_model
        out["models"] = [{"model": m.path, **({"parameters": m.parameters} if m.parameters else {})} for m in self.models]
        if self.parameters:
            out["parameters"] = self.parameters
        if self.dtype:
            out["dtype"] = self.dtype
        if self.tokenizer_source:
            out["tokenizer_source"] = self.tokenizer_source
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def problems(self) -> list[str]:
        """Every problem with this recipe, so a user can fix them all at once (empty when valid)."""
        out: list[str] = []
        if len(self.models) > MAX_MODELS:
            return [f"{len(self.models)} models: at most {MAX_MODELS} can be merged at once"]
        try:
            method = self.method
        except RecipeError as e:
            return [str(e)]
        if self.slices:
            return slice_problems(self)
        if method.base == "required" and not self.base_model:
            out.append(f"merge_method {method.name} needs a base_model")
        if method.base == "none" and self.base_model:
            out.append(f"merge_method {method.name} takes no base_model")
        n = len(self.models)
        hi = method.max_models
        if n < method.min_models or (hi is not None and n > hi):
            want = f"{method.min_models}" if hi == method.min_models else f"{method.min_models}..{hi or 'any'}"
            out.append(f"merge_method {method.name} takes {want} model(s) besides the base, got {n}")
        known = {p.name for p in method.params}
        for key, value in self.parameters.items():
            param = method.param(key)
            if param is None:
                out.append(f"parameters: unknown parameter {short_repr(key)} for {method.name}; "
                           f"known: {', '.join(sorted(known))}")
            else:
                out += _value_problems(param, value, f"parameters.{key}")
        for i, m in enumerate(self.models):
            for key, value in m.parameters.items():
                param = method.param(key)
                if param is None or not param.per_model:
                    per = sorted(p.name for p in method.params if p.per_model)
                    out.append(f"models[{i}] ({clip(m.path)}): {short_repr(key)} is not a per-model parameter "
                               f"of {method.name}; "
                               f"per-model: {', '.join(per) or 'none'}")
                else:
                    out += _value_problems(param, value, f"models[{i}].parameters.{key}")
        for p in method.params:
            if p.default is None and p.name not in self.parameters:
                missing = [i for i, m in enumerate(self.models) if p.name not in m.parameters]
                if not p.per_model or missing:
                    out.append(f"parameter {p.name!r} is required by {method.name}")
        if self.dtype is not None and self.dtype not in DTYPES:
            out.append(f"dtype {short_repr(self.dtype)} is not one of {', '.join(DTYPES)}")
        if self.tokenizer_source not in (None, "base", "union") and self.tokenizer_source not in self.input_paths():
            out.append(f"tokenizer_source {short_repr(self.tokenizer_source)} must be 'base', 'union' or one of "
                       "the input paths")
        if self.chat_template not in (None, "base") and self.chat_template not in self.input_paths():
            out.append(f"chat_template {short_repr(self.chat_template)} must be 'base' or one of the input paths")
        return out

    def validate(self) -> Recipe:
        """Raise :class:`RecipeError` listing every problem, or return self."""
        problems = self.problems()
        if problems:
            raise RecipeError(capped(problems), self.source)
        return self

    def resolve(self, name: str, num_layers: int) -> Resolved:
        """The method's parameters for tensor ``name``: model value, else recipe-wide value, else default."""
        method = self.method
        values: dict[str, Any] = {}
        per_model: dict[str, list[float]] = {}
        for p in method.params:
            if p.per_model:
                per_model[p.name] = [
                    _number(p, resolve_value(m.parameters.get(p.name, self.parameters.get(p.name, p.default)), name,
                                             num_layers), name)
                    for m in self.models
                ]
            else:
                values[p.name] = _number(p, resolve_value(self.parameters.get(p.name, p.default), name, num_layers),
                                         name)
        return Resolved(values, per_model)


def _number(param: Param, value: Any, name: str) -> Any:
    if value is None:
        if param.default is None:
            raise RecipeError(f"parameter {param.name!r} has no value for tensor {name!r} (no rule matched)")
        return param.default
    return value


def capped(problems: list[str]) -> list[str]:
    """The first :data:`MAX_PROBLEMS` problems, and a count of the rest."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return problems[:MAX_PROBLEMS] + [f"and {len(problems) - MAX_PROBLEMS} more problems"]


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Build a :class:`Recipe` from parsed YAML (mergekit's layout), reporting every problem at once.

    Raises:
        RecipeError: unknown keys, wrong types, or an invalid method/parameter combination.
    """
    recipe, problems = recipe_problems(data, source)
    if problems or recipe is None:
        raise RecipeError(capped(problems), source)
    return recipe


def recipe_problems(data: Any, source: str | None = None) -> tuple[Recipe | None, list[str]]:
    """Build what can be built of a recipe and list every problem with it (structure, method, parameters).

    Returns:
        ``(recipe, problems)``: the recipe is None only when ``data`` is not a mapping; it may be invalid
        when ``problems`` is not empty (its paths are still worth checking).
    """
    if not isinstance(data, dict):
        return None, ["a recipe must be a mapping with merge_method and models"]
    if "slices" in data:
        try:
            return slices_recipe_from_dict(data, source), []
        except RecipeError as e:
            return None, e.problems
    problems = []
    unknown = sorted(map(str, set(data) - _RECIPE_KEYS - {"slices"}))
    if unknown:
        problems.append(f"unknown keys {short_repr(unknown)}; known: {', '.join(sorted(_RECIPE_KEYS))}")
    method = data.get("merge_method")
    if method is None:
        problems.append("missing merge_method")
    elif not isinstance(method, str):
        problems.append(f"merge_method must be a name, got {short_repr(method)}")
    for key in ("base_model", "dtype", "out_dtype", "tokenizer_source", "chat_template"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"{key} must be a string, got {short_repr(data[key])}")
    entries = data.get("models")
    too_many = isinstance(entries, list) and len(entries) > MAX_MODELS
    models = _models(entries, problems)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        problems.append("parameters must be a mapping")
        params = {}
    text = lambda key: data[key] if isinstance(data.get(key), str) else None  # noqa: E731
    recipe = Recipe(
        merge_method=method if isinstance(method, str) else "", models=models, base_model=text("base_model"),
        parameters=dict(params), dtype=text("out_dtype") or text("dtype"), tokenizer_source=text("tokenizer_source"),
        source=source, chat_template=text("chat_template"),
    )
    if isinstance(method, str) and not too_many:  # with the models dropped, their checks would mislead
        problems += recipe.problems()
    return recipe, problems


def _models(entries: Any, problems: list[str]) -> list[ModelSpec]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        problems.append("models must be a list of paths or {model: path} mappings")
        return []
    if len(entries) > MAX_MODELS:
        problems.append(f"{len(entries)} models: at most {MAX_MODELS} can be merged at once")
        return []
    models = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            models.append(ModelSpec(entry))
        elif isinstance(entry, dict) and isinstance(entry.get("model"), str):
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                problems.append(f"models[{i}].parameters must be a mapping")
                params = {}
            models.append(ModelSpec(entry["model"], dict(params)))
        else:
            problems.append(f"models[{i}] must be a path or a mapping with a 'model' path, got {short_repr(entry)}")
    return models


def read_recipe_yaml(path: str | Path) -> Any:
    """Parse a recipe file with bounds: its size, the expanded size of YAML aliases, and nesting depth.

    YAML aliases (``*name``) are allowed (mergekit recipes use them to share parameters), but the document they
    expand to is counted, so a few hundred bytes of nested aliases cannot become billions of values; a
    recursive alias is refused.

    Raises:
        RecipeError: one line naming the file: missing, too large, not YAML, an alias bomb or a recursive alias.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such file") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{p}: larger than {MAX_RECIPE_BYTES // 1024} KB; a recipe is a short YAML file")
    loader = yaml.CSafeLoader(raw) if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, {}, set(), p)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{p}: not valid YAML{where} ({getattr(e, 'problem', None) or 'parse error'})") from None
    except RecursionError:
        raise RecipeError(f"{p}: nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def _count_nodes(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], path: Path) -> int:
    """Values in ``node`` once aliases are expanded (memoised per shared node), up to just over the limit."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        mark = node.start_mark
        raise RecipeError(f"{path}: recursive YAML alias at line {mark.line + 1} (a value that contains itself)")
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [x for pair in node.value for x in pair]
    else:
        children = []
    for child in children:
        total += _count_nodes(child, sizes, open_nodes, path)
        if total > MAX_YAML_NODES:
            raise RecipeError(f"{path}: expands to more than {MAX_YAML_NODES} values (YAML aliases nested too "
                              "deeply?); write the values out")
    open_nodes.discard(key)
    sizes[key] = total
    return total


_SLICES_KEYS = {"slices", "merge_method", "dtype", "out_dtype"}


def slices_recipe_from_dict(data: dict[str, Any], source: str | None = None) -> Recipe:
    """Build a ``slices`` recipe (mergekit's frankenmerge form), reporting every problem at once.

    The supported form stacks one source per slice with ``merge_method: passthrough``::

        slices:
          - sources: [{model: ./a, layer_range: [0, 16]}]
          - sources: [{model: ./b, layer_range: [8, 24]}]
        merge_method: passthrough

    Raises:
        RecipeError: other keys, several sources in a slice, or a malformed ``layer_range``.
    """
    problems = []
    unknown = sorted(set(data) - _SLICES_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown} in a slices recipe; known: {', '.join(sorted(_SLICES_KEYS))}")
    raw = data.get("slices")
    if not isinstance(raw, list) or not raw:
        problems.append("slices must be a non-empty list of {sources: [{model, layer_range}]}")
        raw = []
    slices = []
    for i, entry in enumerate(raw):
        sources = entry.get("sources") if isinstance(entry, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            n = len(sources) if isinstance(sources, list) else 0
            problems.append(f"slices[{i}]: give exactly one source (passthrough stacks layers; merging several "
                            f"sources per slice is not supported), got {n}")
            continue
        src = sources[0]
        rng = src.get("layer_range") if isinstance(src, dict) else None
        if not isinstance(src, dict) or not isinstance(src.get("model"), str):
            problems.append(f"slices[{i}].sources[0] must be a mapping with a 'model' path")
        elif set(src) - {"model", "layer_range"}:
            problems.append(f"slices[{i}].sources[0]: unknown keys {sorted(set(src) - {'model', 'layer_range'})}")
        elif (not isinstance(rng, list) or len(rng) != 2 or not all(type(x) is int for x in rng)
              or not 0 <= rng[0] < rng[1]):
            problems.append(f"slices[{i}].sources[0].layer_range must be [start, stop] with 0 <= start < stop, "
                            f"got {rng!r}")
        else:
            slices.append(SliceSpec(src["model"], (rng[0], rng[1])))
    if problems:
        raise RecipeError(problems, source)
    recipe = Recipe(merge_method=str(data.get("merge_method", "passthrough")), models=[],
                    dtype=data.get("out_dtype") or data.get("dtype"), source=source, slices=slices)
    return recipe.validate()


def slice_problems(recipe: Recipe) -> list[str]:
    """What is wrong with a slices recipe (empty when valid)."""
    out = []
    if recipe.merge_method != "passthrough":
        out.append(f"slices recipes take merge_method passthrough, got {recipe.merge_method!r}")
    if recipe.models or recipe.base_model or recipe.parameters:
        out.append("a slices recipe takes no models, base_model or parameters")
    if recipe.dtype is not None and recipe.dtype not in DTYPES:
        out.append(f"dtype {recipe.dtype!r} is not one of {', '.join(DTYPES)}")
    return out


def slices_to_dict(slices: list[SliceSpec], dtype: str | None) -> dict[str, Any]:
    """The ``slices`` (and ``dtype``) part of a recipe as mergekit-style YAML data."""
    out: dict[str, Any] = {"slices": [{"sources": [{"model": sl.model, "layer_range": list(sl.layer_range)}]}
                                      for sl in slices]}
    if dtype:
        out["dtype"] = dtype
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe. Relative model paths are taken relative to the current directory.

    Raises:
        RecipeError: the file is missing, is not YAML, or describes an invalid merge.

    Example:
        >>> recipe = load_recipe("recipe.yml")  # doctest: +SKIP
    """
    return recipe_from_dict(read_recipe_yaml(path), str(path))
