"""``slices`` recipes (frankenmerges): layer ranges of several models stacked into one deeper or shallower model.

Output layer ``k`` is the ``k``-th layer in the slices' order, renamed to index ``k``. The tensors before the
layers (embeddings) come from the first slice's model, those after them (final norm, ``lm_head``) from the last
slice's model, like mergekit. Config, tokenizer and chat template come from the first slice's model, with
``num_hidden_layers`` (and a per-layer ``layer_types`` list, if any) rewritten. Tensors are copied in bounded
chunks straight from the memory-mapped inputs to the shard writer: memory does not grow with the model.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from mergekit_safe.errors import CheckpointError
from mergekit_safe.io.adapters import open_input
from mergekit_safe.io.writer import CheckpointWriter, TensorSpec
from mergekit_safe.merge.engine import (DEFAULT_CHUNK_ELEMS, DEFAULT_MAX_SHARD, MergeResult, check_output_path,
                                        hash_files)
from mergekit_safe.merge.recipe import Recipe, SliceSpec, layer_index, module_type

_INDEX_RE = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\.)")


@dataclass(frozen=True)
class _Copy:
    out_name: str
    source: Any  # the opened input (Checkpoint or adapter view)
    name: str  # the tensor's name in that input


def renumber(name: str, new_index: int) -> str:
    """``name`` with its transformer-block index replaced (``model.layers.7.x`` -> ``model.layers.2.x``)."""
    return _INDEX_RE.sub(lambda m: f"{m.group(1)}{new_index}{m.group(3)}", name, count=1)


def _layers(ckpt: Any) -> dict[int, list[str]]:
    by_layer: dict[int, list[str]] = {}
    for k in ckpt.keys():
        i = layer_index(k)
        if i is not None:
            by_layer.setdefault(i, []).append(k)
    return by_layer


def plan_slices(slices: list[SliceSpec], inputs: dict[str, Any]) -> list[_Copy]:
    """Every output tensor and where it is copied from, in output order.

    Raises:
        CheckpointError: a layer range outside a model, or a layer whose tensors do not match the first
            slice's layers (names or shapes), naming the file and tensor.
    """
    first, last = inputs[slices[0].model], inputs[slices[-1].model]
    template: dict[str, tuple[int, ...]] = {}
    for k in first.keys():
        if (i := layer_index(k)) is not None:
            template.setdefault(renumber(k, 0), tuple(first.info(k).shape))
    copies = [_Copy(k, first, k) for k in first.keys()
              if layer_index(k) is None and module_type(k) not in ("norm", "head")]
    out_index = 0
    for sl in slices:
        ckpt = inputs[sl.model]
        layers = _layers(ckpt)
        start, stop = sl.layer_range
        if stop > len(layers) or any(i not in layers for i in range(start, stop)):
            raise CheckpointError(f"{sl.model}: layer_range [{start}, {stop}] is outside its {len(layers)} layers")
        for i in range(start, stop):
            names = {renumber(k, 0): k for k in layers[i]}
            if set(names) != set(template):
                odd = sorted(set(names) ^ set(template))[0]
                raise CheckpointError(f"{sl.model}: layer {i} does not match the layers of {slices[0].model} "
                                      f"(tensor {odd!r})")
            for generic, k in names.items():
                if tuple(ckpt.info(k).shape) != template[generic]:
                    raise CheckpointError(f"{sl.model}: tensor {k!r} has shape {list(ckpt.info(k).shape)} but "
                                          f"{slices[0].model}'s layers have {list(template[generic])}")
                copies.append(_Copy(renumber(k, out_index), ckpt, k))
            out_index += 1
    for k in first.keys():
        if layer_index(k) is None and module_type(k) in ("norm", "head"):
            if k not in last:
                raise CheckpointError(f"{slices[-1].model}: missing tensor {k!r} (present in {slices[0].model})")
            copies.append(_Copy(k, last, k))
    return copies


def sliced_config(slices: list[SliceSpec], inputs: dict[str, Any]) -> dict[str, Any]:
    """The config updates of the stacked model: ``num_hidden_layers``, and ``layer_types`` when per layer."""
    total = sum(stop - start for start, stop in (sl.layer_range for sl in slices))
    updates: dict[str, Any] = {"num_hidden_layers": total}
    kinds = []
    for sl in slices:
        cfg = inputs[sl.model].config or {}
        types = cfg.get("layer_types")
        if not isinstance(types, list) or len(types) < sl.layer_range[1]:
            return updates
        kinds += types[sl.layer_range[0]:sl.layer_range[1]]
    updates["layer_types"] = kinds
    return updates


def merge_slices(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    overwrite: bool = False,
    allow_pickle: bool = False,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    hash_inputs: bool = True,
) -> MergeResult:
    """Stack the recipe's layer ranges into one checkpoint, published atomically at ``out_dir``.

    Args:
        recipe: a recipe with ``slices`` (see :func:`mergekit_safe.merge.recipe.slices_recipe_from_dict`).
        out_dir: output folder; must not exist unless ``overwrite``.
        max_shard_size: largest shard in bytes.
        overwrite: replace an existing output folder (only once the new one is complete).
        allow_pickle: accept pickled ``.bin`` inputs (loaded with ``weights_only=True``).
        chunk_elems: elements copied at a time (bounds memory).
        hash_inputs: record sha256 of every input file in the model card.

    Returns:
        A :class:`MergeResult`.

    Raises:
        RecipeError, CheckpointError, OutputError: one-line messages naming the file and tensor.

    Example:
        >>> merge_slices(load_recipe("franken.yml"), "./stacked")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    recipe.validate()
    check_output_path(out, recipe.input_paths())
    inputs = {p: open_input(p, allow_pickle=allow_pickle) for p in recipe.input_paths()}
    try:
        copies = plan_slices(recipe.slices, inputs)
        out_dtype = recipe.out_dtype()
        specs = []
        for c in copies:
            info = c.source.info(c.name)
            dtype = out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype
            specs.append(TensorSpec(c.out_name, info.shape, dtype))
        result = MergeResult(out, len(specs), sum(s.nbytes for s in specs), 0.0)
        with CheckpointWriter(out, specs, max_shard_size, overwrite=overwrite) as writer:
            for c, spec in zip(copies, specs):
                _copy(c, spec, writer, chunk_elems)
            first = inputs[recipe.slices[0].model]
            updates = sliced_config(recipe.slices, inputs)
            if recipe.dtype and first.config is not None:
                key = "dtype" if "dtype" in first.config else "torch_dtype"
                updates[key] = str(out_dtype).removeprefix("torch.")
            writer.copy_side_files(first.root, updates)
            if hash_inputs:
                result.input_hashes = hash_files([f for c in inputs.values() for f in c.files])
            writer.write_text("README.md", _card(recipe, result))
            writer.write_text("mergekit_safe_recipe.yml", recipe.to_yaml())
            writer.finalize()
    finally:
        for c in inputs.values():
            c.close()
    result.seconds = time.perf_counter() - t0
    return result


def _copy(c: _Copy, spec: TensorSpec, writer: CheckpointWriter, chunk_elems: int) -> None:
    numel = c.source.info(c.name).numel
    for start in range(0, max(numel, 1), max(1, chunk_elems)):
        stop = min(numel, start + chunk_elems)
        writer.write(spec.name, c.source.get(c.name, start, stop).to(spec.dtype))
    c.source.release(c.name)


def _card(recipe: Recipe, result: MergeResult) -> str:
    lines = ["---", "tags:", "- merge", "- mergekit-safe", "---", "", "# Stacked with mergekit-safe (slices)", "",
             "| output layers | model | layer_range |", "|---|---|---|"]
    k = 0
    for sl in recipe.slices:
        n = sl.layer_range[1] - sl.layer_range[0]
        lines.append(f"| {k}..{k + n - 1} | `{sl.model}` | [{sl.layer_range[0]}, {sl.layer_range[1]}] |")
        k += n
    lines += ["", "| file | sha256 |", "|---|---|"] + [f"| `{f}` | `{h}` |" for f, h in result.input_hashes.items()]
    return "\n".join(lines) + "\n"
