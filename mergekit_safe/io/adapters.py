"""PEFT LoRA adapters as checkpoints: ``base + scale * B @ A`` computed lazily, tensor by tensor.

A fine-tune shipped as an adapter is, for merging, just the base with some tensors changed. This module
presents it with the same interface as :class:`~mergekit_safe.io.reader.Checkpoint`, so every merge method
and the repair search take an adapter wherever they take a full checkpoint.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.io.dtypes import dtype_name
from mergekit_safe.io.reader import (
    ADAPTER_CONFIG,
    MERGE_DTYPES,
    Checkpoint,
    TensorInfo,
    is_adapter,
    load_json_file,
    open_checkpoint,
)
from mergekit_safe.io.source import TensorSource
from mergekit_safe.errors import CheckpointError

_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?\.weight$")
_LORA_RE_EMB = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name that ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class AdapterCheckpoint:
    """A base checkpoint with a LoRA adapter applied, read lazily (same interface as ``Checkpoint``).

    Attributes:
        path: the adapter folder.
        base: the base checkpoint.
        adapter: the raw adapter tensors.
        adapter_config: parsed ``adapter_config.json``.
    """

    def __init__(self, adapter_dir: Path, base: Checkpoint) -> None:
        self.path = adapter_dir
        self.base = base
        self.adapter = _mergeable(open_checkpoint(adapter_dir))
        cfg_path = adapter_dir / ADAPTER_CONFIG
        self.adapter_config: dict[str, Any] = _adapter_config(adapter_dir)
        cfg = self.adapter_config
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported; merge them with peft first")
        self.root = base.root
        self.config = base.config
        self.files = base.files + self.adapter.files
        self._pairs: dict[str, dict[str, str]] = {}
        self._replaced: dict[str, str] = {}
        for key in self.adapter.keys():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_RE.match(name) or _LORA_RE_EMB.match(name)
            if m:
                self._pairs.setdefault(m.group("module") + ".weight", {})[m.group("kind")] = key
            else:
                self._replaced[name.replace(".modules_to_save.default", "")] = key
        for target, kinds in self._pairs.items():
            if target not in base:
                raise CheckpointError(f"{adapter_dir}: adapter tensor for {target!r} has no match in base {base.path}; "
                                      "is this adapter for another model?")
            if len(kinds) != 2:
                raise CheckpointError(f"{adapter_dir}: {target!r} has only {sorted(kinds)} (need both A and B)")
        for target, key in self._replaced.items():
            if target not in base:
                raise CheckpointError(f"{adapter_dir}: tensor {key!r} has no match {target!r} in base {base.path}")
        self._cache: tuple[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r} on {self.base!r})"

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def keys(self) -> list[str]:
        return self.base.keys()

    @property
    def tied_embeddings(self) -> bool:
        return self.base.tied_embeddings

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def total_bytes(self) -> int:
        return self.base.total_bytes()

    def lora_targets(self) -> list[str]:
        """Names of the base tensors the adapter changes with a low-rank update."""
        return list(self._pairs)

    def scaling(self, target: str) -> float:
        """``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA) for one target, honouring rank/alpha patterns."""
        cfg = self.adapter_config
        module = target.removesuffix(".weight")
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))

    def delta(self, name: str) -> torch.Tensor | None:
        """The adapter's fp32 update to tensor ``name`` (None when it changes nothing there)."""
        if name in self._replaced:
            return self.adapter.get(self._replaced[name]).float() - self.base.get(name).float()
        kinds = self._pairs.get(name)
        if kinds is None:
            return None
        if "lora_A" in kinds:
            a = self.adapter.get(kinds["lora_A"]).float()
            b = self.adapter.get(kinds["lora_B"]).float()
            d = b @ a
            if self.adapter_config.get("fan_in_fan_out"):
                d = d.T
        else:
            a = self.adapter.get(kinds["lora_embedding_A"]).float()
            b = self.adapter.get(kinds["lora_embedding_B"]).float()
            d = (b @ a).T
        return d * self.scaling(name)

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The merged tensor (or a flat range of it), in the base's dtype."""
        if self._cache is not None and self._cache[0] == name:
            full = self._cache[1]
        else:
            d = self.delta(name)
            if d is None:
                return self.base.get(name, start, stop)
            base = self.base.get(name)
            full = (base.float() + d.view(base.shape)).to(base.dtype)
            self._cache = (name, full)
        return full if stop is None else full.reshape(-1)[start:stop]

    def release(self, name: str) -> None:
        if self._cache is not None and self._cache[0] == name:
            self._cache = None
        self.base.release(name)

    def close(self) -> None:
        self._cache = None
        self.adapter.close()
        self.base.close()

    def __enter__(self) -> AdapterCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mergeable(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself, once every tensor has a dtype the merge math handles (see ``MERGE_DTYPES``).

    Raises:
        CheckpointError: naming the first tensor of another dtype (the checkpoint is closed).
    """
    for name in ckpt.keys():
        info = ckpt.info(name)
        kind = dtype_name(info.dtype)
        if kind not in MERGE_DTYPES:
            ckpt.close()
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {kind}, which mergekit-safe does not "
                                  f"merge (it merges {', '.join(MERGE_DTYPES)})")
    return ckpt


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict; any defect is one line naming the file."""
    cfg = load_json_file(adapter_dir / ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: not a JSON object")
    return cfg


def adapter_key_target(key: str) -> tuple[str, str | None]:
    """The base tensor that a tensor of an adapter file changes, and how.

    Args:
        key: a tensor name in ``adapter_model.safetensors`` (with or without PEFT's ``base_model.model.`` prefix).

    Returns:
        ``(base tensor name, kind)``: kind is ``lora_A``, ``lora_B``, ``lora_embedding_A`` or
        ``lora_embedding_B``, or None for a saved full module (``modules_to_save``) that replaces the tensor.

    Example:
        >>> adapter_key_target("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        ('model.layers.0.self_attn.q_proj.weight', 'lora_B')
    """
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    m = _LORA_RE.match(name) or _LORA_RE_EMB.match(name)
    if m:
        return m.group("module") + ".weight", m.group("kind")
    return name.replace(".modules_to_save.default", ""), None


def open_input(
    path: str | Path, *, base: str | Path | None = None, allow_pickle: bool = False
) -> TensorSource:
    """Open a merge input: a checkpoint, or a LoRA adapter applied to ``base`` (both a :class:`TensorSource`).

    An adapter is applied to the base the caller gives (the recipe's base model, ``--base``). The
    ``base_model_name_or_path`` written inside ``adapter_config.json`` is never followed: reads stay inside
    the paths the user named, and a downloaded adapter cannot point the tool at another folder on the
    machine. The adapter's own files are fixed names inside its folder.

    Raises:
        CheckpointError: an adapter with no base given, a base the adapter does not fit, or a tensor of a
            dtype outside ``MERGE_DTYPES``.
    """
    p = Path(path)
    if not is_adapter(p):
        return _mergeable(open_checkpoint(p, allow_pickle=allow_pickle))
    if base is None or Path(base) == p:
        named = _adapter_config(p).get("base_model_name_or_path")
        raise CheckpointError(f"{p}: a LoRA adapter needs its base model on disk, given explicitly (--base / "
                              f"base_model); adapter_config.json names {str(named)[:200]!r}, but paths written "
                              "inside model files are not followed")
    return AdapterCheckpoint(p, _mergeable(open_checkpoint(base, allow_pickle=allow_pickle)))
