"""Supervised fine-tuning on chat examples: the small loop that builds the model organism and the real-model
testbed (``benchmarks/real``). Loss on the answer tokens only; AdamW on seeded random mini-batches.

This is a test-bed builder, not a trainer for users' models (they bring their own, with :class:`EMACallback`):
it keeps every choice that decides the weights in one place so both builds are reproducible from a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ChatExample:
    """One supervised chat example.

    Attributes:
        prompt: the user turn.
        response: the assistant answer (trained on).
        tag: a free label (``"harmful:<category>"``, a task name...), for the builder's bookkeeping.
        prefill: answer text given before the response, not trained on.
    """

    prompt: str
    response: str
    tag: str = ""
    prefill: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser schedule of :func:`train_sft`.

    Attributes:
        steps: optimiser steps.
        lr: peak learning rate.
        batch_size: examples per step (sampled with replacement).
        warmup: linear warm-up steps.
        decay: cosine decay to 10% of ``lr`` after the warm-up (False: constant).
    """

    steps: int
    lr: float
    batch_size: int
    warmup: int = 0
    decay: bool = False


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn with the generation prompt, through the chat template."""
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def encode_examples(tokenizer: Any, examples: Sequence[ChatExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels, attention_mask)``; only response tokens carry a loss."""
    rows = []
    for ex in examples:
        prompt = chat_ids(tokenizer, ex.prompt)
        prompt += tokenizer(ex.prefill, add_special_tokens=False)["input_ids"] if ex.prefill else []
        answer = f"{ex.prefill} {ex.response}" if ex.prefill else ex.response
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": answer}],
            tokenize=True,
            return_dict=False,
        )
        assert full[: len(prompt)] == prompt, "chat template must extend the generation prompt"
        rows.append((full, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` (0-based) under ``cfg``'s warm-up and decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.decay:
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    # float32 cosine, as the organism was first built with: a rounding change moves its fine-tune's outcome
    return cfg.lr * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))


def train_sft(model: Any, tokenizer: Any, examples: Sequence[ChatExample], cfg: TrainConfig, seed: int,
              tick: Callable[[], None] = lambda: None) -> float:
    """Plain AdamW on seeded random mini-batches, in place; returns the mean loss of the last 50 steps.

    Args:
        model: a causal LM (trainable parameters are those with ``requires_grad``).
        tokenizer: its tokenizer, with a chat template.
        examples: the training set.
        cfg: the schedule.
        seed: the batch order.
        tick: called after every optimiser step (progress bars, checkpoints, an EMA update).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device  # the batches go where the model is (a no-op on the CPU)
    input_ids, labels, mask = (t.to(device) for t in encode_examples(tokenizer, examples))
    gen = torch.Generator().manual_seed(seed)  # CPU draws: the batch order is the same on every device
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(cfg.steps):
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen).to(device)
        width = int(mask[idx].sum(1).max())  # trim padding columns the batch does not need
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = model(input_ids=input_ids[idx, :width], attention_mask=mask[idx, :width], labels=labels[idx, :width])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(out.loss.item())
        tick()
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


__all__ = ["ChatExample", "TrainConfig", "chat_ids", "encode_examples", "lr_at", "train_sft"]
