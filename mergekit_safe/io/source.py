"""``TensorSource``: the one typed interface of everything that yields tensors by name.

:class:`mergekit_safe.io.reader.Checkpoint` (a folder, shards, a single file) and
:class:`mergekit_safe.io.adapters.AdapterCheckpoint` (a base with a LoRA adapter applied) both implement it,
so the engine, inspect and repair depend on this Protocol, never on a concrete reader (the way safetensors'
``safe_open`` is one interface over every file).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from mergekit_safe.io.reader import TensorInfo


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors read lazily, plus the side files of the folder they came from.

    Attributes:
        path: what the user gave (a folder or a file); messages name it.
        root: the folder holding ``config.json`` and tokenizer files (None for a bare file).
        files: the weight files read, in index order (hashed for the model card).
        config: parsed ``config.json`` or None.
    """

    path: Path
    root: Path | None
    files: list[Path]
    config: dict[str, Any] | None

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` can be read (a tied ``lm_head`` counts)."""
        ...

    def __len__(self) -> int:
        """How many tensors are stored."""
        ...

    def keys(self) -> list[str]:
        """Tensor names in storage order."""
        ...

    @property
    def tied_embeddings(self) -> bool:
        """True when the config ties ``lm_head`` to the input embeddings."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype and location of tensor ``name``; raises ``CheckpointError`` when there is none."""
        ...

    def total_bytes(self) -> int:
        """Bytes of tensor data."""
        ...

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` in its shape, or the flat element range ``[start, stop)`` of it."""
        ...

    def release(self, name: str) -> None:
        """Drop what reading ``name`` kept in this process's memory (a hint: reading again still works)."""
        ...

    def close(self) -> None:
        """Release every file; tensors returned by :meth:`get` must not be used afterwards."""
        ...

    def __enter__(self) -> TensorSource:
        """The source itself; :meth:`close` runs on exit."""
        ...

    def __exit__(self, *exc: object) -> None:
        """Calls :meth:`close`."""
        ...
