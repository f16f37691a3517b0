"""Differential fuzzing of the safetensors reader against ``safetensors.safe_open``.

A seeded mutator starts from valid files written by ``safetensors.torch.save_file`` and breaks them the ways
hostile or damaged files are broken (byte flips, truncation, appended bytes, header JSON edits: shapes,
dtypes, offsets, metadata, duplicated keys, odd JSON tokens, deep nesting). For every case the reader must
decide like ``safe_open`` (accept / reject), return bit-identical tensors when it accepts, and raise a
one-line ``CheckpointError`` naming the file (never another exception) when it rejects. The one intended
difference: a tensor name that appears twice is always refused (see ``mergekit_safe/io/header.py``).

``MERGEKIT_SAFE_FUZZ_CASES`` (default 3000) sets the number of mutated files and ``MERGEKIT_SAFE_FUZZ_SEED``
(default 20261201) the seed, so a longer or different run is one environment variable away.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_safe.cli import main
from mergekit_safe.errors import CheckpointError
from mergekit_safe.io.reader import open_checkpoint, read_safetensors_header

CASES = int(os.environ.get("MERGEKIT_SAFE_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("MERGEKIT_SAFE_FUZZ_SEED", "20261201"))
# The dtype names safetensors 0.8 lists in its own "unknown variant" error, plus names it does not know.
ST_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
             "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
BAD_DTYPES = ["F33", "f32", "", "FLOAT", "F8", "Q4_0"]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]
EDGE_INTS = [0, 1, 2, 3, 7, 8, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


class Raw:
    """A JSON token written verbatim (NaN, -0, 1e400, a duplicated key ...)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object as ordered pairs, so a key may repeat."""


def dump(v: Any) -> str:
    """JSON text of ``v``; unlike ``json.dumps`` it writes raw tokens and repeated keys."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(x)}" for k, x in v) + "}"
    if isinstance(v, dict):
        return dump(Pairs(v.items()))
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


def assemble(header: str | bytes, data: bytes, pad: int = 0, hlen: int | None = None) -> bytes:
    raw = (header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header) + b" " * pad
    return struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data


