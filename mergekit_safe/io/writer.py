"""Write a Hugging Face checkpoint as a stream: sharded safetensors, index, side files.

A safetensors header only needs names, shapes and dtypes, so every shard's header is known before any data
exists; tensors (or flat pieces of them) are then appended in plan order and never held whole. A standalone
writer stages its folder with :func:`mergekit_safe.io.publish.staged_output` and publishes it on
:meth:`CheckpointWriter.finalize`, so an interrupted run never leaves a folder that looks like a checkpoint;
a writer given ``publish=False`` writes into a folder its caller stages and publishes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mergekit_safe.errors import OutputError
from mergekit_safe.io.publish import staged_output
from mergekit_safe.io.dtypes import DTYPE_TO_SAFETENSORS
from mergekit_safe.io.reader import SAFE_INDEX, SAFE_SINGLE

# Files copied from the chosen input folder: config, generation config, tokenizer and chat template.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one output tensor: all the header needs."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)")
MAX_SIZE = 2**50  # 1 PiB: anything larger is a typo, and int(float) of it would lose its meaning anyway


def parse_size(text: str | int) -> int:
    """Parse a size with a unit (``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"4096B"``) into bytes.

    A unit is required: a bare ``5`` could mean 5 bytes or 5 GB, and guessing wrong writes millions of
    one-tensor shards. An ``int`` is taken as bytes (API callers).

    Raises:
        ValueError: no unit, an unknown unit, a negative, zero, exponent-notation or absurdly large size.

    Example:
        >>> parse_size("1.5KiB")
        1536
    """
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = _SIZE_RE.fullmatch(str(text).strip())
        if m is None:
            hint = " (give a unit: 5GB, 500MB or 5B)" if re.fullmatch(r"\s*\d+\s*", str(text)) else ""
            raise ValueError(f"{text!r} is not a size like 5GB, 500MB or 2GiB{hint}")
        unit = _SIZE_UNITS.get(m.group(2).upper())
        if unit is None:
            raise ValueError(f"{text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
        size = int(Fraction(m.group(1)) * unit)  # exact: a float of a 400-digit number would be inf
    if size < 1:
        raise ValueError(f"{text!r} is not a positive size")
    if size > MAX_SIZE:
        raise ValueError(f"{text!r} is larger than 1 PiB")
    return size


def plan_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a safetensors file holding ``specs`` in order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_TO_SAFETENSORS[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes without a copy when it is contiguous on the CPU."""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous() or flat.device.type != "cpu":
        flat = flat.contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


class _Aborted(Exception):
    """Thrown into the staging context to discard the output."""


