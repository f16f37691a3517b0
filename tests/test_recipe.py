"""YAML recipes: mergekit's layout, per-tensor coefficient rules, and whole-recipe validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_safe.errors import RecipeError
from mergekit_safe.merge.methods import METHODS
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


# --- bounds: a recipe cannot hang, explode or print a huge value

from mergekit_safe.merge.recipe import MAX_MODELS, MAX_YAML_NODES, recipe_problems  # noqa: E402

ALIAS_BOMB = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['0.5'] * 9)}]\n" for i in range(9)
) + "merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: *l8}\n"


def load_text(tmp_path: Path, text: str) -> str:
    p = tmp_path / "r.yml"
    p.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    return str(e.value)


def test_alias_bomb_is_one_short_line(tmp_path: Path) -> None:
    assert len(ALIAS_BOMB) < 1000  # 9**9 values once expanded
    msg = load_text(tmp_path, ALIAS_BOMB)
    assert msg == f"{tmp_path / 'r.yml'}: expands to more than {MAX_YAML_NODES} values (YAML aliases nested too " \
                  "deeply?); write the values out"


def test_recursive_alias_is_one_line(tmp_path: Path) -> None:
    msg = load_text(tmp_path, "merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: &x [1, *x]}\n")
    assert msg == f"{tmp_path / 'r.yml'}: recursive YAML alias at line 4 (a value that contains itself)"


def test_small_aliases_still_work(tmp_path: Path) -> None:
    # mergekit recipes share parameters with anchors; that stays allowed
    p = tmp_path / "r.yml"
    p.write_text("models:\n  - model: ./b\n    parameters: &p {weight: 0.3, density: 0.5}\n"
                 "  - model: ./c\n    parameters: *p\nmerge_method: ties\nbase_model: ./a\n")
    r = load_recipe(p)
    assert [m.parameters for m in r.models] == [{"weight": 0.3, "density": 0.5}] * 2


def test_deep_nesting_and_huge_files_are_one_line(tmp_path: Path) -> None:
    msg = load_text(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert msg.endswith(("nested too deeply to be a recipe", "(exceeded maximum nesting depth)")), msg  # libyaml's
    assert "larger than 1024 KB" in load_text(tmp_path, "# " + "x" * (1 << 20) + "\n")


def test_too_many_models(tmp_path: Path) -> None:
    msg = load_text(tmp_path, "merge_method: linear\nmodels: [" + ", ".join(["./m"] * (MAX_MODELS + 1)) + "]\n")
    assert msg == f"{tmp_path / 'r.yml'}: {MAX_MODELS + 1} models: at most {MAX_MODELS} can be merged at once"


def test_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    long = "[" + ", ".join(f"'{'x' * 50}'" for _ in range(5000)) + "]"
    msg = load_text(tmp_path, f"merge_method: lerp\nbase_model: ./a\nmodels: [./b]\ndtype: {long}\n"
                              f"parameters:\n  alpha:\n    attention: 0.5\n    ? {'y' * 5000}\n    : 1\n")
    assert len(msg) < 800, msg
    assert "dtype must be a string" in msg and "unknown module types" in msg


@pytest.mark.parametrize("value,message", [
    ("1.0e+300", "alpha=1e+300 is outside [-1000000.0, 1000000.0]"),
    ("1e300", "alpha must be a finite number, got '1e300'"),  # YAML 1.1: a float needs a dot
    (".nan", "alpha must be a finite number, got nan"),
    ("-.inf", "alpha must be a finite number, got -inf"),
    ("[0.1, 1.0e+400]", "parameters.alpha[1]: alpha must be a finite number, got inf"),
])
def test_non_finite_and_absurd_numbers(tmp_path: Path, value: str, message: str) -> None:
    msg = load_text(tmp_path, f"merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {{alpha: {value}}}\n")
    assert message in msg


@pytest.mark.parametrize("pattern,why", [
    ("(a+)+$", "a repeat nested inside a repeat"),
    ("(x|xx)*y", "an alternation inside a repeat"),
    (r"(\w+)\1", "a backreference"),
    (".*a.*b.*c.*d.*e", "5 unbounded repeats (at most 4)"),
    ("(", "not a regular expression"),
])
def test_backtracking_regex_rules_are_refused(tmp_path: Path, pattern: str, why: str) -> None:
    text = (f"merge_method: lerp\nbase_model: ./a\nmodels: [./b]\n"
            f"parameters:\n  alpha:\n    - regex: '{pattern}'\n      value: 0.1\n    - value: 0.5\n")
    assert f"parameters.alpha[0]: bad regex '{pattern}'".replace("\\\\", "\\") in load_text(tmp_path, text).replace(
        "\\\\", "\\")
    assert why in load_text(tmp_path, text)


def test_safe_regex_rules_are_kept(tmp_path: Path) -> None:
    p = tmp_path / "r.yml"
    p.write_text("merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters:\n  alpha:\n"
                 "    - regex: 'layers\\.(1|2)\\..*_proj'\n      value: 0.1\n    - value: 0.5\n")
    r = load_recipe(p)
    assert r.resolve("model.layers.2.mlp.up_proj.weight", 4)["alpha"] == 0.1
    assert r.resolve("model.layers.3.mlp.up_proj.weight", 4)["alpha"] == 0.5


def test_structure_and_method_problems_together() -> None:
    _, problems = recipe_problems({"merge_methd": "lerp", "merge_method": "lerpp", "models": ["./b"]})
    assert problems == [
        "unknown keys ['merge_methd']; known: base_model, chat_template, dtype, merge_method, models, out_dtype, "
        "parameters, tokenizer_source",
        f"unknown merge_method 'lerpp'; choose one of {', '.join(sorted(METHODS))}",
    ]