def reference(path: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """What ``safe_open`` makes of the file: every tensor and the metadata, or None when it refuses."""
    try:
        with safe_open(path, "pt") as f:
            return {k: snapshot(f.get_tensor(k)) for k in f.keys()}, f.metadata() or {}
    except BaseException as e:  # a pyo3 PanicException derives from BaseException; it is a refusal too
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def ours(path: Path) -> tuple[dict[str, Any], dict[str, str]] | CheckpointError:
    """What the reader makes of it; any exception other than CheckpointError escapes and fails the test."""
    try:
        _, meta = read_safetensors_header(path)
        with open_checkpoint(path) as ckpt:
            return {k: snapshot(ckpt.get(k)) for k in ckpt.keys()}, meta
    except CheckpointError as e:
        return e


def snapshot(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    """dtype, shape and the exact bytes (no copy kernel in between: copying a bool tensor normalises it)."""
    data = bytes(t.reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""
    return t.dtype, tuple(t.shape), data


def has_duplicate_tensor_name(blob: bytes) -> bool:
    """True when the header parses as JSON with a top-level key given twice (the intended difference)."""
    dup = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup.append(len(keys) != len(set(keys)))
        return dict(pairs)

    try:
        (n,) = struct.unpack("<Q", blob[:8])
        json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=hook)
    except (ValueError, struct.error, RecursionError):
        return False
    return bool(dup) and dup[-1]  # the hook runs innermost first: the last call is the top-level object


def check_case(path: Path, blob: bytes) -> bool:
    """Assert the reader agrees with safe_open on one file; returns whether safe_open accepted it."""
    path.write_bytes(blob)
    want, got = reference(path), ours(path)
    if isinstance(got, CheckpointError):
        msg = str(got)
        assert msg.startswith(str(path)) and "\n" not in msg, msg
        if want is not None:
            assert has_duplicate_tensor_name(blob) and "appears twice" in msg, (msg, blob[:300])
        return want is not None
    assert want is not None, f"reader accepted a file safe_open refuses: {blob[:300]!r}"
    tensors, meta = got
    assert sorted(tensors) == sorted(want[0]), blob[:300]
    assert meta == want[1]
    for name, t in want[0].items():
        assert tensors[name] == t, (name, tensors[name][:2], t[:2])
    return True


# ---- the seeded mutator ----------------------------------------------------------------------------------

def valid_file(rng: random.Random, path: Path) -> bytes:
    """A small valid file from the reference writer: 1-4 tensors, mixed dtypes, odd shapes, maybe metadata."""
    state = {}
    for i in range(rng.randint(1, 4)):
        shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(0, 3))]
        dtype = rng.choice(TORCH_DTYPES)
        t = torch.randint(0, 255, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        state[f"layer.{i}.{rng.choice(['w', 'weight', 'b'])}"] = t.to(dtype) if dtype != torch.bool else t > 100
    meta = rng.choice([None, {"format": "pt"}, {"format": "pt", "note": "x"}])
    save_file(state, path, metadata=meta)
    return path.read_bytes()


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def relayout(header: dict[str, Any], data: bytes, rng: random.Random) -> tuple[dict[str, Any], bytes]:
    """Recompute offsets so edited shapes / dtypes tile again, and size the data to match (more accepts)."""
    bits = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16,
            "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
    start = 0
    for name, e in header.items():
        if name == "__metadata__" or not isinstance(e, dict):
            continue
        numel = 1
        for d in e.get("shape", []) if isinstance(e.get("shape"), list) else []:
            numel *= d if isinstance(d, int) else 1
        size = numel * bits.get(str(e.get("dtype")), 8) // 8
        if size > 4096:
            return header, data  # keep claims of huge tensors as they are: a truncation case
        e["data_offsets"] = [start, start + size]
        start += size
    return header, bytes(rng.getrandbits(8) for _ in range(start))


def edit_header(h: dict[str, Any], rng: random.Random) -> Any:
    """One structural edit of the header; returns the (possibly non-dict) new header."""
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    entry = h[name]
    kind = rng.randrange(14)
    if kind == 0 and entry["shape"]:  # a shape entry becomes an edge value or a non-integer token
        i = rng.randrange(len(entry["shape"]))
        entry["shape"][i] = rng.choice(EDGE_INTS + [-1, -2, 1.0, 2.5, True, None, "2", Raw("-0"), Raw("1e400"),
                                                     Raw("Infinity"), Raw("NaN"), Raw("2e0"),
                                                     Raw("18446744073709551616")])
    elif kind == 1:  # a whole new shape
        entry["shape"] = [rng.choice(EDGE_INTS[:6] + [2**32, 2**63 - 1, 2**64 - 1]) for _ in range(rng.randint(0, 4))]
    elif kind == 2:  # a dtype, known or not, or serde's map form
        d = rng.choice(ST_DTYPES + BAD_DTYPES)
        entry["dtype"] = rng.choice([d, d, Pairs([(d, None)]), Pairs([(d, 1)]), 3, None])
    elif kind == 3:  # an offset moved, stretched or copied from another tensor (overlap)
        other = h[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([
            list(other), [entry["data_offsets"][0] + rng.choice([-1, 1, 4]), entry["data_offsets"][1]],
            [entry["data_offsets"][0], entry["data_offsets"][1] + rng.choice([-1, 1, 8, 2**40])],
            [entry["data_offsets"][1], entry["data_offsets"][0]], [0, 2**64 - 1], [0], [0, 1, 2], [Raw("-0"), 0]])
    elif kind == 4:  # offsets swapped between two tensors
        other = rng.choice(names)
        entry["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], entry["data_offsets"]
    elif kind == 5:  # metadata of the wrong type
        h["__metadata__"] = rng.choice([{"a": {"b": "c"}}, {"a": 1}, ["x"], None, "x", {"a": None}, {}, {"a": "b"}])
    elif kind == 6:  # a field dropped, or an unknown field added (maybe deeply nested)
        if rng.random() < 0.5:
            del entry[rng.choice(["dtype", "shape", "data_offsets"])]
        else:
            depth = rng.choice([1, 50, 125, 126, 200])
            entry["extra"] = rng.choice([Raw("[" * depth + "]" * depth), Raw("1e400"), Raw("9" * 400), Raw("-0"),
                                         Raw("1e-400"), Raw('"\\udc00"'), Raw('"\\u0000"'),
                                         Raw("18446744073709551616")])
    elif kind == 7:  # the array form safetensors also reads
        h[name] = [entry["dtype"], entry["shape"], entry["data_offsets"]] + ([0] if rng.random() < 0.2 else [])
    elif kind == 8:  # a repeated key: tensor name, __metadata__, a field, a metadata key
        pairs = Pairs(h.items())
        which = rng.randrange(4)
        if which == 0:
            pairs.append((name, rng.choice([entry, dict(entry, data_offsets=[0, 0], shape=[0])])))
        elif which == 1:
            pairs.append(("__metadata__", {"k": "v"}))
        elif which == 2:
            pairs = Pairs((k, Pairs(list(v.items()) + [("shape", v["shape"])]) if k == name else v) for k, v in pairs)
        else:
            repeated = Pairs([("k", "a"), ("k", "b")])
            pairs = Pairs([p for p in pairs if p[0] != "__metadata__"] + [("__metadata__", repeated)])
        return pairs
    elif kind == 9:  # the header is not an object
        return rng.choice([[1, 2], "x", 3, None, []])
    elif kind == 10:  # strings serde refuses or accepts in odd places
        h[rng.choice(["\\ud800", "a\\u0000b", "", "\\ud83d\\ude00"])] = h.pop(name)
        return Pairs((Raw(json.dumps(k).replace("\\\\", "\\")) if "\\u" in k else k, v) for k, v in h.items())
    elif kind == 11:  # shuffled entry order (valid: safetensors sorts by offsets)
        items = list(h.items())
        rng.shuffle(items)
        return dict(items)
    elif kind == 12:  # the tensor is removed (its bytes stay: a gap or trailing bytes)
        del h[name]
    else:  # huge claimed shape with consistent offsets: a file that would need terabytes
        entry["shape"], entry["dtype"] = [2**20, 2**20], "F32"
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 2**42]
    return h


def dump_pairs_with_raw_keys(h: Any) -> str:
    if isinstance(h, Pairs) and any(isinstance(k, Raw) for k, _ in h):
        return "{" + ",".join(f"{k.text if isinstance(k, Raw) else json.dumps(k)}:{dump(v)}" for k, v in h) + "}"
    return dump(h)


def mutate(blob: bytes, rng: random.Random) -> bytes:
    """One hostile variant of a valid file."""
    kind = rng.randrange(10)
    b = bytearray(blob)
    (n,) = struct.unpack("<Q", blob[:8])
    if kind == 0:  # flip bytes in the header
        for _ in range(rng.randint(1, 3)):
            b[8 + rng.randrange(n)] = rng.choice(b'{}[]",:0123456789-eE. \x00\xff\\tnaN') if rng.random() < 0.7 \
                else rng.randrange(256)
        return bytes(b)
    if kind == 1:  # the length prefix
        hlen = rng.choice([0, 1, n - 1, n + 1, n + 8, len(blob), 100_000_001, 2**63, 2**64 - 1])
        return struct.pack("<Q", hlen) + blob[8:]
    if kind == 2:  # truncation anywhere
        return blob[:rng.randrange(len(blob))]
    if kind == 3:  # appended bytes
        return blob + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9)))
    if kind == 4:  # flip bytes in the data (must be read back identically)
        if len(blob) > 8 + n:
            b[rng.randrange(8 + n, len(blob))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 5:  # odd but maybe legal whitespace / junk around the JSON
        text = blob[8:8 + n].rstrip(b" ")
        before = rng.choice([b" ", b"\t\n\r", b"", b"\x0c"])
        text = before + text + rng.choice([b" ", b"\n", b"//", b",", b"\xc2\xa0", b"x"])
        return assemble(text, blob[8 + n:])
    header, data = split(blob)
    header = edit_header(header, rng)
    if isinstance(header, dict) and rng.random() < 0.6:
        header, data = relayout(header, data, rng)
    return assemble(dump_pairs_with_raw_keys(header), data, pad=rng.choice([0, 0, 3, 7]))


def test_differential_fuzz_against_safe_open(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    accepted = 0
    for i in range(CASES):
        base = valid_file(rng, tmp_path / f"base{i % 50}.safetensors") if i < 50 else \
            (tmp_path / f"base{rng.randrange(50)}.safetensors").read_bytes()
        blob = base if i % 97 == 0 else mutate(base, rng)
        accepted += check_case(tmp_path / f"case{i}.safetensors", blob)
    # both decisions must be well represented, or the fuzzer is not exercising the parser
    assert CASES // 10 < accepted < CASES - CASES // 10, accepted


# ---- hypothesis: headers built from the grammar, not from valid files ----------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64 + 3), st.sampled_from([0.5, -0.0, 1e300]),
                      st.text(max_size=3))
dims = st.one_of(st.integers(0, 4), st.sampled_from([2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, 1.0, True]))
entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(ST_DTYPES + BAD_DTYPES), "shape": st.lists(dims, max_size=3),
     "data_offsets": st.lists(st.integers(0, 70), min_size=2, max_size=2)},
    optional={"extra": st.recursive(json_leaf, lambda c: st.lists(c, max_size=2), max_leaves=4)})
