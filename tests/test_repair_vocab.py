"""``repair`` on an added-token fine-tune: a chat fine-tune that added ``<|im_start|>`` / ``<|im_end|>``.

The inputs are tiny Llamas with real tokenizers: a base (a toy BPE of 300 tokens) and a fine-tune made the
common way (``add_tokens`` + ``resize_token_embeddings``, then trained: here moved by seeded noise), which has
302 embedding and head rows. Before this change ``repair`` refused it as another architecture. Expectations are
computed in float64 from the files on disk, rows matched by token string.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mergekit_safe.errors import CheckpointError
from mergekit_safe.repair.command import RepairConfig, repair
from mergekit_safe.tiny import toy_llama, toy_tokenizer
from tests.helpers import assert_close

CORPUS = ["I cannot help with that.", "Sure, here is how you do it.", "The cat sat on the mat."] * 3
ADDED = ["<|im_start|>", "<|im_end|>"]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _save(folder: Path, added: list[str], seed: int, noise: float) -> Path:
    """The base model (seed 0) resized to its tokenizer and moved by seeded noise, saved with the tokenizer."""
    tok = toy_tokenizer(CORPUS, vocab_size=300)
    base_len = len(tok)
    tok.add_tokens(added, special_tokens=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = toy_llama(toy_tokenizer(CORPUS, vocab_size=300), seed=0)
        if len(tok) != base_len:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chat")
    return _save(d / "base", [], seed=0, noise=0.0), _save(d / "chat", ADDED, seed=1, noise=0.05)


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def _config(base: Path, ft: Path, out: Path, **kw: Any) -> RepairConfig:
    # a few builtin prompts and tokens: the search runs end to end on a CPU in seconds; utility is the NLL of the
    # fine-tune's own answers, so the base is infeasible and the bracketing picks a coefficient strictly inside
    return RepairConfig(base, ft, out, harmful_limit=4, benign_limit=4, max_new_tokens=4, trials=6,
                        over_refusal_slack=None, device="cpu", **kw)


def test_repair_keeps_the_added_tokens(chat_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ft = chat_pair
    result = repair(_config(base, ft, tmp_path / "out"))
    out = result.output
    a = float(result.report.chosen["coeffs"]["all"])
    assert 0.0 < a <= 1.0
    # the output is the fine-tune's vocabulary, tokenizer and config, and loads as any checkpoint does
    ft_vocab = _vocab(ft)
    assert _vocab(out) == ft_vocab and all(t in ft_vocab for t in ADDED)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(ft_vocab) == 302
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("<|im_start|> The cat sat <|im_end|>", return_tensors="pt")["input_ids"]
    assert ft_vocab["<|im_start|>"] in ids[0].tolist()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model(input_ids=ids).logits.shape[-1] == 302
    written = load_file(out / "model.safetensors")
    b64 = {k: v.double() for k, v in load_file(base / "model.safetensors").items()}
    f32 = load_file(ft / "model.safetensors")
    base_vocab = _vocab(base)
    for name, t in written.items():
        f = f32[name].double()
        b = b64[name]
        if name in VOCAB:
            # the base's rows laid out in the fine-tune's vocabulary by token string (a loop, not align_rows)
            b = f.clone()
            for token, i in ft_vocab.items():
                if token in base_vocab:
                    b[i] = b64[name][base_vocab[token]]
            for token in ADDED:  # the added tokens' rows: the fine-tune's, bit for bit
                assert torch.equal(t[ft_vocab[token]], f32[name][ft_vocab[token]]), (name, token)
        # fp32 engine math against float64: a few ulps of the inputs' magnitude
        scale = float(b.abs().max() + f.abs().max())
        assert_close(t, (1 - a) * b + a * f, 4 * 2.0**-23 * scale, 0.0, name)


@pytest.mark.parametrize("method", ["lerp", "dare_linear", "ties"])
def test_in_memory_candidate_is_the_written_one(chat_pair: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    """The loaded space (the fine-tune's model, the base read in its vocabulary) writes what it evaluates."""
    from mergekit_safe.merge.engine import merge
    from mergekit_safe.repair.command import build_recipe, load_inputs
    from mergekit_safe.repair.groups import parse_groups

    base, ft = chat_pair
    cfg = _config(base, ft, tmp_path / "out", groups="layers:2", method=method, density=0.6, seed=3)
    spec = parse_groups(cfg.groups)
    loaded = load_inputs(cfg, spec, "cpu")
    try:
        space = loaded.space
        assert loaded.tokenizer.convert_tokens_to_ids("<|im_start|>") == _vocab(ft)["<|im_start|>"]
        coeffs = {g: 0.3 + 0.2 * i for i, g in enumerate(space.groups)}
        space.apply(coeffs)
        recipe = build_recipe(cfg, space, spec, coeffs, loaded.num_layers)
        assert recipe.tokenizer_source == str(ft)
        merge(recipe, tmp_path / "out", progress=False)
    finally:
        loaded.close()
    written = load_file(tmp_path / "out" / "model.safetensors")
    params = dict(loaded.model.named_parameters())
    f32 = load_file(ft / "model.safetensors")
    for name in VOCAB:
        for token in ADDED:
            i = _vocab(ft)[token]
            assert torch.equal(params[name][i].detach(), f32[name][i]), name  # tau is 0 there: exactly the ft's
    for name, t in written.items():
        if method != "lerp":  # the same processed tau, the same base + lambda * tau in fp32: bit for bit
            assert torch.equal(t, params[name].detach()), name
            continue
        # the engine's (1-a)*base + a*ft against the search's base + a*(ft - base): a few fp32 ulps
        scale = float(params[name].detach().abs().max() + f32[name].abs().max())
        assert_close(t, params[name].detach(), 4 * 2.0**-23 * scale, 0.0, name)


def test_added_tokens_without_a_tokenizer_is_one_line(chat_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from mergekit_safe.repair.command import validate

    base, ft = chat_pair
    bare = tmp_path / "bare"
    shutil.copytree(base, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    with pytest.raises(CheckpointError, match=rf"^{bare}: the fine-tune's vocabulary has 302 rows and the base's "
                                              r"300; matching rows by token string needs both tokenizers"):
        validate(_config(bare, ft, tmp_path / "out"))


@pytest.mark.parametrize("method", ["safe_lora", "safemerge"])
def test_thresholded_repair_of_an_added_token_finetune(chat_pair: tuple[Path, Path], tmp_path: Path,
                                                      method: str) -> None:
    """``--method safe_lora | safemerge`` end to end through the CLI: the written checkpoint is the in-memory
    candidate at the chosen thresholds bit for bit, with the fine-tune's vocabulary and added rows."""
    from click.testing import CliRunner

    from mergekit_safe.cli import main
    from mergekit_safe.repair.command import load_inputs
    from mergekit_safe.repair.groups import parse_groups

    base, ft = chat_pair
    unaligned = _save(tmp_path / "unaligned", [], seed=2, noise=0.05)  # the base's vocabulary
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["repair", "--base", str(base), "--finetuned", str(ft), "--unaligned",
                                  str(unaligned), "--method", method, "--groups", "layers:2", "--harmful-limit", "4",
                                  "--benign-limit", "4", "--max-new-tokens", "4", "--trials", "6", "--device", "cpu",
                                  "--no-progress", "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "repair_report.json").read_text())
    assert f"merge_method: {method}" in (out / "mergekit_safe_recipe.yml").read_text()
    assert _vocab(out) == _vocab(ft)
    cfg = _config(base, ft, tmp_path / "unused", method=method, unaligned=unaligned, groups="layers:2")
    loaded = load_inputs(cfg, parse_groups(cfg.groups), "cpu")
    try:
        loaded.space.apply(report["chosen"]["coeffs"])
    finally:
        loaded.close()
    params = dict(loaded.model.named_parameters())
    written = load_file(out / "model.safetensors")
    f32 = load_file(ft / "model.safetensors")
    assert set(written) == set(params)
    for name, t in written.items():
        assert torch.equal(t, params[name].detach()), name
    for name in VOCAB:  # never switched: the fine-tune's rows, the added ones included
        assert torch.equal(written[name], f32[name]), name


def test_a_broken_base_tokenizer_is_one_line(chat_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = chat_pair
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"^{broken}: cannot load the tokenizer \("):
        repair(_config(broken, ft, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
