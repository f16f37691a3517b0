"""GGUF in and out, checked against the gguf package's own reader and name map and transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_safe.cli import main
from mergekit_safe.errors import CheckpointError, OutputError
from mergekit_safe.io.gguf import gguf_to_hf, hf_to_gguf, open_gguf, write_gguf
from mergekit_safe.io.reader import open_checkpoint
from mergekit_safe.tiny import save_tiny_pair
from tests.helpers import assert_close

gguf = pytest.importorskip("gguf")
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7]])


@pytest.fixture(scope="module")
def half_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama pair stored in fp16 (so F16 GGUF holds it exactly); read-only."""
    return save_tiny_pair(tmp_path_factory.mktemp("half"), seed=4, dtype=torch.float16)


def _cli(*args: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _hf_from_gguf(folder: Path, name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_names_match_the_gguf_packages_map(half_pair: tuple[Path, Path]) -> None:
    names = list(load_file(half_pair[0] / "model.safetensors"))
    ref = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf in names:
        stem, suffix = hf.rsplit(".", 1)
        assert hf_to_gguf(hf) == f"{ref.get_name(stem)}.{suffix}", hf
        assert gguf_to_hf(hf_to_gguf(hf)) == hf


def test_merge_to_f16_gguf_is_exact(half_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, tuned = half_pair
    out = tmp_path / "merged"
    res = _cli("merge", "--method", "lerp", "--alpha", "0.25", aligned, tuned, "--to-gguf", "F16", "-o", out)
    assert res.exit_code == 0, res.output
    assert "GGUF: " in res.output and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert f"warning: {out}: no tokenizer llama.cpp can use" in res.output  # the tiny model has none
    merged = load_file(out / "model.safetensors")
    reader = gguf.GGUFReader(out / "model-F16.gguf")
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.context_length") == 64 and field("llama.rope.freq_base") == 10000.0
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    # fp16 values survive F16 (and F32 for norms) exactly: ours and transformers' reading agree bit for bit
    ours = open_gguf(out / "model-F16.gguf")
    theirs = _hf_from_gguf(out, "model-F16.gguf")
    for name, t in merged.items():
        assert torch.equal(ours.get(name).to(t.dtype), t), name
        assert torch.equal(theirs.state_dict()[name].to(t.dtype), t), name
    # the metadata rebuilds the same model: transformers' GGUF model gives the safetensors merge's logits
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(theirs(IDS).logits, ref(IDS).logits, 0, 0, "logits")


def test_q8_0_within_its_quantization_error(half_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned = half_pair[0]
    write_gguf(aligned, tmp_path / "q.gguf", "Q8_0")
    src = load_file(aligned / "model.safetensors")
    ours = open_gguf(tmp_path / "q.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    for name, x in src.items():
        got = ours.get(name).double()
        if x.dim() == 1:
            assert torch.equal(got, x.double()), name
            continue
        # Q8_0: blocks of 32 along a row, d = max|x|/127 stored in fp16, q = round(x/d): error <= d/2 from the
        # rounding plus 127 * |d - fp16(d)| <= 127 * d * 2^-11 from the scale
        blocks = x.double().reshape(-1, 32)
        bound = blocks.abs().amax(1, keepdim=True) / 127 * (0.5 + 127 * 2.0**-11)
        assert ((got.reshape(-1, 32) - blocks).abs() <= bound * (1 + 1e-6)).all(), name
        assert not torch.equal(got, x.double()), name  # it really was quantized
    theirs = _hf_from_gguf(tmp_path, "q.gguf").state_dict()
    for name in src:
        assert torch.equal(theirs[name].double(), ours.get(name).double()), name


def test_bf16_round_trip(tmp_path: Path) -> None:
    aligned, _ = save_tiny_pair(tmp_path / "pair", seed=5, dtype=torch.bfloat16)
    write_gguf(aligned, tmp_path / "b.gguf", "BF16")
    ours = open_gguf(tmp_path / "b.gguf")
    for name, t in load_file(aligned / "model.safetensors").items():
        assert torch.equal(ours.get(name).to(torch.bfloat16), t), name
    assert ours.info("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16


def test_gguf_input_merges_like_its_safetensors(half_pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, tuned = half_pair
    write_gguf(aligned, tmp_path / "aligned.gguf", "F16")
    assert isinstance(open_checkpoint(tmp_path / "aligned.gguf"), type(open_gguf(tmp_path / "aligned.gguf")))
    a = _cli("merge", "--method", "lerp", "--alpha", "0.3", tmp_path / "aligned.gguf", tuned, "-o", tmp_path / "a")
    b = _cli("merge", "--method", "lerp", "--alpha", "0.3", aligned, tuned, "-o", tmp_path / "b")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    got, want = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_bad_inputs_and_outputs(half_pair: tuple[Path, Path], tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    res = _cli("merge", "--method", "lerp", fake, half_pair[1], "-o", tmp_path / "x")
    assert res.exit_code == 1 and res.output.startswith(f"Error: {fake}: not a readable GGUF file")
    assert "Traceback" not in res.output
    with pytest.raises(OutputError, match="choose one of F16, BF16, Q8_0"):
        write_gguf(half_pair[0], tmp_path / "y.gguf", "Q4_K")
    with pytest.raises(CheckpointError, match="no config.json"):
        (tmp_path / "bare").mkdir()
        (tmp_path / "bare" / "model.safetensors").write_bytes((half_pair[0] / "model.safetensors").read_bytes())
        write_gguf(tmp_path / "bare", tmp_path / "z.gguf")
    (tmp_path / "taken").mkdir()
    res = _cli("merge", "--method", "lerp", *half_pair, "--to-gguf", "Q8_0", "-o", tmp_path / "taken")
    assert res.exit_code == 1 and "already exists" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "fake.gguf", "taken"]  # nothing left behind


def test_tokenizer_travels_with_the_gguf(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    from mergekit_safe.tiny import tiny_llama_config

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "how do I bake bread", "I'm sorry, I can't help"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    folder = tmp_path / "model"
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(fast) + 4)).save_pretrained(folder)  # 4 spare rows
    fast.save_pretrained(folder)
    assert write_gguf(folder, folder / "t.gguf", "F16") == []
    reader = gguf.GGUFReader(folder / "t.gguf")
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == len(fast) + 4
    back = AutoTokenizer.from_pretrained(folder, gguf_file="t.gguf")
    for text in ["the cat sat", "bake bread on the mat!", "I'm sorry, I can't"]:
        assert back(text).input_ids == fast(text).input_ids, text
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(fast) - 1)).save_pretrained(tmp_path / "small")
    fast.save_pretrained(tmp_path / "small")
    with pytest.raises(OutputError, match=f"the tokenizer has {len(fast)} tokens but the embeddings only"):
        write_gguf(tmp_path / "small", tmp_path / "s.gguf", "F16")
    assert not (tmp_path / "s.gguf").exists() and len(list(tmp_path.glob(".s.gguf*"))) == 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_other_families_round_trip_through_transformers(tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=False, head_dim=128 if family == "qwen3" else 8)
    # transformers' GGUF loader ignores qwen3.attention.key_length and uses Qwen3's default head_dim, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).half()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: move them so the mapping is tested
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    write_gguf(tmp_path / "m", tmp_path / "m" / "f.gguf", "F16")
    src = load_file(tmp_path / "m" / "model.safetensors")
    assert any(k.endswith("q_proj.bias") for k in src) == (family == "qwen2")
    theirs = _hf_from_gguf(tmp_path / "m", "f.gguf")
    ours = open_gguf(tmp_path / "m" / "f.gguf")
    for name, t in src.items():
        assert torch.equal(theirs.state_dict()[name].to(t.dtype), t), name
        assert torch.equal(ours.get(name).to(t.dtype), t), name
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(theirs(IDS).logits, ref(IDS).logits, 0, 0, "logits")