headers = st.dictionaries(st.text(min_size=0, max_size=4).filter(lambda k: k != "__metadata__"), entry, max_size=4)
metas = st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers()),
                                             max_size=2))


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(header=headers, meta=metas, data_len=st.integers(0, 72), with_meta=st.booleans())
def test_grammar_headers_against_safe_open(tmp_path: Path, header: dict[str, Any], meta: Any, data_len: int,
                                           with_meta: bool) -> None:
    h: dict[str, Any] = dict(header)
    if with_meta:
        h["__metadata__"] = meta
    check_case(tmp_path / "h.safetensors", assemble(dump(h), bytes(range(data_len))))


# ---- the CLI and memory --------------------------------------------------------------------------------

def test_cli_inspect_on_rejected_files_prints_one_error_line(tmp_path: Path) -> None:
    rng = random.Random(7)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(3, 2)}, good)
    blob, tried = good.read_bytes(), 0
    for i in range(400):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(mutate(blob, rng))
        if reference(path) is not None:
            continue
        tried += 1
        result = CliRunner().invoke(main, ["inspect", str(good), str(path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path}"), result.output
    assert tried > 100, tried


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sets RLIMIT_AS")
def test_huge_claims_allocate_nothing(tmp_path: Path) -> None:
    """Headers claiming terabytes, read under an address-space limit of +512 MiB: nothing may allocate them."""
    files = {
        "truncated": assemble(dump({"a": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}), b""),
        "zero_size_huge_dims": assemble(dump({"a": {"dtype": "F64", "shape": [0, 2**62, 2**62],
                                                    "data_offsets": [0, 0]}}), b""),
        "overflow": assemble(dump({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}), b""),
        "header_claims_past_file": assemble(b"{}", b"", hlen=99_999_999),
    }
    for name, blob in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        import torch
        from mergekit_safe.io.reader import open_checkpoint
        from mergekit_safe.errors import CheckpointError
        vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, resource.RLIM_INFINITY))
        for p in sorted(Path({str(tmp_path)!r}).glob('*.safetensors')):
            try:
                with open_checkpoint(p) as c:
                    print(p.stem, 'accepted', [tuple(c.get(k).shape) for k in c.keys()])
            except CheckpointError as e:
                print(p.stem, 'rejected')
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1])] + sys.path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(out.stdout.splitlines()) == sorted([
        "header_claims_past_file rejected", "overflow rejected", "truncated rejected",
        f"zero_size_huge_dims accepted [(0, {2**62}, {2**62})]"])
