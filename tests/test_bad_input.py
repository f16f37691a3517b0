"""Bad input gets one line naming the file and tensor, a non-zero exit, and no output folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_safe.cli import main
from mergekit_safe.tiny import llama_shapes, save_tiny_pair, write_random_checkpoint


def fails(*args: str | Path, code: int = 1) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def no_leftovers(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return save_tiny_pair(tmp_path / "in", seed=4)


def merge_args(a: Path, b: Path, out: Path) -> list[str | Path]:
    return ["merge", "--method", "lerp", "--alpha", "0.5", a, b, "-o", out, "--no-progress"]


def test_missing_path(pair: tuple[Path, Path], tmp_path: Path) -> None:
    line = fails(*merge_args(pair[0], tmp_path / "nope", tmp_path / "out"))
    assert line == f"Error: {tmp_path / 'nope'}: no such file or directory"
    no_leftovers(tmp_path)


def test_mismatched_shapes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from mergekit_safe.tiny import tiny_llama_config
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(hidden=48)).save_pretrained(tmp_path / "wide")
    line = fails(*merge_args(pair[0], tmp_path / "wide", tmp_path / "out"))
    assert line.startswith(f"Error: {pair[0]}: tensor 'lm_head.weight' has shape [128, 32] but ")
    no_leftovers(tmp_path)


def test_missing_tensor(pair: tuple[Path, Path], tmp_path: Path) -> None:
    state = load_file(pair[1] / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    broken = tmp_path / "broken"
    shutil.copytree(pair[1], broken)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    line = fails(*merge_args(pair[0], broken, tmp_path / "out"))
    assert line == f"Error: {pair[0]}: tensor 'model.layers.1.mlp.up_proj.weight' is not in {broken}"


def test_truncated_safetensors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pair[1], broken)
    f = broken / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    line = fails(*merge_args(pair[0], broken, tmp_path / "out"))
    assert line.startswith(f"Error: {f}: truncated: tensor ")
    assert f"but the file has {size - 100}" in line
    no_leftovers(tmp_path)


def test_corrupt_header(pair: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pair[1], broken)
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    assert fails(*merge_args(pair[0], broken, tmp_path / "out")).startswith(f"Error: {f}: corrupt safetensors header")


def test_nan_warns_or_fails_with_strict(pair: tuple[Path, Path], tmp_path: Path) -> None:
    state = load_file(pair[1] / "model.safetensors")
    state["model.layers.0.self_attn.v_proj.weight"][3, 4] = float("nan")
    nan = tmp_path / "nan"
    shutil.copytree(pair[1], nan)
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    msg = f"{nan / 'model.safetensors'}: tensor 'model.layers.0.self_attn.v_proj.weight' has NaN or Inf values"
    result = CliRunner().invoke(main, [str(a) for a in merge_args(pair[0], nan, tmp_path / "warned")])
    assert result.exit_code == 0 and f"warning: {msg}" in result.output
    assert fails(*merge_args(pair[0], nan, tmp_path / "out"), "--strict") == f"Error: {msg} (--strict)"
    no_leftovers(tmp_path)


def test_output_inside_an_input_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    before = sorted(p.name for p in pair[0].iterdir())
    line = fails(*merge_args(pair[0], pair[1], pair[0] / "merged"))
    assert line == (f"Error: {pair[0] / 'merged'}: output would overwrite or lie inside input {pair[0]}; "
                    "choose another -o")
    assert fails(*merge_args(pair[0], pair[1], pair[1]), "--overwrite").startswith(f"Error: {pair[1]}: output would")
    assert sorted(p.name for p in pair[0].iterdir()) == before


def test_existing_output_needs_overwrite(pair: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert fails(*merge_args(*pair, tmp_path / "out")) == (
        f"Error: {tmp_path / 'out'}: already exists (pass --overwrite to replace it)")
    assert (tmp_path / "out" / "keep.txt").exists()
    # --overwrite replaces only a previous mergekit-safe output: a folder of the user's is never touched
    assert fails(*merge_args(*pair, tmp_path / "out"), "--overwrite") == (
        f"Error: {tmp_path / 'out'}: is not a mergekit-safe output (no mergekit_safe_manifest.json); --overwrite "
        "replaces only a previous mergekit-safe output, choose another -o")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_disk_full_leaves_nothing(pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mergekit_safe.io.writer as writer

    real_open = writer.CheckpointWriter._open_shard

    def full_disk(self: writer.CheckpointWriter, index: int) -> None:
        real_open(self, index)

        class Full:
            def write(self, data: object) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self) -> None:
                pass

        self._file.close()
        self._file = Full()

    monkeypatch.setattr(writer.CheckpointWriter, "_open_shard", full_disk)
    line = fails(*merge_args(*pair, tmp_path / "out"))
    assert line == f"Error: {tmp_path / 'out' / 'model.safetensors'}: disk full while writing tensor 'lm_head.weight'"
    no_leftovers(tmp_path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_is_refused_unless_allowed(tmp_path: Path, zip_format: bool) -> None:
    from transformers import AutoModelForCausalLM

    a, b = save_tiny_pair(tmp_path / "in", seed=5)
    # the layout of older transformers releases: config.json + pytorch_model.bin (legacy: torch < 1.6's format)
    (tmp_path / "pickled").mkdir()
    shutil.copy(b / "config.json", tmp_path / "pickled" / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(b).state_dict(), tmp_path / "pickled" / "pytorch_model.bin",
               _use_new_zipfile_serialization=zip_format)
    line = fails(*merge_args(a, tmp_path / "pickled", tmp_path / "out"))
    assert line == (f"Error: {tmp_path / 'pickled' / 'pytorch_model.bin'}: pickled weights can run code when "
                    "loaded; convert to safetensors, or pass --allow-pickle to load them with "
                    "torch.load(weights_only=True)")
    result = CliRunner().invoke(main, [str(x) for x in merge_args(a, tmp_path / "pickled", tmp_path / "out")]
                                + ["--allow-pickle"])
    assert result.exit_code == 0, result.output
    out, sa, sb = (load_file(p / "model.safetensors") for p in (tmp_path / "out", a, b))
    assert torch.allclose(out["lm_head.weight"], 0.5 * sa["lm_head.weight"] + 0.5 * sb["lm_head.weight"], atol=1e-7)


def test_interrupt_in_process_leaves_no_folder(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from mergekit_safe.merge.engine import merge
    from mergekit_safe.merge.recipe import ModelSpec, Recipe

    seen = []

    def stop(name: str) -> None:
        seen.append(name)
        if len(seen) == 5:
            raise KeyboardInterrupt

    recipe = Recipe("lerp", [ModelSpec(str(pair[1]))], base_model=str(pair[0]), parameters={"alpha": 0.5})
    with pytest.raises(KeyboardInterrupt):
        merge(recipe, tmp_path / "out", progress=False, on_tensor=stop)
    no_leftovers(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_merge_leaves_no_output_folder(tmp_path: Path, sig: signal.Signals) -> None:
    shapes = llama_shapes(hidden=512, layers=6, vocab=8000)  # ~60 MB: long enough to be killed half way
    a = write_random_checkpoint(tmp_path / "a", shapes, 0, hidden=512, max_shard_size=20 * 10**6)
    b = write_random_checkpoint(tmp_path / "b", shapes, 1, hidden=512, max_shard_size=20 * 10**6)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_safe", "merge", "--method", "lerp", str(a), str(b),
                             "-o", str(out), "--max-shard-size", "5MB", "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until it has written at least one shard
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
        if partial and any(f.stat().st_size > 0 for f in partial[0].glob("*.safetensors")):
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGTERM:  # a polite stop also cleans up the hidden partial folder
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert b"Traceback" not in proc.stderr.read()


def test_validate_reports_missing_paths(tmp_path: Path) -> None:
    r = tmp_path / "r.yml"
    r.write_text("merge_method: lerp\nbase_model: ./nope-a\nmodels: [./nope-b]\n")
    assert fails("validate", r) == f"Error: {r}: ./nope-a: no such file or directory; ./nope-b: no such file or directory"


def test_index_pointing_at_a_missing_shard(tmp_path: Path) -> None:
    a, b = save_tiny_pair(tmp_path / "in", seed=6, max_shard_size="40KB")
    index = json.loads((b / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (b / victim).unlink()
    assert fails(*merge_args(a, b, tmp_path / "out")) == (
        f"Error: {b / 'model.safetensors.index.json'}: shard {victim} is missing")


@pytest.mark.parametrize("shard", ["../a/model.safetensors", "/etc/hostname", "sub/model-00001-of-00002.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path: Path, shard: str) -> None:
    a, b = save_tiny_pair(tmp_path / "in", seed=6, max_shard_size="40KB")
    index = b / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    assert fails(*merge_args(a, b, tmp_path / "out")) == (
        f"Error: {index}: shard name {shard!r} is not a plain file name inside {b} "
        "(no folders, '..', absolute paths, drive letters or NUL)")
    no_leftovers(tmp_path)


def test_config_that_is_not_utf8_is_one_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(pair[1], broken)
    (broken / "config.json").write_bytes(b'{"model_type": "\xff"}')
    assert fails(*merge_args(pair[0], broken, tmp_path / "out")) == (
        f"Error: {broken / 'config.json'}: not UTF-8 (invalid start byte at byte 16)")


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergekit_safe.tiny import toy_llama, toy_tokenizer

    d = tmp_path_factory.mktemp("eval_model")
    tok = toy_tokenizer(["I cannot help with that.", "Sure, here is how you do it."], vocab_size=300)
    toy_llama(tok, hidden=32, layers=2, seed=0).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def test_eval_on_a_truncated_checkpoint_is_one_line(eval_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(eval_model, broken)
    f = broken / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 100)
    line = fails("eval", broken, "--limit", "2", "--max-new-tokens", "2")
    assert line.startswith(f"Error: {f}: truncated: tensor ") and line.endswith(f"but the file has {size - 100}")


def test_eval_without_a_tokenizer_is_one_complete_line(eval_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(eval_model / name, bare / name)
    assert fails("eval", bare, "--limit", "2", "--max-new-tokens", "2") == (
        f"Error: {bare}: no tokenizer files (none of tokenizer.json, tokenizer.model, tokenizer_config.json, "
        "vocab.json, vocab.txt, spiece.model, sentencepiece.bpe.model); copy the tokenizer files of the model it "
        "was fine-tuned from into this folder")


@pytest.mark.parametrize("dtype, shape, nbytes", [("F4", [2, 4], 4), ("C64", [1], 8), ("U16", [2], 4)])
def test_readable_but_unmergeable_dtype_is_one_line(tmp_path: Path, dtype: str, shape: list[int], nbytes: int) -> None:
    """safe_open reads these (so the reader does), but the merge math has no meaning for them."""
    import struct

    files = []
    for name in ("a", "b"):
        header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
        files.append(tmp_path / f"{name}.safetensors")
        files[-1].write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(nbytes)))
    want = (f"Error: {files[0]}: tensor 'w' has dtype {dtype}, which mergekit-safe does not merge (it merges F64, "
            "F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)")
    assert fails(*merge_args(files[0], files[1], tmp_path / "out")) == want
    assert fails("inspect", files[0], files[1]) == want
    no_leftovers(tmp_path)
