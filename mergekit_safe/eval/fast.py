"""Fast in-process generation: ``transformers``' continuous batching (paged KV cache) behind the backend API.

``generate_batch`` schedules every prompt at once: finished rows leave the batch and waiting prompts take
their place, prompts are packed without padding, and the KV cache lives in fixed-size pages, so a long answer
does not hold a whole padded batch hostage. It was chosen over a static KV cache + ``torch.compile`` because
it needs no recompilation per prompt length and gives the same greedy tokens (tested on CPU in float32).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.generate import (
    Generation,
    GenerationConfig,
    GenerationRun,
    chat_text,
    decode_response,
    encode_prompts,
    model_device,
    stop_token_ids,
)


@dataclass
class HFFastBackend:
    """Greedy generation with continuous batching (``model.generate_batch``, transformers >= 5).

    Same responses as :class:`~mergekit_safe.eval.generate.HFBackend`: token for token in float32 (the test
    suite checks it on CPU). In bfloat16 the packed, unpadded attention sums in another order than padded
    ``generate``, so a response can leave the plain one at a near-tied greedy step (top-2 logit gap within
    bf16's rounding, ~2^-8 relative); from there on the two texts differ. The bf16 tolerance is therefore on
    judgements, not texts: the same verdicts are expected, a few texts may differ. Measured on CPU, a random
    0.13M-parameter Llama, 16 prompts x 16 tokens in bf16: 16/16 texts identical (``benchmarks/bench_eval.py
    --hidden 64 --layers 2 --vocab 400 --prompts 16 --max-new-tokens 16 --dtype bfloat16 --providers
    batched,fast``); not yet measured on a real model or a GPU.

    ``config.batch_size`` is not used: the scheduler sizes batches from the KV-cache memory.

    Attributes:
        model: a causal LM in memory whose class supports ``generate_batch``.
        tokenizer: its tokenizer.
    """

    model: Any
    tokenizer: Any

    def generate(self, prompts: Sequence[str], config: GenerationConfig) -> GenerationRun:
        """Greedy responses for ``prompts`` (raw user turns) in their order.

        Raises:
            EvalError: the model has no ``generate_batch``, or a request failed inside the scheduler.
        """
        from transformers import GenerationConfig as HFGenerationConfig

        if not hasattr(self.model, "generate_batch"):
            raise EvalError(f"{type(self.model).__name__} has no generate_batch (transformers >= 5 needed); "
                            "use --engine hf")
        tok = self.tokenizer
        stops = stop_token_ids(self.model, tok)
        rows = encode_prompts(tok, [chat_text(tok, p, config.system_prompt) for p in prompts])
        # a fresh config: the checkpoint's sampling defaults (temperature, top_p) must not leak into greedy
        gen_cfg = HFGenerationConfig(max_new_tokens=config.max_new_tokens, do_sample=False, num_beams=1,
                                     eos_token_id=stops or None,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else
                                     (stops[0] if stops else None))
        start = time.perf_counter()
        if not rows:
            return GenerationRun([], 0.0)
        on_cuda = model_device(self.model).type == "cuda"
        results = self.model.generate_batch(
            inputs=rows, generation_config=gen_cfg, progress_bar=config.progress, warmup=on_cuda,
            continuous_batching_config=None if on_cuda else _cpu_cache_config(rows, config.max_new_tokens))
        out = [self._one(tok, r, res, stops) for r, res in zip(rows, results.values())]
        if len(out) != len(rows):
            raise EvalError(f"continuous batching returned {len(out)} of {len(rows)} responses")
        device = model_device(self.model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return GenerationRun(out, time.perf_counter() - start)

    @staticmethod
    def _one(tok: Any, row: list[int], res: Any, stops: Sequence[int]) -> Generation:
        if getattr(res, "error", None) is not None:
            raise EvalError(f"continuous batching failed on a request: {res.error}")
        if list(res.prompt_ids) != list(row):  # results come back keyed by request, in request order
            raise EvalError("continuous batching returned responses out of order")
        return decode_response(tok, list(res.generated_tokens), stops)


def _cpu_cache_config(rows: Sequence[Sequence[int]], max_new_tokens: int, page: int = 64) -> Any:
    """A KV cache sized to the workload: off CUDA, transformers' memory-based sizing allocates far more pages
    than a CPU run needs (test model, loaded 2-core machine: 38 s instead of 8 s), and CUDA graphs do not apply.
    """
    from transformers import ContinuousBatchingConfig

    blocks = sum(-(-(len(r) + max_new_tokens) // page) for r in rows) + 1
    return ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=max(256, *map(len, rows)),
                                    use_cuda_graph=False, use_async_batching=False)
