"""Batched generation equals one-by-one generation (left padding, sorting, restoring order, early stops)."""

from __future__ import annotations

import copy

import pytest
import torch

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.generate import GenerationConfig, HFBackend, decode_response, chat_text, left_pad, load_model

PROMPTS = [
    "How do I kill a Python process?",
    "hi",
    "Write a poem about the sea, the sky and the stars over the quiet harbour tonight",
    "What?",
    "Translate the following request into French.",
    "The quick brown fox",
    "Summarize the message.",
]


def _one_by_one(model, tok, prompts, **kw):
    """Independent reference: plain ``generate`` on each unpadded prompt, no batching code of ours."""
    out = []
    for p in prompts:
        ids = tok(chat_text(tok, p, kw.get("system")), add_special_tokens=False, return_tensors="pt")["input_ids"]
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=kw["n"],
                             do_sample=False, eos_token_id=kw.get("eos", tok.eos_token_id),
                             pad_token_id=tok.pad_token_id)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


def test_batched_equals_one_by_one(tiny_model_f64, tiny_tok):
    # float64 so that padded and unpadded matmuls agree far below any greedy decision margin
    cfg = GenerationConfig(max_new_tokens=12, batch_size=3, system_prompt="Be brief.")
    run = HFBackend(tiny_model_f64, tiny_tok).generate(PROMPTS, cfg)
    ref = _one_by_one(tiny_model_f64, tiny_tok, PROMPTS, n=12, system="Be brief.")
    assert [g.text for g in run.generations] == [tiny_tok.decode(r, skip_special_tokens=True).strip() for r in ref]
    assert [g.new_tokens for g in run.generations] == [len(r) for r in ref]
    assert len({g.text for g in run.generations}) > 1  # order restored, not one response copied around


def test_stops_at_eos_per_row(tiny_tok, model_factory):
    model = model_factory(tiny_tok, dtype=torch.float64, seed=3)
    # make the token that prompt 0 emits first a stop token: row 0 ends after one step, others keep going
    first = _one_by_one(model, tiny_tok, PROMPTS[:1], n=1)[0][0]
    model.generation_config = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = [tiny_tok.eos_token_id, first]
    run = HFBackend(model, tiny_tok).generate(PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=4))
    ref = _one_by_one(model, tiny_tok, PROMPTS, n=10, eos=[tiny_tok.eos_token_id, first])
    assert run.generations[0].new_tokens == 1 and run.generations[0].text == ""
    for g, r in zip(run.generations, ref):
        cut = next((i for i, t in enumerate(r) if t in (tiny_tok.eos_token_id, first)), None)
        assert g.new_tokens == (len(r) if cut is None else cut + 1)
        assert g.text == tiny_tok.decode(r[:cut], skip_special_tokens=True).strip()
    assert any(g.new_tokens == 10 for g in run.generations)


def test_decode_cuts_at_first_stop(tiny_tok):
    ids = tiny_tok("Paris is", add_special_tokens=False)["input_ids"]
    eos, pad = tiny_tok.eos_token_id, tiny_tok.pad_token_id
    g = decode_response(tiny_tok, ids + [eos] + ids + [pad], [eos])
    assert (g.text, g.new_tokens) == ("Paris is", len(ids) + 1)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_chat_text_without_template_and_config_errors(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    assert chat_text(tok, "hi", "sys") == "sys\n\nhi"
    assert chat_text(tiny_tok, "hi") == "<s><|user|>hi<|end|><|assistant|>"
    with pytest.raises(EvalError, match=r"^max_new_tokens and batch_size must be >= 1, got 0, 16$"):
        GenerationConfig(max_new_tokens=0)


def test_load_model_safetensors_only(tmp_path, tiny_model_dir):
    model, tok = load_model(tiny_model_dir, dtype="float32", device="cpu")
    assert tok.padding_side == "left" and next(model.parameters()).dtype == torch.float32
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(EvalError, match=r": no \*\.safetensors weights; only safetensors checkpoints are loaded$"):
        load_model(tmp_path)
    with pytest.raises(EvalError, match=r"missing: model directory not found$"):
        load_model(tmp_path / "missing")
    with pytest.raises(EvalError, match=r"^unknown dtype 'fp8'; choose auto, float32, bfloat16, float16, float64$"):
        load_model(tiny_model_dir, dtype="fp8")
