"""Read checkpoints lazily: Hugging Face folders, sharded safetensors, single files, PEFT LoRA adapters.

Safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and
memory-mapped copy-on-write, so a tensor is a zero-copy view of the page cache and inputs can never be
modified. :meth:`Checkpoint.release` drops a tensor's pages from this process once the engine is done with
them, which is what keeps peak RSS flat however large the model is. Pickled ``.bin`` weights are refused
unless the caller opts in, and then loaded with ``torch.load(weights_only=True)`` (zip or legacy format).

What is read, and nothing else:

- Headers are validated by :mod:`mergekit_safe.io.header`: a file ``safetensors.safe_open`` refuses is
  refused here with one line naming the file and the problem, and a file it accepts is read identically
  (one stricter case: a tensor name given twice).
- Reads stay in the folder the user named. Every file name in ``model.safetensors.index.json`` (and
  ``pytorch_model.bin.index.json``) must be a plain file name: no ``/`` or ``\\``, no ``..`` or ``.``, no
  absolute path, no drive letter or ``:``, no NUL. The *names* are confined, not the targets: a shard that
  is a symlink is followed, because the Hugging Face cache stores ``snapshots/<rev>/x.safetensors`` as a link
  to ``../../blobs/<sha>``. The other files read are fixed names in the folder (config, adapter files);
  paths written inside them (an adapter's ``base_model_name_or_path``) are never followed.
- A JSON side file that is not UTF-8, not JSON, nested too deeply or of the wrong shape is a one-line
  :class:`~mergekit_safe.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.errors import CheckpointError
from mergekit_safe.io.dtypes import SAFETENSORS_DTYPES  # noqa: F401  (re-exported for older imports)
from mergekit_safe.io.header import read_header


SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A fine-tune with tied embeddings stores no lm_head; these are the names it is tied to.
TIED_ALIASES = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}
_PAGE = mmap.PAGESIZE
# What merge, inspect and repair compute with. The reader itself reads every dtype safe_open reads; inputs
# to those commands are checked against this list (io.adapters.open_input), since torch has no arithmetic for
# packed F4 and would silently drop the imaginary part of C64.
MERGE_DTYPES: tuple[str, ...] = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
                                 "F8_E5M2")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header.

    Attributes:
        name: tensor name.
        shape: tensor shape.
        dtype: torch dtype.
        file: the file holding it.
        start: absolute byte offset of its data in ``file`` (-1 for tensors held in memory).
        nbytes: size of its data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors file's header without reading its data.

    The file is accepted exactly when ``safetensors.safe_open`` accepts it (see
    :mod:`mergekit_safe.io.header` for the rules and the one stricter case, duplicated tensor names).

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: tensor infos in data-offset order and the ``__metadata__`` map.

    Raises:
        CheckpointError: the file is missing, truncated, has trailing bytes, or its header is malformed.
    """
    entries, meta = read_header(path)
    return {e.name: TensorInfo(e.name, e.shape, e.dtype, path, e.start, e.nbytes) for e in entries}, meta


def _checkpoint_step(path: Path) -> tuple[int, str]:
    """Sort key for Trainer folders: ``checkpoint-200`` before ``checkpoint-1000``."""
    m = re.search(r"checkpoint-(\d+)$", path.name)
    return (int(m.group(1)) if m else -1, str(path))


def sort_checkpoints(paths: list[Path]) -> list[Path]:
    """Order Trainer-style ``checkpoint-N`` folders by step N; other names keep their given order after them.

    A list without any ``checkpoint-N`` folder is returned unchanged.
    """
    if not any(re.search(r"checkpoint-\d+$", p.name) for p in paths):
        return list(paths)
    return sorted(paths, key=_checkpoint_step)


