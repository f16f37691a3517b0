"""Models and checkpoints made on the spot, with no download: the one builder of tiny Llamas (config,
byte-level BPE tokenizer with a chat template, random model) for tests, benchmarks and the demo, and large
Llama-shaped random checkpoints for the merge benchmark.

Weights are random: no claims about behaviour. Seeds are applied inside ``torch.random.fork_rng``, so building
a model never changes the caller's global RNG state. May import ``io`` (and ``errors``) only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mergekit_safe.io.writer import CheckpointWriter, TensorSpec

TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOY_SPECIALS = ["<pad>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def tiny_llama_config(vocab_size: int = 128, hidden: int = 32, layers: int = 2, tie: bool = False, *,
                      heads: int = 4, kv_heads: int = 2, max_positions: int = 64, tokenizer: Any = None) -> Any:
    """The one builder of small ``LlamaConfig`` objects (default: hidden 32, 2 layers; builds in milliseconds).

    Args:
        vocab_size: vocabulary size; ignored when ``tokenizer`` is given. Default 128.
        hidden: hidden size; the MLP is ``2 * hidden`` wide. Default 32.
        layers: transformer blocks. Default 2.
        tie: tie the input embedding and the LM head. Default False.
        heads: attention heads. Default 4.
        kv_heads: key/value heads (grouped-query attention when below ``heads``). Default 2.
        max_positions: ``max_position_embeddings``. Default 64.
        tokenizer: when given, the vocabulary size and the bos/eos/pad ids come from it.

    Returns:
        A ``transformers.LlamaConfig``.

    Example:
        >>> tiny_llama_config(layers=3).num_hidden_layers
        3
    """
    from transformers import LlamaConfig

    ids: dict[str, Any] = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, **ids,
    )


def toy_tokenizer(corpus: Iterable[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus`` (any text round-trips), with a simple chat template.

    Args:
        corpus: training sentences; milliseconds for a few thousand.
        vocab_size: BPE vocabulary size including the 256 byte symbols and specials. Default 400.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with bos ``<s>``, eos ``</s>`` and pad ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TOY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(corpus), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=TOY_SPECIALS[3:])
    tok.chat_template = TOY_CHAT_TEMPLATE
    return tok


def toy_llama(tokenizer: Any, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              seed: int = 0, dtype: torch.dtype = torch.float32, head_std: float = 1.0) -> Any:
    """A random ``LlamaForCausalLM`` in eval mode sized by the flags, vocabulary matching ``tokenizer``.

    ``lm_head`` is re-drawn with std ``head_std``: the default init (std 0.02) gives near-uniform logits, so
    greedy choices would sit on near-ties and flip under rounding; wider logits make them stable.

    Args:
        tokenizer: e.g. from :func:`toy_tokenizer`; sets the vocabulary and the special token ids.
        hidden, layers, heads, kv_heads: the shape (see :func:`tiny_llama_config`).
        seed: seed of the weights. Default 0.
        dtype: parameter dtype. Default float32.
        head_std: std of the re-drawn ``lm_head``. Default 1.0.
    """
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, max_positions=2048,
                            tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, head_std)
    return model.to(dtype).eval()


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

    aligned, finetuned = out / "aligned", out / "finetuned"
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tie=tie)).to(dtype)
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
