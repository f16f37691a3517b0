"""Batched greedy generation behind a small backend interface, and safetensors-only model loading.

Judges and metrics see only :class:`Generation` objects, so another backend (vLLM, a server) can be added
by implementing :class:`GenerationBackend` without touching them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekit_safe.errors import EvalError, KernelError
from mergekit_safe.io.dtypes import DTYPES
from mergekit_safe.kernels import resolve_device



@dataclass(frozen=True)
class GenerationConfig:
    """What every backend must honour.

    Attributes:
        max_new_tokens: generation budget per prompt. Default 64.
        batch_size: prompts per forward batch. Default 16.
        system_prompt: optional system turn added through the chat template.
        progress: show a tqdm bar.
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    system_prompt: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise EvalError(f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens}, {self.batch_size}")


@dataclass(frozen=True)
class Generation:
    """One model response.

    Attributes:
        text: decoded new tokens, special tokens removed, cut at the first end-of-sequence token.
        new_tokens: how many tokens were generated (the end-of-sequence token included).
    """

    text: str
    new_tokens: int


@dataclass(frozen=True)
class GenerationRun:
    """All responses of one ``generate`` call, in prompt order, plus the wall time it took."""

    generations: list[Generation]
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(g.new_tokens for g in self.generations)


class GenerationBackend(Protocol):
    """Anything that turns user prompts into greedy responses, in the order given."""

    def generate(self, prompts: Sequence[str], config: GenerationConfig) -> GenerationRun: ...


