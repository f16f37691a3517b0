"""``TensorSource``: the reader's Checkpoint and the LoRA adapter view implement the same typed Protocol."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from mergekit_safe.io.adapters import AdapterCheckpoint, open_input
from mergekit_safe.io.reader import Checkpoint, open_checkpoint
from mergekit_safe.io.source import TensorSource
from tests.helpers import assert_close
from tests.test_adapters import make_adapter

def _protocol_members() -> list[str]:
    """What the Protocol's body declares: its annotated attributes and its methods (dunders included)."""
    declared = [n for n, v in vars(TensorSource).items() if callable(v) or isinstance(v, property)]
    methods = [n for n in declared if not n.startswith("_") or n in ("__contains__", "__len__", "__enter__",
                                                                      "__exit__")]
    return sorted(methods + list(TensorSource.__annotations__))


@pytest.mark.parametrize("cls", [Checkpoint, AdapterCheckpoint])
def test_both_readers_have_every_member_with_the_protocols_signature(cls: type) -> None:
    assert {"get", "keys", "info", "release", "close", "__enter__", "tied_embeddings", "path"} <= set(_protocol_members())
    for name in _protocol_members():
        proto = getattr(TensorSource, name, None)
        if callable(proto) and not isinstance(proto, property):
            impl = getattr(cls, name, None)
            assert callable(impl), f"{cls.__name__}.{name} is missing"
            want = list(inspect.signature(proto).parameters)
            got = list(inspect.signature(impl).parameters)
            assert got == want, f"{cls.__name__}.{name}{got} != TensorSource.{name}{want}"
        elif isinstance(proto, property):
            assert isinstance(getattr(cls, name, None), property), f"{cls.__name__}.{name} is not a property"


def test_checkpoint_and_adapter_view_are_tensor_sources(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base = tiny_pair[0]
    expected = make_adapter(base, tmp_path / "adapter")
    sources: list[TensorSource] = [open_checkpoint(base), open_input(tmp_path / "adapter", base=str(base))]
    assert isinstance(sources[1], AdapterCheckpoint)
    for src in sources:
        assert isinstance(src, TensorSource)
        for attr in ("path", "root", "files", "config"):
            assert hasattr(src, attr), attr
        with src as same:  # the context manager yields the source and closes it on exit
            assert same is src
            name = "model.layers.0.self_attn.q_proj.weight"
            assert name in src and len(src) == len(src.keys()) and src.total_bytes() > 0
            full = src.get(name)
            assert full.shape == src.info(name).shape
            flat = src.get(name, 5, 17)
            assert torch.equal(flat, full.reshape(-1)[5:17])
            src.release(name)
            assert torch.equal(src.get(name), full)  # release is a hint: the tensor reads back the same
    # the adapter view gives peft's merged weights through the same interface
    with open_input(tmp_path / "adapter", base=str(base)) as view:
        q = "model.layers.0.self_attn.q_proj.weight"
        assert_close(view.get(q), expected[q], atol=1e-6, rtol=1e-5, what=q)
