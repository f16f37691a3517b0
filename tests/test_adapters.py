"""A LoRA adapter read as base + scale * B @ A, checked against peft's own merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_safe.io.adapters import open_input
from mergekit_safe.cli import main
from mergekit_safe.errors import CheckpointError
from tests.helpers import assert_close


def make_adapter(base: Path, out: Path, **lora: object) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter with non-zero B (peft starts B at zero) and return peft's merged state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], **lora)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"rank_pattern": {"up_proj": 2}, "alpha_pattern": {"v_proj": 3}}])
def test_adapter_view_matches_peft_merge(tiny_pair: tuple[Path, Path], tmp_path: Path, lora: dict) -> None:
    base = tiny_pair[0]
    expected = make_adapter(base, tmp_path / "adapter", **lora)
    view = open_input(tmp_path / "adapter", base=str(base))
    assert sorted(view.lora_targets()) == sorted(k for k in expected if any(m in k for m in ("q_proj", "v_proj", "up_proj")))
    for name, t in expected.items():
        assert_close(view.get(name), t, 1e-6, 1e-5, name)
    view.close()


def test_adapter_as_the_finetune_in_a_merge(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base = tiny_pair[0]
    merged = make_adapter(base, tmp_path / "adapter")
    r = CliRunner().invoke(main, ["merge", "--method", "lerp", "--alpha", "0.5", str(base), str(tmp_path / "adapter"),
                                  "-o", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 0, r.output
    out, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    for k, v in out.items():
        assert_close(v, 0.5 * b[k].double() + 0.5 * merged[k].double(), 1e-6, 1e-5, k)


def test_adapter_for_another_model_is_refused(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base = tiny_pair[0]
    make_adapter(base, tmp_path / "adapter")
    w = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(w)
    from safetensors.torch import save_file

    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(renamed, w)
    with pytest.raises(CheckpointError, match=r"adapter tensor for 'model\.layers\.7\.[a-z_.]+weight' has no match in base .*another model\?"):
        open_input(tmp_path / "adapter", base=str(base))


def test_adapter_without_a_base_on_disk(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    make_adapter(tiny_pair[0], tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "some-org/some-model"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="a LoRA adapter needs its base model on disk"):
        open_input(tmp_path / "adapter")
