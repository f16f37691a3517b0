"""``repair --method safe_lora | safemerge``: the threshold as the searched coefficient.

Each weight matrix's candidate value is checked against an independent float64 reference built the way PEFT's
``utils.safelora`` does it (the dense ``d x d`` projection ``V V^T / ||V||_F``), the written checkpoint against
the in-memory candidate bit for bit, and the coefficient's direction (a larger threshold switches more matrices,
i.e. adds safety) against the registry's ``increasing``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_safe.errors import SearchError
from mergekit_safe.repair.strategies import METHODS
from tests.helpers import assert_close

METHODS_UNDER_TEST = ("safe_lora", "safemerge")
SAFEMERGE_WEIGHT = 0.8  # the paper's (and the merge method's) default weight of the fine-tune's update


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """aligned, fine-tune (noise 0.05) and an unaligned model (the aligned one moved by other noise, 0.05)."""
    from mergekit_safe.tiny import save_tiny_pair

    root = tmp_path_factory.mktemp("trio")
    aligned, finetuned = save_tiny_pair(root, seed=4)
    unaligned = root / "unaligned"
    shutil.copytree(aligned, unaligned)
    g = torch.Generator().manual_seed(11)
    weights = load_file(aligned / "model.safetensors")
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in weights.items()},
              str(unaligned / "model.safetensors"), metadata={"format": "pt"})
    return aligned, finetuned, unaligned


def _space(trio: tuple[Path, Path, Path], method: str, groups: str) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    from mergekit_safe.io.reader import open_checkpoint
    from mergekit_safe.repair.groups import parse_groups
    from mergekit_safe.repair.space import build_space

    aligned, finetuned, unaligned = trio
    model = AutoModelForCausalLM.from_pretrained(aligned).eval()
    with open_checkpoint(aligned) as a, open_checkpoint(finetuned) as f, open_checkpoint(unaligned) as u:
        space = build_space(model, a, f, u, method=method, groups=parse_groups(groups), num_layers=2)
    return space, model, dict(model.named_parameters())


def _reference(name: str, trio: tuple[Path, Path, Path], method: str, threshold: float) -> tuple[torch.Tensor, float]:
    """Float64, PEFT's way: the dense projection matrix P = V V^T / ||V||_F, cos(P D, D), the layer's value."""
    a, f, u = (load_file(p / "model.safetensors")[name].double() for p in trio)
    v = a - u
    proj = v @ v.T / torch.linalg.matrix_norm(v)  # [out, out]: what PEFT builds and we never do
    d = f - a
    pd = proj @ d
    cos = float((pd * d).sum() / (pd.norm() * d.norm()))
    if method == "safe_lora":
        return (a + pd if cos <= threshold else f), cos
    return (a + SAFEMERGE_WEIGHT * d if cos < threshold else f), cos


def _thresholds(space: Any) -> dict[str, float]:
    """Per group, a threshold midway between two of its matrices' scores: some switch on, some stay off."""
    out = {}
    for g in space.groups:
        scores = sorted(space.switch.scores[n] for n in space.names
                        if space.group_of[n] == g and math.isfinite(space.switch.scores[n]))
        k = len(scores) // 2
        out[g] = 0.5 * (scores[k - 1] + scores[k]) if len(scores) > 1 else 1.0
    return out


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
@pytest.mark.parametrize("groups", ["global", "layers:2", "modules"])
def test_candidate_matches_the_float64_projection(trio: tuple[Path, Path, Path], method: str, groups: str) -> None:
    from mergekit_safe.merge.safety import applies

    space, _, params = _space(trio, method, groups)
    coeffs = _thresholds(space)
    space.apply(coeffs)
    ft = load_file(trio[1] / "model.safetensors")
    on = 0
    for n in space.names:
        if not applies(n, tuple(ft[n].shape)):  # norms, embeddings, head: the fine-tune's, never switched
            assert space.switch.scores[n] == math.inf and torch.equal(params[n].detach(), ft[n]), n
            continue
        want, cos = _reference(n, trio, method, coeffs[space.group_of[n]])
        # cosines in float64 by two association orders: agree to float64 rounding of a few hundred terms
        assert abs(space.switch.scores[n] - cos) <= 1e-12, n
        on += int(space.switch.is_on(n, coeffs[space.group_of[n]]))
        # the candidate is the float64 value rounded once to fp32: within one fp32 ulp of its magnitude
        assert_close(params[n].detach(), want, 2.0**-23 * float(want.abs().max()), 0.0, n)
    assert 0 < on < sum(math.isfinite(s) for s in space.switch.scores.values())  # both branches exercised


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
@pytest.mark.parametrize("groups", ["global", "layers:2,modules"])
def test_written_checkpoint_is_the_in_memory_candidate(trio: tuple[Path, Path, Path], tmp_path: Path,
                                                       method: str, groups: str) -> None:
    from mergekit_safe.merge.engine import merge
    from mergekit_safe.repair.command import RepairConfig, build_recipe
    from mergekit_safe.repair.groups import parse_groups

    aligned, finetuned, unaligned = trio
    space, _, params = _space(trio, method, groups)
    coeffs = _thresholds(space)
    space.apply(coeffs)
    cfg = RepairConfig(aligned, finetuned, tmp_path / "out", method=method, groups=groups, unaligned=unaligned)
    recipe = build_recipe(cfg, space, parse_groups(groups), coeffs, 2)
    assert recipe.merge_method == method
    merge(recipe, tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    for n in written:
        # the same per-tensor function computed the switched-on value once: bit for bit, not within a tolerance
        assert torch.equal(written[n], params[n].detach()), n
    assert set(written) == set(params)


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_a_larger_threshold_switches_more_matrices(trio: tuple[Path, Path, Path], method: str) -> None:
    """The coefficient adds safety: ``increasing`` is False, and the set switched on only grows with it."""
    space, _, params = _space(trio, method, "global")
    assert METHODS[method].increasing is False and METHODS[method].needs_unaligned
    assert METHODS[method].coefficient == "threshold" and METHODS[method].starts_from == "finetuned"
    ft = load_file(trio[1] / "model.safetensors")
    previous: set[str] = set()
    for t in (0.0, 0.05, 0.1, 0.2, 0.4, 1.0):
        on = {n for n in space.names if space.switch.is_on(n, t)}
        assert previous <= on
        previous = on
        space.apply(space.uniform(t))
        assert space.at_base(space.uniform(t)) == (not on)
        for n in space.names:  # off: the fine-tune exactly
            if n not in on:
                assert torch.equal(params[n].detach(), ft[n]), n
    # cos(P D, D) >= 0 and <= 1: threshold 1 switches every weight matrix on, the strict rule at 0 none
    assert previous == set(space.switch.on)
    if METHODS[method].name == "safemerge":
        assert space.at_base(space.uniform(0.0))


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_flags_rejected_before_any_model_loads(trio: tuple[Path, Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    import mergekit_safe.eval as ev
    from mergekit_safe.repair.command import RepairConfig, validate

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ev, "load_model", boom)
    aligned, finetuned, unaligned = trio
    with pytest.raises(SearchError, match=rf"^--method {method} needs --unaligned \(the alignment direction "):
        validate(RepairConfig(aligned, finetuned, tmp_path / "o", method=method))
    with pytest.raises(SearchError, match=rf"^--groups auto:2 works with a continuous coefficient; --method {method}"):
        validate(RepairConfig(aligned, finetuned, tmp_path / "o", method=method, unaligned=unaligned,
                              groups="auto:2"))


def test_cli_lists_the_methods() -> None:
    from click.testing import CliRunner

    from mergekit_safe.cli import main

    out = CliRunner().invoke(main, ["repair", "--help"]).output
    for m in METHODS_UNDER_TEST:
        assert m in out


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_lora_finetune_written_is_the_in_memory_candidate(trio: tuple[Path, Path, Path], tmp_path: Path,
                                                          method: str) -> None:
    """Safe LoRA's own setting, a LoRA fine-tune: only the adapted matrices switch, and the merged checkpoint the
    engine writes from the adapter is the candidate bit for bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mergekit_safe.io.adapters import open_input
    from mergekit_safe.io.reader import open_checkpoint
    from mergekit_safe.merge.engine import merge
    from mergekit_safe.repair.command import RepairConfig, build_recipe
    from mergekit_safe.repair.groups import parse_groups
    from mergekit_safe.repair.space import build_space

    aligned, _, unaligned = trio
    lora = tmp_path / "lora"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(aligned),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # peft starts B at zero: make the adapter change the model
    peft_model.save_pretrained(lora)
    model = AutoModelForCausalLM.from_pretrained(aligned).eval()
    spec = parse_groups("layers:2")
    with open_checkpoint(aligned) as a, open_input(lora, base=aligned) as f, open_checkpoint(unaligned) as u:
        space = build_space(model, a, f, u, method=method, groups=spec, num_layers=2)
    assert {n.split(".")[-2] for n in space.names} == {"q_proj", "v_proj", "up_proj"}
    coeffs = _thresholds(space)
    space.apply(coeffs)
    assert 0 < sum(space.switch.is_on(n, coeffs[space.group_of[n]]) for n in space.names) < len(space.names)
    cfg = RepairConfig(aligned, lora, tmp_path / "out", method=method, groups="layers:2", unaligned=unaligned)
    merge(build_recipe(cfg, space, spec, coeffs, 2), tmp_path / "out", progress=False)
    written = load_file(tmp_path / "out" / "model.safetensors")
    params = dict(model.named_parameters())
    for n in written:
        assert torch.equal(written[n], params[n].detach()), n
