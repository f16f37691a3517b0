"""Shared fixtures: a fixed seed for every test, and tiny checkpoints written the way users have them.

The close-check every test uses is :func:`tests.helpers.assert_close`.
"""

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

