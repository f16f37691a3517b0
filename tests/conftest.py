"""Shared fixtures: a fixed seed for every test, and tiny checkpoints written the way users have them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An aligned tiny Llama and a fine-tune of it, single-file safetensors, untied head (read-only!)."""
    from mergekit_safe.tiny import save_tiny_pair

    return save_tiny_pair(tmp_path_factory.mktemp("pair"), seed=1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """``allclose`` that says where and by how much the tensors differ when they do."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (a - e).abs().max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (max abs {worst:.3g}); "
                             f"first at {idx}: {a[bad][:5].tolist()} vs {e[bad][:5].tolist()}")
