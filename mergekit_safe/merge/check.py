"""Check a recipe the way ``merge`` will, without merging: ``mergekit-safe validate``.

Everything ``merge`` refuses before writing is found here too, and every problem is reported at once: the
recipe's structure, method and parameters, then each input path (missing, not a checkpoint), then (when
those are sound) whether the inputs' tensors line up and every tensor's parameters resolve.
"""

from __future__ import annotations

from pathlib import Path

from mergekit_safe.errors import MergeKitSafeError
from mergekit_safe.io.adapters import open_input
from mergekit_safe.merge.engine import plan_merge
from mergekit_safe.merge.recipe import Recipe, read_recipe_yaml, recipe_problems


def check_recipe_file(path: str | Path, *, allow_pickle: bool = False) -> tuple[Recipe | None, list[str]]:
    """Every problem ``merge --config path`` would stop at.

    Args:
        path: the YAML recipe.
        allow_pickle: accept pickled ``.bin`` inputs, as ``merge --allow-pickle`` would.

    Returns:
        ``(recipe, problems)``; the recipe is None when the file is not a mapping.

    Raises:
        RecipeError: the file itself cannot be read as a bounded YAML document (one line).

    Example:
        >>> recipe, problems = check_recipe_file("recipe.yml")  # doctest: +SKIP
    """
    recipe, problems = recipe_problems(read_recipe_yaml(path), str(path))
    if recipe is not None:
        problems += input_problems(recipe, allow_pickle=allow_pickle, recipe_ok=not problems)
    return recipe, problems


def input_problems(recipe: Recipe, *, allow_pickle: bool = False, recipe_ok: bool = True) -> list[str]:
    """Problems with a recipe's inputs: each path that cannot be opened as a checkpoint, then (when all open
    and the recipe itself is valid) tensors that do not line up and parameters that do not resolve."""
    problems = []
    for p in dict.fromkeys(recipe.input_paths()):
        if not Path(p).exists():
            problems.append(f"{p}: no such file or directory")  # the path as the recipe spells it
            continue
        try:
            open_input(p, base=recipe.base_model, allow_pickle=allow_pickle).close()
        except MergeKitSafeError as e:
            problems.append(str(e))
    if problems or not recipe_ok:
        return problems
    try:
        plan = plan_merge(recipe, allow_pickle=allow_pickle)
    except MergeKitSafeError as e:
        return [str(e)]
    method, has_base = plan.method, recipe.base_model is not None
    try:
        for spec in plan.specs:
            if not spec.dtype.is_floating_point:
                continue  # integer buffers are copied, never merged
            try:
                params = recipe.resolve(spec.name, plan.num_layers)
                if method.coefficients is not None:
                    method.coefficients(params, has_base, len(recipe.models))
            except MergeKitSafeError as e:
                if str(e) not in problems:
                    problems.append(str(e))
    finally:
        for c in plan.inputs:
            c.close()
    return problems
