"""Every command, fed malformed input, ends in exactly one ``Error:`` line and exit 1, never a traceback.

Click's own usage errors (a bad option value caught by its type, a missing argument) keep exit code 2, as
the README's CLI notes say. Cases are cheap: each fails before any model is loaded or merged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_safe.cli import main
from mergekit_safe.merge.recipe import MAX_MODELS
from mergekit_safe.tiny import save_tiny_pair


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pair plus broken inputs: a corrupt checkpoint, a folder that is no checkpoint, a NaN fine-tune."""
    root = tmp_path_factory.mktemp("cli-errors")
    a, b = save_tiny_pair(root / "in", seed=3)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    empty = root / "empty"
    empty.mkdir()
    nan = root / "nan"
    nan.mkdir()
    for f in b.iterdir():
        if f.name != "model.safetensors":
            (nan / f.name).write_bytes(f.read_bytes())
    state = load_file(b / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, nan / "model.safetensors")
    return {"a": a, "b": b, "corrupt": corrupt, "empty": empty, "nan": nan, "root": root}


def run(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(x) for x in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: uncaught {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def one_error(*args: str | Path, code: int = 1) -> str:
    exit_code, output = run(*args)
    assert exit_code == code, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


def recipe(w: dict[str, Path], text: str) -> Path:
    p = w["root"] / f"r{abs(hash(text))}.yml"
    p.write_text(text)
    return p


def out(w: dict[str, Path], name: str) -> Path:
    return w["root"] / "outs" / name


def test_merge_bad_inputs(world: dict[str, Path]) -> None:
    w = world
    lerp = ["merge", "--method", "lerp", "--no-progress"]
    assert one_error(*lerp, w["a"], w["root"] / "nope", "-o", out(w, "m1")).endswith("no such file or directory")
    assert "corrupt" in one_error(*lerp, w["a"], w["corrupt"], "-o", out(w, "m2"))
    assert one_error(*lerp, w["a"], w["empty"], "-o", out(w, "m3")) == (
        f"Error: {w['empty']}: no model.safetensors, model.safetensors.index.json or adapter weights found")
    for alpha in ("nan", "inf", "1e300"):
        assert "alpha" in one_error(*lerp, "--alpha", alpha, w["a"], w["b"], "-o", out(w, "m4"))
    assert "density=5" in one_error("merge", "--method", "ties", "-p", "density=5", w["a"], w["b"], "-o", out(w, "m5"))
    outs = w["root"] / "outs"
    assert not outs.exists() or not [p for p in outs.iterdir() if p.name.startswith((".m", "m"))], list(outs.iterdir())


@pytest.mark.parametrize("size,message", [
    ("5", "--max-shard-size '5' is not a size like 5GB, 500MB or 2GiB (give a unit: 5GB, 500MB or 5B)"),
    ("0", "give a unit"),
    ("0GB", "--max-shard-size '0GB' is not a positive size"),
    ("-5GB", "is not a size like 5GB"),
    ("1e400GB", "is not a size like 5GB"),
    ("9" * 30 + "GB", "is larger than 1 PiB"),
])
def test_max_shard_size(world: dict[str, Path], size: str, message: str) -> None:
    line = one_error("merge", "--method", "lerp", world["a"], world["b"], "-o", out(world, "s"),
                     "--max-shard-size", size)
    assert message in line


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp", "lerp"])
def test_strict_catches_nan_inputs(world: dict[str, Path], method: str) -> None:
    w = world
    line = one_error("merge", "--method", method, w["a"], w["nan"], "-o", out(w, f"n-{method}"), "--strict",
                     "--no-progress")
    assert line == (f"Error: {w['nan'] / 'model.safetensors'}: tensor 'model.layers.0.mlp.up_proj.weight' has NaN "
                    "or Inf values (--strict)")


def test_slerp_on_nan_without_strict_warns(world: dict[str, Path]) -> None:
    code, output = run("merge", "--method", "slerp", world["a"], world["nan"], "-o", out(world, "warn"),
                       "--no-progress")
    assert code == 0, output
    assert "has NaN or Inf values" in output


def test_ema_inspect_bad_inputs(world: dict[str, Path]) -> None:
    w = world
    assert "beta must be a finite number" in one_error("ema", w["a"], w["b"], "--beta", "nan", "-o", out(w, "e"))
    assert "beta=2.0 is outside" in one_error("ema", w["a"], w["b"], "--beta", "2", "-o", out(w, "e"))
    assert "corrupt" in one_error("ema", w["a"], w["corrupt"], "-o", out(w, "e"))
    assert one_error("inspect", w["a"], w["root"] / "nope").endswith("no such file or directory")
    assert "corrupt" in one_error("inspect", w["a"], w["corrupt"])
    one_error("inspect", w["a"], code=2)  # click: missing argument


def test_validate_reports_every_problem(world: dict[str, Path]) -> None:
    w = world
    r = recipe(w, f"merge_methd: lerp\nmerge_method: lerpp\nbase_model: {w['a']}\n"
                  f"models: [{w['root'] / 'nope'}, {w['empty']}]\n")
    line = one_error("validate", r)
    assert "unknown keys ['merge_methd']" in line and "unknown merge_method 'lerpp'" in line
    assert f"{w['root'] / 'nope'}: no such file or directory" in line
    assert str(w["empty"]) in line  # a folder that is not a checkpoint
    assert "no such file" in one_error("validate", w["root"] / "none.yml")


@pytest.mark.parametrize("text", [
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh")) + "merge_method: lerp\n",
    "merge_method: lerp\nparameters: {alpha: &x [1, *x]}\n",
    "merge_method: lerp\nmodels: [" + ", ".join(["./m"] * (MAX_MODELS + 1)) + "]\n",
    "merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: [{regex: '(a+)+$', value: 1}]}\n",
    "merge_method: lerp\nbase_model: ./a\nmodels: [./b]\nparameters: {alpha: 1.0e+300}\n",
    "merge_method: [\n",
])
def test_bad_recipes_fail_validate_and_merge_alike(world: dict[str, Path], text: str) -> None:
    r = recipe(world, text)
    v = one_error("validate", r)
    m = one_error("merge", "--config", r, "-o", out(world, "r"))
    assert len(v) < 1200 and len(m) < 1200
    assert v.split(": ")[1][:20] == m.split(": ")[1][:20]  # the same first problem


def test_validate_says_ok_only_when_merge_would_run(world: dict[str, Path]) -> None:
    w = world
    r = recipe(w, f"merge_method: ties\nbase_model: {w['a']}\nmodels: [{w['b']}]\nparameters: {{density: 0.5}}\n")
    code, output = run("validate", r)
    assert code == 0 and "ok (ties, 2 inputs)" in output
    r = recipe(w, f"merge_method: linear\nmodels:\n  - model: {w['a']}\n    parameters: {{weight: 1}}\n"
                  f"  - model: {w['b']}\n    parameters: {{weight: -1}}\n")
    assert "sum to zero" in one_error("validate", r)  # found by resolving every tensor, as merge would


def test_eval_repair_demo_bad_options(world: dict[str, Path]) -> None:
    w = world
    assert "not found" in one_error("eval", w["root"] / "nope", "--limit", "2")
    assert "no *.safetensors" in one_error("eval", w["empty"], "--limit", "2")
    assert ">= 1" in one_error("eval", w["b"], "--max-new-tokens", "-1", "--limit", "2")
    assert ">= 1" in one_error("eval", w["b"], "--batch-size", "0", "--limit", "2")
    assert "--limit" in one_error("eval", w["b"], "--limit", "-1")
    assert "unknown judge bogus" in one_error("eval", w["b"], "--judge", "bogus")  # a comma list: checked by us, exit 1
    assert "no such file" in one_error("repair", "--base", w["root"] / "nope", "--finetuned", w["b"],
                                       "-o", out(w, "rep"))
    one_error("repair", "--base", w["a"], "--finetuned", w["b"], "--method", "bogus", "-o", out(w, "rep"), code=2)
    one_error("demo", "--trials", "-1", "-o", out(w, "demo"), code=2)  # refused before the organism is built
    one_error("demo", "--seed", "x", code=2)
