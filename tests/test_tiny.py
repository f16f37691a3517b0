"""The one builder of tiny models: shapes from one config builder, seeded without touching the global RNG."""

from __future__ import annotations

import torch

from mergekit_safe.tiny import tiny_llama_config, toy_llama, toy_tokenizer

CORPUS = ["I cannot help with that.", "Sure, here is how you do it.", "What is the capital of France? Paris."]


def test_toy_llama_is_built_from_the_one_config_and_the_tokenizer() -> None:
    tok = toy_tokenizer(CORPUS, vocab_size=300)
    model = toy_llama(tok, hidden=16, layers=3, heads=2, kv_heads=1)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 16, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 1)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                       tok.pad_token_id)
    assert model.get_output_embeddings().weight.shape == (len(tok), 16)
    assert tiny_llama_config(layers=5).num_hidden_layers == 5


def test_building_a_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    tok = toy_tokenizer(CORPUS, vocab_size=300)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = toy_llama(tok, seed=7)
    after = torch.rand(4)
    b = toy_llama(tok, seed=7)
    c = toy_llama(tok, seed=8)
    assert torch.equal(after, expected)  # the caller's stream continues as if no model had been built
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
