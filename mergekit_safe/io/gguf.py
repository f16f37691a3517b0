"""GGUF (llama.cpp) files in and out, with the ``gguf`` package (the optional extra ``gguf``).

In: :class:`GGUFCheckpoint` presents a ``.gguf`` file with the reader interface of
:class:`~mergekit_safe.io.reader.Checkpoint` under Hugging Face tensor names. Each tensor is dequantized when it
is asked for (one tensor in memory at a time), and the rotary row permutation llama.cpp applies to Llama's Q and K
projections is undone. Out: :func:`write_gguf` converts a Hugging Face checkpoint folder into one GGUF file
(F16, BF16 or Q8_0 weights, 1-D tensors in F32 as llama.cpp does), streaming tensor by tensor, with the
architecture, context, head, rope and tokenizer metadata llama.cpp needs. Supported families: Llama (and
Mistral, stored as ``llama``), Qwen2 and Qwen3.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from mergekit_safe.errors import CheckpointError, OutputError
from mergekit_safe.io.reader import TensorInfo, open_checkpoint
from mergekit_safe.io.publish import staged_output

T = TypeVar("T")
GGUF_TYPES = ("F16", "BF16", "Q8_0")


@dataclass(frozen=True)
class Arch:
    """One model family as llama.cpp and transformers name it.

    Attributes:
        gguf: ``general.architecture``.
        model_type: transformers' ``model_type``.
        hf_class: transformers' class, for ``config.json``.
        permute_qk: llama.cpp stores Q/K rows permuted for its rotary layout (Llama only).
    """

    gguf: str
    model_type: str
    hf_class: str
    permute_qk: bool


ARCHS = {
    "llama": Arch("llama", "llama", "LlamaForCausalLM", True),
    "mistral": Arch("llama", "mistral", "MistralForCausalLM", True),
    "qwen2": Arch("qwen2", "qwen2", "Qwen2ForCausalLM", False),
    "qwen3": Arch("qwen3", "qwen3", "Qwen3ForCausalLM", False),
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_BLOCK = {v: k for k, v in _BLOCK.items()}


def _gguf():  # noqa: ANN202 - the module, imported late because it is an optional extra
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF support needs the gguf package: pip install 'mergekit-safe[gguf]'") from None
    return gguf


def gguf_to_hf(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None when unknown)."""
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    return None


