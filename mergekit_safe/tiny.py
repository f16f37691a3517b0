"""Checkpoints made on the spot, with no download: tiny real models for tests and the demo, and large
Llama-shaped random checkpoints for the merge benchmark."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mergekit_safe.io.writer import CheckpointWriter, TensorSpec


def tiny_llama_config(vocab_size: int = 128, hidden: int = 32, layers: int = 2, tie: bool = False) -> object:
    """A small ``LlamaConfig`` (hidden 32, 2 layers) that builds in milliseconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )


def save_tiny_pair(
    out: Path, seed: int = 0, *, tie: bool = False, max_shard_size: str | int | None = None,
    dtype: torch.dtype = torch.float32, scale: float = 0.05,
) -> tuple[Path, Path]:
    """Write an "aligned" tiny Llama and a "fine-tuned" copy of it (weights moved by ``scale``-sized noise).

    Both are written with ``save_pretrained`` (safetensors), i.e. exactly the layout users have.

    Returns:
        ``(aligned_dir, finetuned_dir)``.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie=tie)).to(dtype)
    aligned, finetuned = out / "aligned", out / "finetuned"
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(aligned, safe_serialization=True, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(finetuned, safe_serialization=True, **kw)
    return aligned, finetuned


def llama_shapes(hidden: int, layers: int, vocab: int = 32000, inter: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-style model (untied head)."""
    inter = inter or int(8 * hidden / 3 / 64 + 1) * 64
    kv = hidden // 4
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def layers_for_bytes(target_bytes: int, hidden: int = 2048, vocab: int = 32000, itemsize: int = 2) -> int:
    """How many Llama blocks of width ``hidden`` make a checkpoint of about ``target_bytes``."""
    shapes = llama_shapes(hidden, 1, vocab)
    fixed = sum(math.prod(s) for n, s in shapes if "layers" not in n) * itemsize
    per = sum(math.prod(s) for n, s in shapes if "layers" in n) * itemsize
    return max(1, round((target_bytes - fixed) / per))


def write_random_checkpoint(
    out: Path, shapes: list[tuple[str, tuple[int, ...]]], seed: int, *, dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int = 2 * 10**9, hidden: int = 2048,
) -> Path:
    """Stream a random checkpoint (plus a minimal Llama config) to ``out`` without holding it in memory."""
    import json

    g = torch.Generator().manual_seed(seed)
    specs = [TensorSpec(n, s, dtype) for n, s in shapes]
    with CheckpointWriter(out, specs, max_shard_size) as w:
        for spec in specs:
            numel = math.prod(spec.shape)
            step = 1 << 22
            for start in range(0, numel, step):
                n = min(step, numel - start)
                w.write(spec.name, (torch.randn(n, generator=g) * 0.02).to(dtype))
        layers = sum(1 for n, _ in shapes if n.endswith("input_layernorm.weight"))
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
               "num_hidden_layers": layers, "vocab_size": shapes[0][1][0], "torch_dtype": str(dtype)[6:],
               "tie_word_embeddings": False}
        w.write_text("config.json", json.dumps(cfg, indent=2))
        w.finalize()
    return out
