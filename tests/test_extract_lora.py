"""extract-lora: the adapter loads in peft, and what it reproduces is the float64 truncated SVD of the delta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_safe.cli import main
from mergekit_safe.errors import CheckpointError, RecipeError
from mergekit_safe.io.adapters import open_input
from mergekit_safe.merge.extract_lora import REPORT_NAME, RankRule, extract_lora
from tests.helpers import assert_close

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7]])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _svd64(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(delta.double(), full_matrices=False)


def _peft(base: Path, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _model_with(base: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def test_full_rank_reproduces_the_model(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = tiny_pair
    res = extract_lora(base, tuned, tmp_path / "lora", RankRule(rank=10_000))
    assert all(m.rank == m.full_rank for m in res.modules)
    # the tiny fine-tune moved every tensor: norms and embeddings are saved whole, every 2-D linear is LoRA
    assert "model.embed_tokens" in res.modules_to_save and "model.norm" in res.modules_to_save
    assert {m.module for m in res.modules} >= {"lm_head", "model.layers.1.mlp.down_proj"}
    # fp32 factors of a full SVD: the delta comes back to fp32 rounding (a few ulp of |D| ~ 0.05 * sqrt(64))
    assert res.relative_error < 1e-5
    # peft's forward (unmerged: base + B @ A at run time) against the fine-tune itself; logits are O(1), and
    # fp32 rounding through two layers stays below 1e-5
    assert_close(_logits(_peft(base, tmp_path / "lora")), _logits(_model_with(base, _state(tuned))), 1e-5, 1e-5,
                 "logits")
    # our own adapter reader applies the same adapter (rank_pattern / alpha_pattern honoured)
    view = open_input(tmp_path / "lora", base=str(base))
    for name, t in _state(tuned).items():
        assert_close(view.get(name), t, 1e-6, 1e-5, name)


def test_low_rank_error_is_the_svd_tail(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = tiny_pair
    res = extract_lora(base, tuned, tmp_path / "lora", RankRule(rank=4))
    b_state, t_state = _state(base), _state(tuned)
    expected = dict(t_state)
    for rep in res.modules:
        name = rep.module + ".weight"
        u, s, vh = _svd64(t_state[name] - b_state[name])
        assert rep.rank == 4
        # the reported errors are the float64 SVD tail (fp32 SVD and fp32 factors: 1e-5 relative)
        tail = float(s[4:].square().sum().sqrt())
        assert rep.tail_error == pytest.approx(tail, rel=1e-5)
        assert rep.error == pytest.approx(tail, rel=1e-5)
        assert rep.norm == pytest.approx(float(s.square().sum().sqrt()), rel=1e-6)
        expected[name] = (b_state[name].double() + (u[:, :4] * s[:4]) @ vh[:4]).float()
    peft_model = _peft(base, tmp_path / "lora")
    # logits of peft's model equal those of the float64 rank-4 reconstruction, to fp32 rounding
    assert_close(_logits(peft_model), _logits(_model_with(base, expected)), 1e-5, 1e-5, "logits")
    # and the merged weights miss the fine-tune by exactly the reported error
    merged = peft_model.merge_and_unload().state_dict()
    for rep in res.modules:
        name = rep.module + ".weight"
        miss = float(torch.linalg.matrix_norm(merged[name].double() - t_state[name].double()))
        assert miss == pytest.approx(rep.error, rel=1e-4), name
    report = json.loads((tmp_path / "lora" / REPORT_NAME).read_text())
    assert report["rule"] == {"rank": 4} and len(report["modules"]) == len(res.modules)


@pytest.mark.parametrize("rule", [RankRule(energy=0.6), RankRule(sv_threshold=0.5)])
def test_energy_and_threshold_pick_ranks_like_the_reference(
        tiny_pair: tuple[Path, Path], tmp_path: Path, rule: RankRule) -> None:
    base, tuned = tiny_pair
    res = extract_lora(base, tuned, tmp_path / "lora", rule)
    b_state, t_state = _state(base), _state(tuned)
    ranks = set()
    for rep in res.modules:
        s = _svd64(t_state[rep.module + ".weight"] - b_state[rep.module + ".weight"])[1]
        if rule.energy is not None:
            frac = torch.cumsum(s.square(), 0) / s.square().sum()
            want = int((frac < rule.energy).sum()) + 1  # fewest values reaching the energy
        else:
            want = int((s >= rule.sv_threshold * s[0]).sum())
        assert rep.rank == want, rep.module
        ranks.add(rep.rank)
    assert len(ranks) > 1  # the rule really varies per module
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    peft_model = _peft(base, tmp_path / "lora")
    for rep in res.modules:  # peft built each module at its own rank
        layer = peft_model.get_submodule("base_model.model." + rep.module)
        assert layer.lora_A["default"].weight.shape[0] == rep.rank
    assert cfg["r"] == max(ranks)


def test_unchanged_tensors_are_left_out(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = tiny_pair
    state = _state(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name] + 0.01 * torch.randn_like(state[name])
    (tmp_path / "one").mkdir()
    save_file(state, tmp_path / "one" / "model.safetensors", metadata={"format": "pt"})
    res = extract_lora(base, tmp_path / "one", tmp_path / "lora", RankRule(rank=2))
    assert [m.module for m in res.modules] == ["model.layers.0.self_attn.q_proj"]
    assert res.modules_to_save == [] and res.unchanged == len(state) - 1
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight" for x in "AB"}


def test_bad_rules_and_shapes(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="exactly one of"):
        RankRule(rank=4, energy=0.5)
    with pytest.raises(RecipeError, match=r"--energy 1.5: must be in \(0, 1\]"):
        RankRule(energy=1.5)
    state = _state(tiny_pair[1])
    state["model.embed_tokens.weight"] = torch.zeros(130, 32)
    (tmp_path / "big").mkdir()
    save_file(state, tmp_path / "big" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \[130, 32\] but the base"):
        extract_lora(tiny_pair[0], tmp_path / "big", tmp_path / "lora", RankRule(rank=2))
    assert not (tmp_path / "lora").exists()


def test_cli(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = tiny_pair
    out = tmp_path / "lora"
    ok = CliRunner().invoke(main, ["extract-lora", "--base", str(base), "--model", str(tuned), "--rank", "3",
                                   "--dtype", "bfloat16", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "rank 3..3" in ok.output
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "adapter_model.safetensors").values())
    again = CliRunner().invoke(main, ["extract-lora", "--base", str(base), "--model", str(tuned), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    bad = CliRunner().invoke(main, ["extract-lora", "--base", str(base), "--model", str(tuned), "--rank", "2",
                                    "--energy", "0.5", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1] == ("Error: give exactly one of --rank, --energy, --sv-threshold "
                                                   "(got ['rank', 'energy'])")


def test_tied_embeddings(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mergekit_safe.tiny import save_tiny_pair

    base, tuned = save_tiny_pair(tmp_path / "pair", seed=2, tie=True)
    res = extract_lora(base, tuned, tmp_path / "lora", RankRule(rank=10_000))
    assert "model.embed_tokens" in res.modules_to_save
    # the fine-tune's tied head moved with its embeddings; peft's model must follow it
    reference = AutoModelForCausalLM.from_pretrained(tuned).eval()
    assert_close(_logits(_peft(base, tmp_path / "lora")), _logits(reference), 1e-5, 1e-5, "logits")
    view = open_input(tmp_path / "lora", base=str(base))
    assert_close(view.get("lm_head.weight"), _state(tuned)["model.embed_tokens.weight"], 0, 0, "tied head")


def test_randomized_svd_is_seeded_and_finds_the_top_subspace(tmp_path: Path) -> None:
    from mergekit_safe.merge.extract_lora import low_rank, randomized_svd

    g = torch.Generator().manual_seed(3)
    # rank-6 signal plus small noise: the randomized top-6 must match the full SVD's to the noise level
    d = torch.randn(80, 6, generator=g) @ torch.randn(6, 50, generator=g) + 1e-3 * torch.randn(80, 50, generator=g)
    state = torch.random.get_rng_state()
    u, s, vh = randomized_svd(d, 6, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    u2, s2, vh2 = randomized_svd(d, 6, seed=11)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
    full = torch.linalg.svdvals(d.double())
    assert_close(s[:6], full[:6], 0, 1e-5, "top singular values")
    a, b, rep = low_rank(d, RankRule(rank=6), torch.float32, "m", seed=11)
    tail = float(full[6:].square().sum().sqrt())
    # the noise floor is 1e-4 of |D|; fp32 factors of the rank-6 signal add rounding of that order
    assert rep.error == pytest.approx(tail, rel=1e-3)
    assert rep.tail_error == pytest.approx(tail, rel=1e-3)


def test_cli_randomized(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = tiny_pair
    args = ["extract-lora", "--base", str(base), "--model", str(tuned), "--rank", "4", "--randomized", "--seed", "5"]
    for name in ("r1", "r2"):
        ok = CliRunner().invoke(main, args + ["-o", str(tmp_path / name)])
        assert ok.exit_code == 0, ok.output
    one, two = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("r1", "r2"))
    assert all(torch.equal(one[k], two[k]) for k in one)  # same seed, same adapter
    report = json.loads((tmp_path / "r1" / REPORT_NAME).read_text())
    assert report["svd"] == "randomized" and report["seed"] == 5
    exact = extract_lora(base, tuned, tmp_path / "full", RankRule(rank=4))
    # noise deltas have a flat spectrum, so the randomized top-4 is close to, never better than, the optimum
    for m_r, m_f in zip(report["modules"], exact.modules):
        assert m_f.error <= m_r["error"] * (1 + 1e-6) and m_r["error"] <= m_f.error * 1.05, m_r["module"]
