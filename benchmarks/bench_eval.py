"""Eval throughput: a one-prompt-at-a-time ``generate`` loop vs our batched ``generate`` vs continuous batching.

Providers (``--providers``): ``one-by-one`` (the loop people write first), ``batched`` (:class:`HFBackend`,
length-sorted padded batches), ``fast`` (:class:`HFFastBackend`, transformers' continuous batching, ``--engine
hf-fast``). All run the same model on the same prompts (the built-in harmful set) with greedy decoding; the
script reports how many judgements (keyword judge) and responses match the first provider's.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --prompts 64 --batch-size 16 --json out.json
    python benchmarks/bench_eval.py --model ./my-model --device cuda --dtype bfloat16 --batch-size 32
    python benchmarks/bench_eval.py --device cuda --dtype bfloat16 --hidden 1024 --layers 16 --providers batched,fast

Without ``--model`` a random Llama is built from ``--hidden/--layers/--vocab`` with a byte-level BPE tokenizer
trained on the prompts (no download).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch
import transformers

from mergekit_safe.eval import GenerationConfig, HFBackend, get_judge, load_model, load_prompts
from mergekit_safe.eval.fast import HFFastBackend
from mergekit_safe.eval.generate import chat_text, encode_prompts, stop_token_ids
from mergekit_safe.io.dtypes import DTYPES
from mergekit_safe.tiny import toy_llama, toy_tokenizer


def one_by_one(model, tok, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """Baseline: the loop people write first; one unpadded ``generate`` call per prompt."""
    stops = stop_token_ids(model, tok)
    texts, n_new = [], 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for ids in encode_prompts(tok, [chat_text(tok, p) for p in prompts]):
            x = torch.tensor([ids], device=device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                                 temperature=None, top_p=None, top_k=None)
            new = out[0, x.shape[1]:].tolist()
            n_new += len(new)
            end = next((j for j, t in enumerate(new) if t in stops), len(new))
            texts.append(tok.decode(new[:end], skip_special_tokens=True).strip())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return texts, n_new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local model directory (safetensors); default: a random Llama from flags")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary of the toy tokenizer")
    ap.add_argument("--prompts", type=int, default=64, help="number of built-in harmful prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per provider (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--providers", default="one-by-one,batched,fast",
                    help="comma list of one-by-one, batched, fast; the first is the reference")
    ap.add_argument("--json", dest="json_out", help="write results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    all_prompts = load_prompts("builtin", kind="harmful")
    prompts = [p.text for p in all_prompts[: args.prompts]]
    if args.model:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        model_desc = args.model
    else:
        tok = toy_tokenizer([p.text for p in all_prompts] + [p.text for p in load_prompts("builtin", kind="benign")],
                            vocab_size=args.vocab)
        model = toy_llama(tok, hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64),
                          kv_heads=max(1, args.hidden // 128), dtype=DTYPES[args.dtype]).to(args.device)
        model_desc = f"random llama hidden={args.hidden} layers={args.layers} vocab={len(tok)}"
    n_params = sum(p.numel() for p in model.parameters())
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    backends = {"batched": HFBackend(model, tok), "fast": HFFastBackend(model, tok)}
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    unknown = set(names) - {"one-by-one", *backends}
    if unknown or not names:
        ap.error(f"unknown providers {sorted(unknown)}; choose from one-by-one, batched, fast")

    results = {}
    for name in names:
        if name in backends:
            backends[name].generate(prompts[:2], cfg)  # warm-up: allocator, kernels, lazy imports
        times, texts, n_new = [], [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            if name == "one-by-one":
                texts, n_new = one_by_one(model, tok, prompts, args.max_new_tokens)
            else:
                run = backends[name].generate(prompts, cfg)
                texts, n_new = [g.text for g in run.generations], run.new_tokens
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results[name] = {"seconds_median": med, "seconds_min": min(times), "seconds_max": max(times),
                         "prompts_per_s": len(prompts) / med, "new_tokens": n_new, "tokens_per_s": n_new / med,
                         "texts": texts}

    judge = get_judge("keyword")
    ref = names[0]
    j_ref = [v.unsafe for v in judge(prompts, results[ref]["texts"])]
    for name, r in results.items():
        r["judgements_identical"] = [v.unsafe for v in judge(prompts, r["texts"])] == j_ref
        r["texts_identical"] = sum(a == b for a, b in zip(results[ref]["texts"], r["texts"]))
        r["speedup"] = results[ref]["seconds_median"] / r["seconds_median"]

    print(f"model: {model_desc} ({n_params / 1e6:.2f}M params), {args.device} {args.dtype}, "
          f"threads={torch.get_num_threads()}, {len(prompts)} prompts, max_new_tokens={args.max_new_tokens}")
    print(f"{'provider':<12} {'batch':>5} {'median s':>9} {'prompts/s':>10} {'new tok/s':>10} {'speedup':>8} "
          f"{'same text':>9} {'same verdicts':>13}")
    for name, r in results.items():
        bs = 1 if name == "one-by-one" else args.batch_size if name == "batched" else "cb"
        print(f"{name:<12} {bs:>5} {r['seconds_median']:>9.2f} {r['prompts_per_s']:>10.2f} "
              f"{r['tokens_per_s']:>10.1f} {r['speedup']:>7.2f}x {r['texts_identical']:>5}/{len(prompts):<3} "
              f"{r['judgements_identical']!s:>13}")

    if args.json_out:
        out = {
            "op": "eval_generate", "model": model_desc, "params": n_params, "device": args.device,
            "dtype": args.dtype, "threads": torch.get_num_threads(), "prompts": len(prompts),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
            "providers": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in results.items()},
            "reference": ref,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r["judgements_identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
