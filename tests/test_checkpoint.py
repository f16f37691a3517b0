"""The reader against the safetensors library's own loader, and the writer read back by it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_safe.io.reader import open_checkpoint, sort_checkpoints
from mergekit_safe.errors import CheckpointError, OutputError
from mergekit_safe.io.writer import CheckpointWriter, TensorSpec, parse_size, plan_shards

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


def sample_state() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.randn(7, 5),
        "b.bias": torch.randn(3).half(),
        "c.weight": torch.randn(4, 3, 2).bfloat16(),
        "d.ids": torch.arange(6),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.empty(0, 4),
        "g.scalar": torch.tensor(3.5),
    }


def test_reader_matches_safetensors(tmp_path: Path) -> None:
    state = sample_state()
    save_file(state, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(state)
    for name, t in state.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    flat = state["a.weight"].reshape(-1)
    assert torch.equal(ckpt.get("a.weight", 5, 17), flat[5:17])
    ckpt.release("a.weight")
    assert torch.equal(ckpt.get("a.weight"), state["a.weight"])  # pages come back from the file
    ckpt.close()


def test_reader_never_modifies_the_file(tmp_path: Path) -> None:
    save_file({"w": torch.ones(10)}, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    ckpt.get("w").mul_(5)  # copy-on-write mapping: this changes only our private copy
    ckpt.close()
    assert (tmp_path / "m.safetensors").read_bytes() == before


@pytest.mark.parametrize("shard_bytes", [10**9, 100, 1])
def test_writer_output_loads_with_safetensors(tmp_path: Path, shard_bytes: int) -> None:
    state = sample_state()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()]
    with CheckpointWriter(tmp_path / "out", specs, shard_bytes) as w:
        for n, t in state.items():
            flat = t.reshape(-1)
            # stream in pieces of 4 elements to exercise partial writes
            for i in range(0, max(flat.numel(), 1), 4):
                w.write(n, flat[i:i + 4])
        w.finalize()
    loaded = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        loaded.update(load_file(f))
        with safe_open(f, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    assert sorted(loaded) == sorted(state)
    for n, t in state.items():
        assert loaded[n].dtype == t.dtype and torch.equal(loaded[n], t), n
    again = open_checkpoint(tmp_path / "out")
    assert torch.equal(again.get("c.weight"), state["c.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_writer_rejects_out_of_order_and_short_writes(tmp_path: Path) -> None:
    specs = [TensorSpec("x", (4,), torch.float32), TensorSpec("y", (2,), torch.float32)]
    w = CheckpointWriter(tmp_path / "o", specs, 10**9)
    with pytest.raises(OutputError, match="expected tensor 'x' next, got 'y'"):
        w.write("y", torch.zeros(2))
    w.write("x", torch.zeros(2))
    with pytest.raises(OutputError, match=r"tensor 'x' is incomplete \(8 of 16 bytes\)"):
        w.finalize()
    w.write("x", torch.zeros(2))
    with pytest.raises(OutputError, match="tensor 'y' was never written"):
        w.finalize()
    w.abort()
    assert not list(tmp_path.iterdir())


def test_shard_planning_and_sizes() -> None:
    specs = [TensorSpec(f"t{i}", (10,), torch.float32) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(specs, 100)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(specs, 10)] == [1, 1, 1, 1, 1]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100B") == 100
    with pytest.raises(ValueError, match="give a unit"):  # a bare number is ambiguous (5 bytes or 5 GB?)
        parse_size("100")


def test_sort_checkpoints_by_step() -> None:
    paths = [Path("run/checkpoint-1000"), Path("run/checkpoint-200"), Path("run/checkpoint-30")]
    assert [p.name for p in sort_checkpoints(paths)] == ["checkpoint-30", "checkpoint-200", "checkpoint-1000"]
    plain = [Path("b"), Path("a")]
    assert sort_checkpoints(plain) == plain


def test_bad_header_entries(tmp_path: Path) -> None:
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        open_checkpoint(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="not a .safetensors file or a model folder"):
        open_checkpoint(_touch(tmp_path / "x.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")


def _touch(p: Path) -> Path:
    p.write_text("")
    return p
