"""One DTYPES table and one layer count, checked against safetensors' own files and transformers' models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_safe.cli import main
from mergekit_safe.io import dtypes, reader, writer
from mergekit_safe.io.dtypes import DTYPE_TO_SAFETENSORS, DTYPES, OUTPUT_DTYPE_NAMES, SAFETENSORS_DTYPES
from mergekit_safe.merge.recipe import ModelSpec, Recipe, num_layers
from mergekit_safe.tiny import tiny_llama_config


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_safetensors_codes_match_what_safetensors_writes(tmp_path: Path, code: str) -> None:
    dtype = SAFETENSORS_DTYPES[code]
    path = tmp_path / "t.safetensors"
    save_file({"t": torch.zeros(3, dtype=dtype)}, path)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["t"]["dtype"] == code == DTYPE_TO_SAFETENSORS[dtype]


def test_every_module_reads_the_one_table() -> None:
    from mergekit_safe.eval import generate
    from mergekit_safe.eval.command import eval_command

    assert reader.SAFETENSORS_DTYPES is dtypes.SAFETENSORS_DTYPES
    assert writer.DTYPE_TO_SAFETENSORS is dtypes.DTYPE_TO_SAFETENSORS
    assert generate.DTYPES is dtypes.DTYPES
    merge_dtype = next(p for p in main.commands["merge"].params if p.name == "dtype")
    assert tuple(merge_dtype.type.choices) == OUTPUT_DTYPE_NAMES
    eval_dtype = next(p for p in eval_command.params if p.name == "dtype")
    assert tuple(eval_dtype.type.choices) == ("auto", *DTYPES)
    for name, expected in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("float32", torch.float32)]:
        assert Recipe("linear", [ModelSpec("a"), ModelSpec("b")], dtype=name).out_dtype() is expected


def test_recipe_rejects_a_dtype_merges_cannot_write() -> None:
    from mergekit_safe.errors import RecipeError

    with pytest.raises(RecipeError, match="dtype 'float64' is not one of float32, fp32, float16, fp16, bfloat16, bf16"):
        Recipe("linear", [ModelSpec("a"), ModelSpec("b")], dtype="float64").validate()
    result = CliRunner().invoke(main, ["merge", "--method", "linear", "a", "b", "-o", "x", "--dtype", "float64"])
    assert result.exit_code == 2 and "'float64' is not one of 'float32', 'float16', 'bfloat16'" in result.output


@pytest.mark.parametrize("layers", [1, 3])
def test_num_layers_agrees_with_the_model_transformers_builds(layers: int) -> None:
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(layers=layers)
    model = LlamaForCausalLM(cfg)
    truth = len(model.model.layers)
    names = [n for n, _ in model.named_parameters()]
    assert num_layers(cfg) == num_layers(cfg.to_dict()) == num_layers(names) == truth
    assert num_layers({"text_config": {"num_hidden_layers": truth}}) == truth
    assert num_layers({}, fallback_names=names) == truth  # a config.json without the field: count the names
    assert num_layers(["lm_head.weight"]) == 1
