"""mergekit-safe: checkpoint merging and post-hoc safety repair for fine-tuned LLMs.

The public API, importable from the package root (loaded on first use, so ``import mergekit_safe`` stays
cheap)::

    merge(recipe, out_dir, ...)             # stream a merge to disk           (mergekit_safe.merge.engine)
    Recipe, ModelSpec, load_recipe          # merge recipes                    (mergekit_safe.merge.recipe)
    METHODS, get_method                     # the merge-method registry        (mergekit_safe.merge.methods)
    open_checkpoint, open_input             # lazy checkpoint / LoRA readers   (mergekit_safe.io.reader, adapters)
    TensorSource                            # what both readers implement      (mergekit_safe.io.source)
    evaluate, EvalReport                    # safety and utility evaluation    (mergekit_safe.eval)
    repair, RepairConfig                    # post-hoc repair                  (mergekit_safe.repair.command)
    ParameterEMA, EMACallback               # online EMA while fine-tuning     (mergekit_safe.training.ema)
    build_organism                          # the built-in model organism      (mergekit_safe.organism.build)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from mergekit_safe.errors import (
    CheckpointError,
    EvalError,
    KernelError,
    MergeKitSafeError,
    OutputError,
    RecipeError,
    SearchError,
)

_LAZY = {
    "merge": "mergekit_safe.merge.engine",
    "MergeResult": "mergekit_safe.merge.engine",
    "Recipe": "mergekit_safe.merge.recipe",
    "ModelSpec": "mergekit_safe.merge.recipe",
    "load_recipe": "mergekit_safe.merge.recipe",
    "METHODS": "mergekit_safe.merge.methods",
    "get_method": "mergekit_safe.merge.methods",
    "open_checkpoint": "mergekit_safe.io.reader",
    "open_input": "mergekit_safe.io.adapters",
    "TensorSource": "mergekit_safe.io.source",
    "evaluate": "mergekit_safe.eval",
    "EvalReport": "mergekit_safe.eval",
    "repair": "mergekit_safe.repair",
    "RepairConfig": "mergekit_safe.repair",
    "ParameterEMA": "mergekit_safe.training",
    "EMACallback": "mergekit_safe.training",
    "build_organism": "mergekit_safe.organism",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergekit_safe' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CheckpointError",
    "EvalError",
    "KernelError",
    "MergeKitSafeError",
    "OutputError",
    "RecipeError",
    "SearchError",
    "__version__",
    *_LAZY,
]