class CheckpointWriter:
    """Stream tensors into a new checkpoint folder, then publish it atomically.

    Tensors must arrive in the order of ``specs``, each whole or as consecutive flat pieces (an empty tensor
    as one empty write). With ``publish=True`` (the default) the writer stages ``out_dir`` itself (see
    :func:`~mergekit_safe.io.publish.staged_output`, which ``overwrite`` is passed to); with ``publish=False``
    it writes straight into ``out_dir``, an existing folder the caller publishes.

    Example:
        >>> w = CheckpointWriter(Path("out"), specs, max_shard_size=5 * 10**9)  # doctest: +SKIP
        >>> for spec in specs: w.write(spec.name, tensor_for(spec))  # doctest: +SKIP
        >>> w.finalize(side_files_from=Path("finetuned"))  # doctest: +SKIP
    """

    def __init__(
        self, out_dir: Path, specs: list[TensorSpec], max_shard_size: int, *, overwrite: bool = False,
        publish: bool = True,
        file_name: str = SAFE_SINGLE,
    ) -> None:
        self.out_dir = Path(out_dir)
        self._stage = contextlib.ExitStack()
        if publish:
            self.tmp = self._stage.enter_context(staged_output(self.out_dir, overwrite=overwrite))
        elif self.out_dir.is_dir():
            self.tmp = self.out_dir
        else:
            raise OutputError(f"{self.out_dir}: not an existing folder to write into")
        self.shards = plan_shards(specs, max_shard_size)
        n = len(self.shards)
        self.file_name = file_name  # a PEFT adapter is one adapter_model.safetensors
        self.shard_names = [file_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(spec, i) for i, shard in enumerate(self.shards) for spec in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._file: BinaryIO | None = None
        self._file_index = -1
        self.total_size = sum(s.nbytes for s in specs)

    def _open_shard(self, index: int) -> None:
        self._close_file()
        path = self.tmp / self.shard_names[index]
        self._file = open(path, "wb")
        self._file_index = index
        self._raw_write(safetensors_header(self.shards[index]), "<header>")

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _raw_write(self, data: memoryview | bytes, name: str) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as e:
            where = self.out_dir / self.shard_names[self._file_index]  # the partial folder is removed
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                quota = " (quota exceeded)" if e.errno == errno.EDQUOT else ""
                raise OutputError(f"{where}: disk full{quota} while writing tensor {name!r}") from None
            raise OutputError(f"{where}: cannot write tensor {name!r} ({e.strerror})") from None

    def write(self, name: str, data: torch.Tensor) -> None:
        """Append a whole tensor, or the next flat piece of it, to the output.

        Raises:
            OutputError: out of order, wrong size or dtype, or the disk is full.
        """
        if self._pos >= len(self._queue):
            raise OutputError(f"{self.out_dir}: tensor {name!r} is not in the plan or was already written")
        spec, shard = self._queue[self._pos]
        if name != spec.name:
            raise OutputError(f"{self.out_dir}: expected tensor {spec.name!r} next, got {name!r}")
        if data.dtype != spec.dtype:
            raise OutputError(f"{self.out_dir}: tensor {name!r} is {data.dtype}, planned as {spec.dtype}")
        if shard != self._file_index:
            self._open_shard(shard)
        nbytes = data.numel() * data.element_size()
        if self._written + nbytes > spec.nbytes:
            raise OutputError(f"{self.out_dir}: tensor {name!r} got more data than its shape {list(spec.shape)}")
        if nbytes:
            self._raw_write(tensor_bytes(data), name)
        self._written += nbytes
        if self._written == spec.nbytes:
            self._pos += 1
            self._written = 0

    def write_text(self, relative: str, text: str) -> None:
        """Write a side file (model card, report) into the output folder."""
        (self.tmp / relative).write_text(text)

    def copy_side_files(self, source: Path | None, config_updates: dict[str, Any] | None = None) -> list[str]:
        """Copy config, tokenizer, chat template and generation config from ``source``.

        Returns:
            The names of the files copied.
        """
        copied = []
        if source is None or not source.is_dir():
            return copied
        names = list(SIDE_FILES) + [p.name for p in source.glob("*.jinja") if p.name not in SIDE_FILES]
        for name in names:
            src = source / name
            if src.is_file():
                shutil.copy2(src, self.tmp / name)
                copied.append(name)
        if config_updates and (self.tmp / "config.json").is_file():
            cfg = json.loads((self.tmp / "config.json").read_text())
            cfg.update(config_updates)
            (self.tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return copied

    def finalize(self) -> Path:
        """Check every tensor arrived, write the index, and (self-staged) publish the folder.

        Raises:
            OutputError: tensors are missing, or the output cannot be published.
        """
        if self._pos < len(self._queue):
            spec = self._queue[self._pos][0]
            if self._written:
                raise OutputError(f"{self.out_dir}: tensor {spec.name!r} is incomplete "
                                  f"({self._written} of {spec.nbytes} bytes)")
            raise OutputError(f"{self.out_dir}: tensor {spec.name!r} was never written")
        if not self.shards:
            self._open_shard_empty()
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {s.name: self.shard_names[i] for i, shard in enumerate(self.shards) for s in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        self._stage.close()  # publishes a self-staged folder
        return self.out_dir

    def _open_shard_empty(self) -> None:
        self.shards = [[]]
        self.shard_names = [self.file_name]
        self._file = open(self.tmp / self.file_name, "wb")
        self._file_index = 0
        self._raw_write(safetensors_header([]), "<header>")

    def abort(self) -> None:
        """Remove a self-staged partial output (called on any error or interrupt).

        A ``publish=False`` writer leaves its folder to the caller, whose staging removes it.
        """
        self._close_file()
        self._stage.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
