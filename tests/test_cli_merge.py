"""Merges through the CLI on tiny Llamas, checked with transformers' and safetensors' own loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_safe.cli import main
from mergekit_safe.tiny import save_tiny_pair, tiny_llama_config
from tests.helpers import assert_close


def cli(*args: str | Path) -> object:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def ok(*args: str | Path) -> str:
    result = cli(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 17).view(2, 8) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def reference_merge(paths: list[Path], coeffs: list[float]) -> torch.nn.Module:
    """The merge done in memory with float64 math on transformers-loaded models."""
    models = [load_model(p) for p in paths]
    out = load_model(paths[-1])
    states = [m.state_dict() for m in models]
    merged = {k: sum(c * s[k].double() for c, s in zip(coeffs, states)).float() for k in states[0]}
    out.load_state_dict(merged)
    return out


def test_lerp_cli_gives_the_reference_logits(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, finetuned = tiny_pair
    out = tmp_path / "merged"
    text = ok("merge", "--method", "lerp", "--alpha", "0.3", aligned, finetuned, "-o", out, "--no-progress")
    assert "wrote" in text
    merged = load_model(out)
    expected = reference_merge([aligned, finetuned], [0.7, 0.3])
    # fp32 merge math vs float64 rounded once: the weights agree to ~1 ulp, logits to ~1e-6
    assert_close(logits(merged), logits(expected), atol=1e-5, rtol=1e-5, what="logits")
    card = (out / "README.md").read_text()
    assert "merge_method: lerp" in card and "sha256" in card
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32


def test_sharded_in_sharded_out_matches_single_file(tmp_path: Path) -> None:
    aligned, finetuned = save_tiny_pair(tmp_path / "in", seed=2, max_shard_size="40KB")
    assert (aligned / "model.safetensors.index.json").is_file()
    ok("merge", "--method", "lerp", "--alpha", "0.5", aligned, finetuned, "-o", tmp_path / "sharded",
       "--max-shard-size", "30KB", "--no-progress")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    state = {}
    for s in shards:
        state.update(load_file(tmp_path / "sharded" / s))
    a, b = load_model(aligned).state_dict(), load_model(finetuned).state_dict()
    for k, v in state.items():
        assert_close(v, 0.5 * a[k].double() + 0.5 * b[k].double(), 1e-7, 1e-6, k)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert_close(logits(load_model(tmp_path / "sharded")), logits(reference_merge([aligned, finetuned], [0.5, 0.5])),
                 1e-5, 1e-5, "logits")


def test_tied_embeddings(tmp_path: Path) -> None:
    aligned, finetuned = save_tiny_pair(tmp_path / "in", seed=3, tie=True)
    assert "lm_head.weight" not in load_file(aligned / "model.safetensors")
    out = tmp_path / "out"
    ok("merge", "--method", "lerp", "--alpha", "0.4", aligned, finetuned, "-o", out, "--no-progress")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert_close(logits(load_model(out)), logits(reference_merge([aligned, finetuned], [0.6, 0.4])), 1e-5, 1e-5)


def test_bf16_output_dtype(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, finetuned = tiny_pair
    ok("merge", "--method", "lerp", "--alpha", "0.5", aligned, finetuned, "-o", tmp_path / "o", "--dtype", "bfloat16",
       "--no-progress")
    state = load_file(tmp_path / "o" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    a, b = load_file(aligned / "model.safetensors"), load_file(finetuned / "model.safetensors")
    for k, v in state.items():
        # bf16 keeps 8 bits of mantissa: one rounding of the exact value is within 2**-8 relative
        assert_close(v, 0.5 * a[k].double() + 0.5 * b[k].double(), 1e-30, 2**-8, k)


def test_yaml_recipe_with_per_module_coefficients(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, finetuned = tiny_pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: lerp\nbase_model: {aligned}\nmodels:\n  - model: {finetuned}\n"
                      "parameters:\n  alpha: {attention: 0.2, mlp: [0.0, 1.0], default: 0.5}\n")
    ok("validate", recipe)
    ok("merge", "--config", recipe, "-o", tmp_path / "o", "--no-progress")
    state = load_file(tmp_path / "o" / "model.safetensors")
    a, b = load_file(aligned / "model.safetensors"), load_file(finetuned / "model.safetensors")
    for k, alpha in [("model.layers.0.self_attn.q_proj.weight", 0.2), ("model.layers.0.mlp.up_proj.weight", 0.0),
                     ("model.layers.1.mlp.up_proj.weight", 1.0), ("model.norm.weight", 0.5)]:
        assert_close(state[k], (1 - alpha) * a[k].double() + alpha * b[k].double(), 1e-7, 1e-6, k)


def test_ema_cli_sorts_trainer_checkpoints(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    run = tmp_path / "run"
    states = {}
    for step in (1000, 200, 30):  # written out of order on purpose
        torch.manual_seed(step)
        m = LlamaForCausalLM(tiny_llama_config())
        m.save_pretrained(run / f"checkpoint-{step}")
        states[step] = m.state_dict()
    start_model = LlamaForCausalLM(tiny_llama_config())
    start_model.save_pretrained(tmp_path / "start")
    ok("ema", run / "checkpoint-1000", run / "checkpoint-30", run / "checkpoint-200", "--beta", "0.8",
       "--start", tmp_path / "start", "-o", tmp_path / "ema", "--no-progress")
    out = load_file(tmp_path / "ema" / "model.safetensors")
    for k, v in out.items():
        e = start_model.state_dict()[k].double()
        for step in (30, 200, 1000):
            e = 0.8 * e + 0.2 * states[step][k].double()
        assert_close(v, e, 1e-6, 1e-6, k)


def test_vocabulary_growth_keeps_new_rows_from_the_finetune(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, _ = tiny_pair
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(aligned)
    ft.resize_token_embeddings(136)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01)
    ft.save_pretrained(tmp_path / "ft")
    result = cli("merge", "--method", "lerp", "--alpha", "0.5", aligned, tmp_path / "ft", "-o", tmp_path / "o",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert "has 128 rows, the output 136" in result.output
    out, a = load_file(tmp_path / "o" / "model.safetensors"), load_file(aligned / "model.safetensors")
    f = load_file(tmp_path / "ft" / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[k].shape == (136, 32)
        assert_close(out[k][:128], 0.5 * a[k].double() + 0.5 * f[k][:128].double(), 1e-7, 1e-6, k)
        assert torch.equal(out[k][128:], f[k][128:])
    assert load_model(tmp_path / "o").config.vocab_size == 136


def test_python_dash_m_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mergekit_safe", "--help"], capture_output=True, text=True, check=True)
    assert "merge" in r.stdout and "inspect" in r.stdout


def test_inspect_reports_per_layer_changes(tiny_pair: tuple[Path, Path]) -> None:
    aligned, finetuned = tiny_pair
    data = json.loads(ok("inspect", aligned, finetuned, "--json"))
    a, b = load_file(aligned / "model.safetensors"), load_file(finetuned / "model.safetensors")
    row = next(t for t in data["tensors"] if t["name"] == "model.layers.1.mlp.up_proj.weight")
    x, y = a[row["name"]].double().flatten(), b[row["name"]].double().flatten()
    assert row["rel_delta"] == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-9)
    assert row["cosine"] == pytest.approx(float(x @ y / (x.norm() * y.norm())), rel=1e-9)
    assert row["max_abs"] == pytest.approx(float((y - x).abs().max()), rel=1e-9)
    assert {"layer 0", "layer 1", "embed", "head", "norm"} <= {r["group"] for r in data["layers"]}
    assert "layer 1" in ok("inspect", aligned, finetuned)
