"""YAML recipes: mergekit's layout, per-tensor coefficient rules, and whole-recipe validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_safe.errors import RecipeError
from mergekit_safe.merge.recipe import depth_position, layer_index, load_recipe, module_type, resolve_value

MERGEKIT_LINEAR = """\
# mergekit-safe merge --config recipe.yml -o out
models:
  - model: ./a
    parameters:
      weight: 0.25
  - model: ./b
    parameters:
      weight: 0.75
merge_method: linear
dtype: bfloat16
"""


def test_loads_a_mergekit_linear_recipe(tmp_path: Path) -> None:
    p = tmp_path / "r.yml"
    p.write_text(MERGEKIT_LINEAR)
    r = load_recipe(p)
    assert r.merge_method == "linear" and r.dtype == "bfloat16"
    assert [m.path for m in r.models] == ["./a", "./b"]
    assert r.resolve("model.layers.0.mlp.up_proj.weight", 2).per_model["weight"] == [0.25, 0.75]


def test_mergekit_slerp_recipe_lists_the_base_among_models(tmp_path: Path) -> None:
    p = tmp_path / "r.yml"
    p.write_text("models:\n  - model: ./a\n  - model: ./b\nmerge_method: slerp\nbase_model: ./a\n"
                 "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.3\n")
    r = load_recipe(p)
    assert [m.path for m in r.models] == ["./b"]  # the base is not merged with itself
    assert r.resolve("model.layers.1.self_attn.q_proj.weight", 3)["t"] == pytest.approx(0.5)
    assert r.resolve("model.layers.2.self_attn.q_proj.weight", 3)["t"] == pytest.approx(1.0)
    assert r.resolve("model.layers.2.mlp.up_proj.weight", 3)["t"] == pytest.approx(0.3)


def test_value_forms() -> None:
    assert resolve_value(0.4, "x", 4) == 0.4
    # gradient over depth: layer i of L at i/(L-1)
    assert resolve_value([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 5) == pytest.approx(0.25)
    assert resolve_value([0.0, 1.0, 0.0], "model.layers.2.mlp.up_proj.weight", 5) == pytest.approx(1.0)
    modules = {"attention": 0.1, "mlp": 0.2, "default": 0.9}
    assert resolve_value(modules, "model.layers.0.self_attn.o_proj.weight", 2) == 0.1
    assert resolve_value(modules, "model.layers.0.mlp.down_proj.weight", 2) == 0.2
    assert resolve_value(modules, "model.embed_tokens.weight", 2) == 0.9
    rules = [{"regex": r"layers\.[01]\.", "value": 0.0}, {"module": "head", "value": 0.7}, {"value": 0.5}]
    assert resolve_value(rules, "model.layers.1.mlp.up_proj.weight", 4) == 0.0
    assert resolve_value(rules, "lm_head.weight", 4) == 0.7
    assert resolve_value(rules, "model.layers.3.mlp.up_proj.weight", 4) == 0.5


def test_name_classification() -> None:
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None
    assert module_type("model.layers.0.input_layernorm.weight") == "norm"
    assert module_type("model.norm.weight") == "norm"
    assert module_type("lm_head.weight") == "head"
    assert module_type("model.embed_tokens.weight") == "embed"
    assert module_type("model.layers.0.mlp.gate_proj.weight") == "mlp"
    assert module_type("model.layers.0.self_attn.k_proj.weight") == "attention"
    assert depth_position("lm_head.weight", 4) == 1.0 and depth_position("model.embed_tokens.weight", 4) == 0.0


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text("merge_method: ties\nmodels:\n  - model: ./a\n    parameters:\n      alpha: 2\n"
                 "parameters:\n  density: 1.5\n  bogus: 1\ndtype: int4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == (
        f"{p}: merge_method ties needs a base_model; "
        "parameters.density: density=1.5 is outside [0.0, 1.0]; "
        "parameters: unknown parameter 'bogus' for ties; known: density, lambda, normalize, weight; "
        "models[0] (./a): 'alpha' is not a per-model parameter of ties; per-model: density, weight; "
        "dtype 'int4' is not one of float32, fp32, float16, fp16, bfloat16, bf16"
    )


@pytest.mark.parametrize("text,message", [
    ("merge_method: lerp\nmodels: [./b]\n", "merge_method lerp needs a base_model"),
    ("merge_method: nope\nmodels: [./b]\n", "unknown merge_method 'nope'"),
    ("models: [./b]\n", "missing merge_method"),
    ("merge_method: linear\nslices: []\nmodels: [./b]\n", "unknown keys ['models'] in a slices recipe"),
    ("merge_method: linear\nslices: [{sources: [{model: ./a, layer_range: [0, 2]}]}]\n",
     "slices recipes take merge_method passthrough, got 'linear'"),
    ("merge_method: passthrough\nslices: [{sources: [{model: ./a, layer_range: [0, 2]}, {model: ./b, "
     "layer_range: [0, 2]}]}]\n", "slices[0]: give exactly one source"),
    ("merge_method: passthrough\nslices: [{sources: [{model: ./a, layer_range: [3, 1]}]}]\n",
     "slices[0].sources[0].layer_range must be [start, stop] with 0 <= start < stop, got [3, 1]"),
    ("merge_method: lerp\nbase_model: ./a\nmodels: [./b, ./c]\n", "takes 1 model(s) besides the base, got 2"),
    ("merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: [0.1, x]}\n",
     "parameters.alpha[1]: alpha must be a finite number, got 'x'"),
    ("merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: {attn: 1}}\n",
     "alpha has unknown module types ['attn']"),
    ("merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: [{regex: '(', value: 1}]}\n",
     "bad regex '('"),
    ("[1, 2]\n", "a recipe must be a mapping"),
    ("merge_method: lerp\n  bad: [\n", "not valid YAML at line"),
])
def test_bad_recipes(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "r.yml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert message in str(e.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "none.yml")