def hf_to_gguf(name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (None when unknown)."""
    stem, _, suffix = name.rpartition(".")
    if stem in _HF_GLOBAL:
        return f"{_HF_GLOBAL[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _HF_BLOCK:
        return f"blk.{parts[2]}.{_HF_BLOCK[parts[3]]}.{suffix}"
    return None


def permute_qk(w: torch.Tensor, heads: int, *, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's rotary row order for a Q or K weight ``[heads * head_dim, ...]`` (or back with ``inverse``).

    Hugging Face Llama rotates the two halves of each head; llama.cpp rotates adjacent pairs, so its converter
    interleaves each head's halves: row ``(h, half, i)`` moves to ``(h, i, half)``.
    """
    dim = w.shape[0] // heads // 2
    split = (heads, dim, 2) if inverse else (heads, 2, dim)
    return w.reshape(*split, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


class GGUFCheckpoint:
    """A GGUF file read as a checkpoint with Hugging Face tensor names (same interface as ``Checkpoint``).

    Attributes:
        path: the file.
        root: None (a GGUF file carries its config and tokenizer inside; :attr:`config` is rebuilt from them).
        files: ``[path]``.
        config: a Hugging Face style config dict built from the GGUF metadata.
        arch: the model family.
    """

    def __init__(self, path: Path) -> None:
        gguf = _gguf()
        self.path = path
        self.root = None
        self.files = [path]
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError, IndexError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        arch_name = str(_field(self._reader, "general.architecture", ""))
        found = [a for a in ARCHS.values() if a.gguf == arch_name]
        if not found:
            supported = sorted({a.gguf for a in ARCHS.values()})
            raise CheckpointError(f"{path}: GGUF architecture {arch_name!r} is not supported ({', '.join(supported)})")
        self.arch = found[0]
        self._tensors: dict[str, tuple[TensorInfo, Any]] = {}
        for t in self._reader.tensors:
            hf = gguf_to_hf(t.name)
            if hf is None:
                if t.name == "rope_freqs.weight":
                    continue  # derived from the rope config; transformers recomputes it
                raise CheckpointError(f"{path}: tensor {t.name!r} has no Hugging Face name known to mergekit-safe")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            dtype = _TORCH.get(t.tensor_type.name, torch.float32)  # quantized types dequantize to fp32
            info = TensorInfo(hf, shape, dtype, path, int(t.data_offset), math.prod(shape) * dtype.itemsize)
            self._tensors[hf] = (info, t)
        self.config = self._config()
        self._cache: tuple[str, torch.Tensor] | None = None

    def _config(self) -> dict[str, Any]:
        r, a = self._reader, self.arch.gguf
        heads = int(_field(r, f"{a}.attention.head_count"))
        hidden = int(_field(r, f"{a}.embedding_length"))
        cfg = {
            "architectures": [self.arch.hf_class], "model_type": self.arch.model_type,
            "num_hidden_layers": int(_field(r, f"{a}.block_count")), "hidden_size": hidden,
            "intermediate_size": int(_field(r, f"{a}.feed_forward_length")), "num_attention_heads": heads,
            "num_key_value_heads": int(_field(r, f"{a}.attention.head_count_kv", heads)),
            "max_position_embeddings": int(_field(r, f"{a}.context_length")),
            "rms_norm_eps": float(_field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(_field(r, f"{a}.rope.freq_base", 10000.0)),
            "head_dim": int(_field(r, f"{a}.attention.key_length", hidden // heads)),
            "vocab_size": self._tensors["model.embed_tokens.weight"][0].shape[0],
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        return cfg

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {len(self._tensors)} tensors)"

    def __contains__(self, name: object) -> bool:
        return name in self._tensors or (name == "lm_head.weight" and self.tied_embeddings)

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> list[str]:
        """Hugging Face tensor names, in file order."""
        return list(self._tensors)

    @property
    def tied_embeddings(self) -> bool:
        """True when the file has no ``output.weight`` (llama.cpp then uses the token embeddings)."""
        return bool(self.config["tie_word_embeddings"])

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype a tensor has once dequantized (F16/BF16/F32 keep theirs, quantized types are fp32).

        Raises:
            CheckpointError: no such tensor.
        """
        if name == "lm_head.weight" and name not in self._tensors and self.tied_embeddings:
            name = "model.embed_tokens.weight"
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._tensors[name][0]

    def total_bytes(self) -> int:
        """Bytes of the dequantized tensors."""
        return sum(i.nbytes for i, _ in self._tensors.values())

    def _load(self, info: TensorInfo) -> torch.Tensor:
        t = self._tensors[info.name][1]
        try:
            arr = _gguf().quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name!r} ({e})") from None
        out = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: the file map is read-only
        out = out.reshape(info.shape).to(info.dtype)
        if self.arch.permute_qk and info.name.endswith(("q_proj.weight", "k_proj.weight")):
            key = "num_attention_heads" if "q_proj" in info.name else "num_key_value_heads"
            out = permute_qk(out, int(self.config[key]), inverse=True)
        return out

    def get(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A dequantized tensor (or the flat range ``[start, stop)`` of it); the last one stays cached."""
        info = self.info(name)
        if self._cache is None or self._cache[0] != info.name:
            self._cache = (info.name, self._load(info))
        full = self._cache[1]
        return full if stop is None else full.reshape(-1)[start:stop]

    def release(self, name: str) -> None:
        """Drop the cached dequantized tensor."""
        if self._cache is not None and self._cache[0] == self.info(name).name:
            self._cache = None

    def close(self) -> None:
        """Drop the cache and the file mapping."""
        self._cache = None
        self._tensors.clear()
        self._reader = None

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def open_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Open a ``.gguf`` file for lazy, dequantize-on-read access under Hugging Face tensor names.

    Raises:
        CheckpointError: the gguf package is missing, the file is unreadable, or its architecture or a tensor
            name is not supported.

    Example:
        >>> ckpt = open_gguf("model-Q8_0.gguf")  # doctest: +SKIP
        >>> ckpt.get("model.layers.0.self_attn.q_proj.weight").dtype  # doctest: +SKIP
        torch.float32
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    return GGUFCheckpoint(p)


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise OutputError(f"rope_type {kind!r}: only the default rope is written to GGUF so far")
    return float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _add_hparams(w: Any, cfg: dict[str, Any], name: str, qtype: str, vocab: int) -> None:
    """The hyperparameters llama.cpp reads to build the graph."""
    gguf = _gguf()
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_name(name)
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    # always explicit: readers that miss it fall back to their family's default (transformers' Qwen3: 128)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w: Any, folder: Path, vocab: int) -> str | None:
    """Tokens, types, merges, special ids and chat template from the model folder; a warning if it has none."""
    gguf = _gguf()
    tok: Any = None
    for kind in (gguf.vocab.BpeVocab, gguf.vocab.SentencePieceVocab, gguf.vocab.LlamaHfVocab):
        try:
            tok = kind(folder)
            break
        except (FileNotFoundError, ImportError, ValueError, KeyError, TypeError):
            continue  # gguf's vocab classes signal "not my format" with these; the next one may fit
    if tok is None:
        return f"{folder}: no tokenizer llama.cpp can use (tokenizer.json or tokenizer.model); the GGUF has none"
    tokens, scores, types = [], [], []
    for text, score, ttype in tok.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > vocab:
        raise OutputError(f"{folder}: the tokenizer has {len(tokens)} tokens but the embeddings only {vocab} rows")
    for i in range(len(tokens), vocab):  # rows the embedding has beyond the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(tok.tokenizer_model)
    if tok.tokenizer_model == "gpt2":
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=tok.tokenizer_model == "gpt2", n_vocab=vocab).add_to_gguf(w, quiet=True)
    return None


def _tensor_type(shape: tuple[int, ...], qtype: str) -> Any:
    """llama.cpp's choice: 1-D tensors stay F32; Q8_0 needs rows in whole 32-value blocks, else F16."""
    t = _gguf().GGMLQuantizationType
    if len(shape) < 2:
        return t.F32
    if qtype == "Q8_0" and shape[-1] % 32:
        return t.F16
    return t[qtype]


def _encode(x: torch.Tensor, ttype: Any) -> np.ndarray:
    return _gguf().quants.quantize(np.ascontiguousarray(x.float().numpy()), ttype)


@dataclass(frozen=True)
class _Planned:
    hf: str
    name: str
    shape: tuple[int, ...]
    ttype: Any


def _plan_tensors(ckpt: Any, arch: Arch, qtype: str) -> list[_Planned]:
    plan = []
    for hf in ckpt.keys():
        name = hf_to_gguf(hf)
        if name is None:
            raise OutputError(f"{ckpt.path}: tensor {hf!r} has no llama.cpp name for {arch.gguf}; cannot write GGUF")
        shape = tuple(ckpt.info(hf).shape)
        plan.append(_Planned(hf, name, shape, _tensor_type(shape, qtype)))
    return plan


def _tensor_for(ckpt: Any, p: _Planned, arch: Arch, cfg: dict[str, Any]) -> torch.Tensor:
    t = ckpt.get(p.hf)
    if arch.permute_qk and p.hf.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg["num_attention_heads"] if "q_proj" in p.hf else cfg.get("num_key_value_heads")
        t = permute_qk(t, int(heads or cfg["num_attention_heads"]))
    return t


def write_gguf(folder: str | Path, out_file: str | Path, qtype: str = "F16", *, overwrite: bool = False) -> list[str]:
    """Convert a Hugging Face checkpoint folder into one GGUF file for llama.cpp, tensor by tensor.

    Args:
        folder: a checkpoint folder with ``config.json`` (and, for a usable file, its tokenizer).
        out_file: the ``.gguf`` file; written to a hidden sibling and renamed into place when complete.
        qtype: ``F16``, ``BF16`` or ``Q8_0`` for 2-D weights (1-D tensors are F32; Q8_0 rows not a multiple
            of 32 fall back to F16).
        overwrite: replace an existing file.

    Returns:
        Warnings (a missing tokenizer).

    Raises:
        OutputError: unsupported type, family or rope, a tensor llama.cpp has no name for, or an existing file.
        CheckpointError: the folder is not a checkpoint with a config.

    Example:
        >>> write_gguf("./repaired", "./repaired/model-Q8_0.gguf", "Q8_0")  # doctest: +SKIP
    """
    gguf = _gguf()
    folder, out = Path(folder), Path(out_file)
    if qtype not in GGUF_TYPES:
        raise OutputError(f"--to-gguf {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    with open_checkpoint(folder) as ckpt:
        cfg = ckpt.config
        if cfg is None:
            raise CheckpointError(f"{folder}: no config.json; GGUF needs the model's hyperparameters")
        arch = ARCHS.get(str(cfg.get("model_type")))
        if arch is None:
            raise OutputError(f"{folder}: model_type {cfg.get('model_type')!r} cannot be written to GGUF yet "
                              f"(supported: {', '.join(ARCHS)})")
        plan = _plan_tensors(ckpt, arch, qtype)
        vocab = ckpt.info("model.embed_tokens.weight").shape[0]
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        w = gguf.GGUFWriter(tmp, arch.gguf)
        try:
            _add_hparams(w, cfg, folder.name, qtype, vocab)
            warning = _add_tokenizer(w, folder, vocab)
            for p in plan:
                nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(p.shape, p.ttype))
                w.add_tensor_info(p.name, gguf.quants.quant_shape_to_byte_shape(p.shape, p.ttype), np.dtype(np.uint8),
                                  nbytes, raw_dtype=p.ttype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for p in plan:
                w.write_tensor_data(_encode(_tensor_for(ckpt, p, arch, cfg), p.ttype).view(np.uint8))
                ckpt.release(p.hf)
            w.close()
            os.replace(tmp, out)
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
    return [warning] if warning else []


def gguf_file_name(qtype: str) -> str:
    """Name of the GGUF file a ``--to-gguf`` output folder holds."""
    return f"model-{qtype}.gguf"


def publish_with_gguf(build: Callable[[Path], T], out_dir: str | Path, qtype: str, *, overwrite: bool = False,
                      inputs: Sequence[Path] = ()) -> tuple[T, Path, list[str]]:
    """Build a checkpoint into a staging folder, add its GGUF conversion, and only then publish it at ``out_dir``.

    The one atomic publish (:func:`mergekit_safe.io.publish.staged_output`) owns the folder: the GGUF file is
    part of the same output, recorded in its manifest, and a failed conversion leaves nothing behind.

    Args:
        build: writes a complete checkpoint into the (existing, empty) folder it is given, e.g.
            ``lambda stage: merge_into(recipe, stage)``, and returns a result.
        out_dir: the final folder; it holds the checkpoint and ``model-<qtype>.gguf``.
        qtype: GGUF weight type (see :func:`write_gguf`).
        overwrite: replace a previous mergekit-safe output at ``out_dir`` (nothing else).
        inputs: input paths the output must not be, contain or lie inside.

    Returns:
        ``(build's result, the GGUF file, warnings)``.

    Raises:
        OutputError: ``out_dir`` exists without ``overwrite``, or the conversion fails.
    """
    out = Path(out_dir)
    if qtype not in GGUF_TYPES:
        raise OutputError(f"--to-gguf {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    _gguf()  # fail before the merge, not after it, when the extra is missing
    with staged_output(out, overwrite=overwrite, inputs=inputs) as stage:
        result = build(stage)
        # warnings name the folder the user asked for, not the hidden staging folder
        warnings = [w.replace(str(stage), str(out)) for w in write_gguf(stage, stage / gguf_file_name(qtype), qtype)]
    if hasattr(result, "out_dir"):
        result.out_dir = out
    return result, out / gguf_file_name(qtype), warnings