class Checkpoint:
    """A lazily read set of named tensors plus the folder's side files.

    Open with :func:`open_checkpoint`. Tensor data is not read until :meth:`get` is called.

    Attributes:
        path: what the user gave (a folder or a file).
        root: the folder holding config and tokenizer files (None for a bare file).
        files: weight files, in index order.
        config: parsed ``config.json`` or None.
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], files: list[Path], root: Path | None) -> None:
        self.path = path
        self.root = root
        self.files = files
        self._tensors = tensors
        self._maps: dict[Path, mmap.mmap] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self.config: dict[str, Any] | None = None
        if root is not None and (root / "config.json").is_file():
            self.config = load_json_file(root / "config.json")
            if not isinstance(self.config, dict):
                raise CheckpointError(f"{root / 'config.json'}: not a JSON object")

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._tensors)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._tensors or self._alias(str(name)) is not None

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> list[str]:
        """Tensor names in storage order."""
        return list(self._tensors)

    @property
    def tied_embeddings(self) -> bool:
        """True when the config ties ``lm_head`` to the input embeddings (the default in transformers)."""
        cfg = self.config or {}
        tie = cfg.get("tie_word_embeddings")
        if tie is None:
            tie = (cfg.get("text_config") or {}).get("tie_word_embeddings", False)
        return bool(tie)

    def _alias(self, name: str) -> str | None:
        if name in self._tensors or not self.tied_embeddings:
            return None
        return next((a for a in TIED_ALIASES.get(name, ()) if a in self._tensors), None)

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and location of a tensor (tied ``lm_head`` resolves to the embeddings).

        Raises:
            CheckpointError: no such tensor.
        """
        real = name if name in self._tensors else self._alias(name)
        if real is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._tensors[real]

    def total_bytes(self) -> int:
        """Bytes of tensor data in this checkpoint."""
        return sum(i.nbytes for i in self._tensors.values())

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                # ACCESS_COPY: a private mapping, so torch gets a writable buffer and the file can never change.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mm
        return mm

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A tensor, or the flat element range ``[start, stop)`` of it, as a zero-copy view of the file.

        The view stays valid until :meth:`close`; do not modify it in place if you read the file again.

        Args:
            name: tensor name.
            start: first flat element (only for ranges).
            stop: one past the last flat element; ``None`` means the whole tensor in its own shape.

        Raises:
            CheckpointError: no such tensor, or the data cannot be read.
        """
        info = self.info(name)
        if info.name in self._memory:
            t = self._memory[info.name]
            return t if stop is None else t.reshape(-1)[start:stop]
        count = info.numel - start if stop is None else stop - start
        if count == 0:
            # reshape, not empty(shape): a zero-size tensor may have dimensions whose strides overflow int64
            empty = torch.empty(0, dtype=info.dtype)
            return empty.reshape(info.shape) if stop is None else empty
        try:
            flat = torch.frombuffer(
                self._map(info.file), dtype=info.dtype, count=count, offset=info.start + start * info.dtype.itemsize
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e})") from None
        return flat.view(info.shape) if stop is None else flat

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's memory (they stay in the OS page cache)."""
        info = self.info(name)
        mm = self._maps.get(info.file)
        if mm is None or info.nbytes == 0:
            return
        lo = info.start - info.start % _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, info.start + info.nbytes - lo)
        except (AttributeError, OSError, ValueError):
            pass  # madvise is an optimisation; platforms without it keep the pages mapped

    def close(self) -> None:
        """Unmap every file. Tensors returned by :meth:`get` must not be used afterwards."""
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a live tensor still points into it; the mapping goes when that tensor does
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` pairs in storage order (zero-copy views)."""
        for name in self._tensors:
            yield name, self.get(name)


def load_json_file(path: Path) -> Any:
    """A JSON side file (index, config, adapter config), every failure as one line naming the file.

    Raises:
        CheckpointError: unreadable, not UTF-8, not JSON, or nested too deep for the parser.
    """
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a number with too many digits
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# A shard name is one plain file name: no folder separators (either OS's), no drive letter or NTFS stream
# (':'), no NUL, not '.' or '..'. Symlinks with such a name are still followed (the Hugging Face cache links
# snapshots/<rev>/x.safetensors to ../../blobs/<sha>): the user chose the folder, and with it its links.
_NOT_PLAIN = re.compile(r"[/\\:\x00]")


def confined_file(listing: Path, name: object) -> Path:
    """The file ``name`` inside the folder of ``listing`` (an index), refusing names that leave it.

    Raises:
        CheckpointError: ``name`` is not a string or not a plain file name.
    """
    if not isinstance(name, str):
        raise CheckpointError(f"{listing}: shard name {str(name)[:80]!r} is not a string")
    if name in ("", ".", "..") or _NOT_PLAIN.search(name):
        raise CheckpointError(f"{listing}: shard name {name[:80]!r} is not a plain file name inside "
                              f"{listing.parent} (no folders, '..', absolute paths, drive letters or NUL)")
    return listing.parent / name


def _load_index(index: Path) -> list[tuple[str, Path]]:
    data = load_json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: malformed index; expected a JSON object with a 'weight_map' object")
    return [(name, confined_file(index, fname)) for name, fname in weight_map.items()]


def _open_safetensors(root: Path | None, files: list[Path], index: Path | None) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        found, _ = read_safetensors_header(file)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {tensors[name].file}")
            tensors[name] = info
    if index is not None:
        for name, file in _load_index(index):
            if name not in tensors or tensors[name].file != file:
                raise CheckpointError(f"{index}: lists tensor {name!r} in {file.name}, which does not hold it")
    return tensors


def _open_pickle(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            # mmap needs the zip format of torch>=1.6; the older tar/pickle stream loads into memory instead
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # torch raises many types for a bad pickle; all mean the same to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{file}: cannot load pickled weights safely ({type(e).__name__}: {first})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CheckpointError(f"{file}: pickled weights are not a state dict (a mapping of names to tensors)")
        out.update({str(name): t for name, t in state.items()})
    return out


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint for lazy reading.

    Accepts a Hugging Face folder (``model.safetensors`` or a sharded ``model.safetensors.index.json``), a
    single ``.safetensors`` file, a llama.cpp ``.gguf`` file (:mod:`mergekit_safe.io.gguf`), or, with
    ``allow_pickle``, ``pytorch_model.bin`` weights (loaded with ``weights_only=True``). A PEFT adapter folder
    opens as its raw adapter tensors; merge it onto its base with :func:`mergekit_safe.io.adapters.open_adapter`.

    Args:
        path: folder or file.
        allow_pickle: accept pickled ``.bin`` weights.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        CheckpointError: missing path, no weights found, pickled weights without ``allow_pickle``, or a corrupt
            file.

    Example:
        >>> ckpt = open_checkpoint("./aligned")  # doctest: +SKIP
        >>> ckpt.get("model.embed_tokens.weight").shape  # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            from mergekit_safe.io.gguf import open_gguf  # the gguf package is an optional extra

            return open_gguf(p)  # type: ignore[return-value]  # same reader interface, dequantized on read
        if p.suffix == ".safetensors":
            return Checkpoint(p, _open_safetensors(None, [p], None), [p], None)
        if p.suffix in (".bin", ".pt", ".pth"):
            return _pickle_checkpoint(p, [p], None, allow_pickle)
        raise CheckpointError(f"{p}: not a .safetensors file or a model folder")
    if (p / SAFE_INDEX).is_file():
        entries = _load_index(p / SAFE_INDEX)
        files = list(dict.fromkeys(f for _, f in entries))
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{p / SAFE_INDEX}: shard {f.name} is missing")
        return Checkpoint(p, _open_safetensors(p, files, p / SAFE_INDEX), files, p)
    if (p / SAFE_SINGLE).is_file():
        return Checkpoint(p, _open_safetensors(p, [p / SAFE_SINGLE], None), [p / SAFE_SINGLE], p)
    if (p / ADAPTER_WEIGHTS).is_file():
        return Checkpoint(p, _open_safetensors(p, [p / ADAPTER_WEIGHTS], None), [p / ADAPTER_WEIGHTS], p)
    if (p / PICKLE_INDEX).is_file():
        files = list(dict.fromkeys(f for _, f in _load_index(p / PICKLE_INDEX)))
        return _pickle_checkpoint(p, files, p, allow_pickle)
    if (p / PICKLE_SINGLE).is_file():
        return _pickle_checkpoint(p, [p / PICKLE_SINGLE], p, allow_pickle)
    loose = sorted(p.glob("*.safetensors"))
    if loose:
        return Checkpoint(p, _open_safetensors(p, loose, None), loose, p)
    raise CheckpointError(f"{p}: no model.safetensors, {SAFE_INDEX} or adapter weights found")


def _pickle_checkpoint(p: Path, files: list[Path], root: Path | None, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise CheckpointError(
            f"{files[0]}: pickled weights can run code when loaded; convert to safetensors, or pass "
            "--allow-pickle to load them with torch.load(weights_only=True)"
        )
    memory = _open_pickle(files)
    infos = {
        n: TensorInfo(n, tuple(t.shape), t.dtype, files[0], -1, t.numel() * t.element_size()) for n, t in memory.items()
    }
    ckpt = Checkpoint(p, infos, files, root)
    ckpt._memory = memory
    return ckpt


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a PEFT adapter folder (it has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()
