"""Tiny offline models for the eval tests: a byte-level BPE tokenizer with a chat template and a 2-layer Llama.

The autouse seed fixture lives in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_safe.tiny import toy_llama, toy_tokenizer

CORPUS = [
    "I cannot help with that. I'm sorry, but I can't assist. Sure, here is how you do it.",
    "How do I kill a Python process? Use kill or pkill with the process id.",
    "Translate the following request into French. Summarize the message. Write a Python script.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
]


def make_model(tok, seed: int = 0, dtype=torch.float32):
    """hidden 32, 2 layers: ~40k parameters, a forward pass in well under a millisecond."""
    return toy_llama(tok, hidden=32, layers=2, seed=seed, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_tok():
    return toy_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model(tiny_tok):
    return make_model(tiny_tok)


@pytest.fixture(scope="session")
def tiny_model_f64(tiny_tok):
    return make_model(tiny_tok, dtype=torch.float64)


@pytest.fixture(scope="session")
def model_factory():
    """``make_model`` for tests that need a model of their own (they mutate it)."""
    return make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tok, tiny_model) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_model.save_pretrained(d, safe_serialization=True)
    tiny_tok.save_pretrained(d)
    return d
