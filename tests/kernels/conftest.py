"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, so it is set here, at import time,
before anything imports triton (pytest imports this conftest before the test modules).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; keep today's default

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _backend(monkeypatch):
    """No test leaks a backend scope, and the environment variable (read only by the CLI) is cleared."""
    from mergekit_safe.kernels import current_backend

    monkeypatch.delenv("MERGEKIT_SAFE_BACKEND", raising=False)
    yield
    assert current_backend() == "auto", "a test left a use_backend scope open"
