"""Continuous batching gives the same greedy responses as plain ``generate`` in float32."""

from __future__ import annotations

import copy

import torch

from mergekit_safe.eval.fast import HFFastBackend
from mergekit_safe.eval.generate import GenerationConfig, HFBackend

from .test_generate import PROMPTS, _one_by_one


def test_fast_equals_plain_generate_fp32(tiny_model, tiny_tok):
    cfg = GenerationConfig(max_new_tokens=12, batch_size=3, system_prompt="Be brief.")
    fast = HFFastBackend(tiny_model, tiny_tok).generate(PROMPTS, cfg)
    plain = HFBackend(tiny_model, tiny_tok).generate(PROMPTS, cfg)
    ref = _one_by_one(tiny_model, tiny_tok, PROMPTS, n=12, system="Be brief.")
    assert [g.text for g in fast.generations] == [g.text for g in plain.generations]
    assert [g.new_tokens for g in fast.generations] == [len(r) for r in ref]
    assert len({g.text for g in fast.generations}) > 1


def test_fast_stops_at_every_stop_token(tiny_tok, model_factory):
    model = model_factory(tiny_tok, dtype=torch.float32, seed=3)
    first = _one_by_one(model, tiny_tok, PROMPTS[:1], n=1)[0][0]
    model.generation_config = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = [tiny_tok.eos_token_id, first]
    cfg = GenerationConfig(max_new_tokens=10)
    fast = HFFastBackend(model, tiny_tok).generate(PROMPTS, cfg)
    plain = HFBackend(model, tiny_tok).generate(PROMPTS, cfg)
    assert fast.generations[0] == plain.generations[0] and fast.generations[0].new_tokens == 1
    assert fast.generations == plain.generations