def chat_text(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The prompt rendered through the tokenizer's own chat template, ready for the assistant turn.

    Without a chat template (base models) the prompt is returned as is, with the system prompt and a blank
    line in front when given.

    Raises:
        EvalError: the template rejects a system turn (e.g. Gemma); the message says so.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raise_exception() surfaces as TemplateError; keep the template's reason
        raise EvalError(f"the model's chat template rejected the messages: {e}") from None


def encode_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of already-formatted prompts.

    A chat template writes its own BOS into the text, so special tokens are added only for raw prompts of
    models without a template (adding them twice shifts every model we tried off-distribution).
    """
    add_special = getattr(tokenizer, "chat_template", None) is None
    return [tokenizer(t, add_special_tokens=add_special)["input_ids"] for t in texts]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into ``(input_ids, attention_mask)``, both ``[batch, max_len]`` int64."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a response: the generation config's EOS ids and the tokenizer's EOS."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if e is None:
            continue
        ids.extend([e] if isinstance(e, int) else list(e))
    return list(dict.fromkeys(ids))


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@dataclass
class HFBackend:
    """Greedy generation with ``transformers``' ``generate``: left padding, length-sorted batches.

    Prompts are sorted by token length before batching (less padding, so fewer wasted FLOPs) and the
    responses are put back in the caller's order. ``generate`` stops a batch once every row has emitted a
    stop token.

    Attributes:
        model: a causal LM already in memory (any device / dtype).
        tokenizer: its tokenizer; a missing pad token falls back to EOS.
    """

    model: Any
    tokenizer: Any

    def generate(self, prompts: Sequence[str], config: GenerationConfig) -> GenerationRun:
        """Generate greedy responses for ``prompts`` (raw user turns) in their order.

        Raises:
            EvalError: the tokenizer has neither a pad nor an EOS token.
        """
        start = time.perf_counter()
        tok = self.tokenizer
        rows = encode_prompts(tok, [chat_text(tok, p, config.system_prompt) for p in prompts])
        gens = greedy_rows(self.model, tok, rows, config.max_new_tokens, config.batch_size, config.progress)
        return GenerationRun(gens, time.perf_counter() - start)


def greedy_rows(model: Any, tokenizer: Any, rows: Sequence[Sequence[int]], max_new_tokens: int,
                batch_size: int, progress: bool = False) -> list[Generation]:
    """Greedy ``generate`` on already-encoded prompts, length-sorted and left-padded; results in row order.

    Raises:
        EvalError: the tokenizer has neither a pad nor an EOS token.
    """
    from tqdm.auto import tqdm

    tok = tokenizer
    stops = stop_token_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else None)
    if pad_id is None:
        raise EvalError("the tokenizer has no pad or EOS token; cannot batch generation")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[Generation | None] = [None] * len(rows)
    device = model_device(model)
    bar = tqdm(total=len(rows), desc="generate", unit="prompt", disable=not progress, leave=False)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, mask = left_pad([rows[i] for i in idx], pad_id)
            seqs = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=stops or None,
                pad_token_id=pad_id,
                # greedy only: drop any sampling defaults the checkpoint ships in generation_config.json
                temperature=None,
                top_p=None,
                top_k=None,
            )
            for i, toks in zip(idx, seqs[:, ids.shape[1]:].tolist()):
                out[i] = decode_response(tok, toks, stops)
            bar.update(len(idx))
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [g for g in out if g is not None]


def decode_response(tokenizer: Any, toks: list[int], stops: Sequence[int]) -> Generation:
    """Cut at the first stop token (rows that ended early are padded after it) and decode."""
    end = next((j for j, t in enumerate(toks) if t in stops), None)
    n = len(toks) if end is None else end + 1
    text = tokenizer.decode(toks[:n] if end is None else toks[:end], skip_special_tokens=True)
    return Generation(text.strip(), n)


# Any one of these makes a folder loadable by AutoTokenizer (fast file, sentencepiece model, BPE/WordPiece vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def _one_line(e: BaseException) -> str:
    """The whole message of a library error on one line (transformers' messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def _check_model_folder(path: Path) -> None:
    """Refuse, before the slow load, what would otherwise surface as a library traceback.

    Raises:
        EvalError: no folder, no safetensors weights, or no tokenizer files.
        CheckpointError: a weight file or index the reader refuses (truncated, corrupt, escaping shard names).
    """
    from mergekit_safe.io.reader import open_checkpoint

    if not path.is_dir():
        raise EvalError(f"{path}: model directory not found")
    if not any(path.glob("*.safetensors")):
        raise EvalError(f"{path}: no *.safetensors weights; only safetensors checkpoints are loaded")
    open_checkpoint(path).close()  # validates every header exactly as safe_open would, without reading data
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise EvalError(f"{path}: no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); copy the tokenizer "
                        "files of the model it was fine-tuned from into this folder")


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory, safetensors weights only.

    The weights go through :mod:`mergekit_safe.io.reader`'s validation first, so a truncated or corrupt file
    is one line naming it rather than a traceback from deep inside ``transformers``.

    Args:
        path: a Hugging Face model directory with ``*.safetensors`` weights and tokenizer files.
        dtype: ``auto`` (the checkpoint's dtype on CUDA, float32 on CPU), float32, bfloat16, float16, float64.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        trust_remote_code: run the checkpoint's own Python code; off unless the user asks.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode and the tokenizer padding on the left.

    Raises:
        EvalError: the directory is missing, has no safetensors weights or tokenizer, the dtype/device is
            unknown, or transformers cannot load it (its whole message, on one line).
        CheckpointError: a weight file is truncated or corrupt, or the index names files outside the folder.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if dtype != "auto" and dtype not in DTYPES:
        raise EvalError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    try:
        device = str(resolve_device(device))  # the package's one device rule
    except KernelError as e:
        raise EvalError(str(e)) from None
    _check_model_folder(path)
    # CPU matmuls in half precision are slow and lossy; auto means float32 there.
    torch_dtype: Any = DTYPES[dtype] if dtype != "auto" else ("auto" if device.startswith("cuda") else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise EvalError(f"{path}: cannot load the tokenizer: {_one_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as e:
        raise EvalError(f"{path}: cannot load the model: {_one_line(e)}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
