"""The reader against the safetensors library's own loader, and the writer read back by it."""

from __future__ import annotations

import json
import struct
import zipfile
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


# ---- header rules: each decided like safe_open, refused with one line naming file and problem ----------

def _file(tmp_path: Path, header: str, data: bytes = b"", hlen: int | None = None) -> Path:
    raw = header.encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data)
    return p


def _safe_open_accepts(p: Path) -> bool:
    try:
        with safe_open(p, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
        return True
    except Exception:
        return False


T8 = '"dtype":"F32","shape":[2],"data_offsets":[0,8]'
HEADER_CASES = [  # (id, header, data, the reader's message after "<file>: ")
    ("overlap", '{"a":{%s},"b":{%s}}' % (T8, T8), b"\0" * 8,
     "corrupt safetensors header (tensor 'b': data_offsets [0, 8] overlaps the previous tensor "
     "(expected to start at 8))"),
    ("gap", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', b"\0" * 12,
     "corrupt safetensors header (tensor 'a': data_offsets [4, 12] leaves a gap (expected to start at 0))"),
    ("past_end", '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8,
     "truncated: tensor 'a' ends at byte 79 but the file has 71"),
    ("trailing", '{"a":{%s}}' % T8, b"\0" * 9, "1 trailing bytes after the tensor data (ends at byte 70, file has 71)"),
    ("negative_shape", '{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', b"\0" * 8,
     "corrupt safetensors header (tensor 'a': shape [-2] is not a list of integers in [0, 2**64))"),
    ("float_shape", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', b"\0" * 8,
     "corrupt safetensors header (tensor 'a': shape [2.0] is not a list of integers in [0, 2**64))"),
    ("bool_shape", '{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4,
     "corrupt safetensors header (tensor 'a': shape [True] is not a list of integers in [0, 2**64))"),
    ("infinity_shape", '{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', b"\0" * 8,
     "corrupt safetensors header (Infinity is not JSON)"),
    ("nan_shape", '{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', b"\0" * 8,
     "corrupt safetensors header (NaN is not JSON)"),
    ("huge_shape", '{"a":{"dtype":"F32","shape":[4294967296,4294967296,1],"data_offsets":[0,0]}}', b"",
     "corrupt safetensors header (tensor 'a': shape [4294967296, 4294967296, 1] overflows 64 bits)"),
    ("size_mismatch", '{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8,
     "corrupt safetensors header (tensor 'a': 8 bytes for shape [3] F32 (expected 12))"),
    ("unknown_dtype", '{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8,
     "corrupt safetensors header (tensor 'a': unknown dtype 'F33'; safetensors has BOOL, F4, F6_E2M3, F6_E3M2, U8, "
     "I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, "
     "U64)"),
    ("nested_metadata", '{"__metadata__":{"k":{"x":"y"}},"a":{%s}}' % T8, b"\0" * 8,
     "corrupt safetensors header (__metadata__ is not an object of strings)"),
    ("int_metadata", '{"__metadata__":{"k":1},"a":{%s}}' % T8, b"\0" * 8,
     "corrupt safetensors header (__metadata__ is not an object of strings)"),
    ("list_metadata", '{"__metadata__":["k"],"a":{%s}}' % T8, b"\0" * 8,
     "corrupt safetensors header (__metadata__ is not an object of strings)"),
    ("header_not_object", '[1, 2]', b"", "corrupt safetensors header (the header is not a JSON object)"),
    ("deep_nesting", '{"a":{%s,"x":%s}}' % (T8, "[" * 200 + "]" * 200), b"\0" * 8,
     "corrupt safetensors header (nested deeper than 127 levels)"),
    ("duplicated_field", '{"a":{%s,"shape":[2]}}' % T8, b"\0" * 8,
     "corrupt safetensors header (tensor 'a': field 'shape' appears twice)"),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_header_rules_match_safe_open(tmp_path: Path, case: tuple[str, str, bytes, str]) -> None:
    p = _file(tmp_path, case[1], case[2])
    assert not _safe_open_accepts(p)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(p)
    assert str(err.value) == f"{p}: {case[3]}"


def test_header_length_past_the_file_or_the_limit(tmp_path: Path) -> None:
    p = _file(tmp_path, "{}", hlen=100)
    with pytest.raises(CheckpointError, match=r"corrupt safetensors header \(claims 100 bytes, file has 10\)$"):
        open_checkpoint(p)
    p = _file(tmp_path, "{}", hlen=100_000_001)
    assert not _safe_open_accepts(p)
    with pytest.raises(CheckpointError, match=r"claims 100000001 bytes, more than the 100000000 safetensors allows"):
        open_checkpoint(p)


def test_duplicated_tensor_name_is_refused_even_where_safe_open_keeps_the_last(tmp_path: Path) -> None:
    p = _file(tmp_path, '{"a":{%s},"a":{%s}}' % (T8, T8), b"\0" * 8)
    assert _safe_open_accepts(p)  # the one intended difference: an ambiguous header is refused
    with pytest.raises(CheckpointError, match=r"x\.safetensors: corrupt safetensors header \('a' appears twice"):
        open_checkpoint(p)


@pytest.mark.parametrize("header", [
    '{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{%s}}' % T8,  # entries out of offset order
    '{"a":["F32",[2],[0,8]],"b":{"dtype":{"F32":null},"shape":[2],"data_offsets":[8,16],"extra":[1]}}',
    '{"__metadata__":null,"a":{%s},"b":{"dtype":"U16","shape":[0,4294967296,4294967296],"data_offsets":[8,8]},'
    '"c":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}' % T8,
])
def test_odd_but_valid_headers_read_like_safe_open(tmp_path: Path, header: str) -> None:
    data = bytes(range(16))
    p = _file(tmp_path, header, data)
    with safe_open(p, "pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    with open_checkpoint(p) as ckpt:
        assert sorted(ckpt.keys()) == sorted(want)
        for k, t in want.items():
            got = ckpt.get(k)
            assert (got.dtype, got.shape) == (t.dtype, t.shape) and torch.equal(got, t), k


# ---- shard names are confined to the model folder; symlinked shards still work ------------------------

def _sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = sample_state()
    with CheckpointWriter(tmp_path / "m", [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()], 40) as w:
        for n, t in state.items():
            w.write(n, t.reshape(-1))
        w.finalize()
    return tmp_path / "m", state


@pytest.mark.parametrize("bad", ["../other/model.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ".", "",
                                 "C:model.safetensors", "a\\..\\b.safetensors", "x\x00.safetensors"])
def test_index_shard_names_must_be_plain_file_names(tmp_path: Path, bad: str) -> None:
    model, _ = _sharded(tmp_path)
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = bad
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(model)
    assert str(err.value) == (f"{index}: shard name {bad!r} is not a plain file name inside {model} "
                              "(no folders, '..', absolute paths, drive letters or NUL)")


@pytest.mark.parametrize("content, message", [
    (b'{"weight_map": ["a"]}', "malformed index; expected a JSON object with a 'weight_map' object"),
    (b'["weight_map"]', "malformed index; expected a JSON object with a 'weight_map' object"),
    (b'{"weight_map": {"a.weight": 3}}', "shard name '3' is not a string"),
    (b'{"weight_map": {"a.weight": \xff}}', "not UTF-8 (invalid start byte at byte 28)"),
    (b'{"weight_map": {',
     "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 17 (char 16))"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON (nested too deeply)"),
])
def test_malformed_index_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    model, _ = _sharded(tmp_path)
    (model / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(model)
    assert str(err.value) == f"{model / 'model.safetensors.index.json'}: {message}"


def test_hugging_face_cache_symlinks_are_followed(tmp_path: Path) -> None:
    """snapshots/<rev>/<shard> -> ../../blobs/<sha>: the names are plain, the links point outside, and that is fine."""
    model, state = _sharded(tmp_path)
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        (blobs / f"sha{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"sha{i}")
    with open_checkpoint(snap) as ckpt:
        assert len(ckpt.files) > 1 and all(f.parent == snap and f.is_symlink() for f in ckpt.files)
        for n, t in state.items():
            assert torch.equal(ckpt.get(n), t), n


def test_old_format_pickle_loads_when_allowed(tmp_path: Path) -> None:
    state = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5)}
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights can run code"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert sorted(ckpt.keys()) == sorted(state)
        for n, t in state.items():
            assert torch.equal(ckpt.get(n), t), n


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickled weights are not a state dict"):
        open_checkpoint(tmp_path, allow_pickle=True)


@pytest.mark.parametrize("shape, accepted", [("[0, 4611686018427387904, 2]", False), ("[0, 4611686018427387904, 4]", True),
                                             ("[0, 18446744073709551615]", False)])
def test_zero_size_tensors_with_huge_dimensions_follow_torch(tmp_path: Path, shape: str, accepted: bool) -> None:
    """Found by the fuzzer: torch's stride overflow rule decides these, for safe_open and for the reader alike."""
    p = _file(tmp_path, '{"a":{"dtype":"F32","shape":%s,"data_offsets":[0,0]}}' % shape)
    assert _safe_open_accepts(p) == accepted
    if accepted:
        with open_checkpoint(p) as ckpt:
            assert ckpt.get("a").shape == tuple(json.loads(shape))
    else:
        with pytest.raises(CheckpointError, match=r"x\.safetensors: corrupt safetensors header \(tensor 'a': "):
            open_checkpoint(p)
