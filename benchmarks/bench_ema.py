"""Per-step cost of the online EMA update next to an AdamW optimizer step.

    python benchmarks/bench_ema.py --device cpu --hidden 512 --layers 4 --vocab 8192
    python benchmarks/bench_ema.py --device cuda --params 1e9 --dtype bf16 --json ema.json

The parameters of a Llama-shaped model (attention, gated MLP, norms, embeddings and an untied head) are
built straight as tensors, no model code. Timed per step, median and 20/80% quantiles over ``--steps``:

* ``adamw``: ``optimizer.step()`` with random gradients (``--adamw`` picks the torch implementation).
* ``ParameterEMA.update``: what users get (the dispatch below plus any dtype cast).
* ``foreach_lerp``: ``torch._foreach_lerp_`` (the CPU path; one multi-tensor op).
* ``kernel``: ``mergekit_safe.kernels.foreach_weighted_sum_`` (one Triton launch on CUDA; the per-tensor
  torch reference on CPU).
* ``naive_loop``: ``e.mul_(beta).add_(p, alpha=1 - beta)`` per tensor.

``overhead %`` is a provider's median over AdamW's median. Target: under 5% on GPU, where both are bound by
memory bandwidth and AdamW moves about 4x the EMA's bytes. Bandwidth is the EMA's bytes moved (read EMA,
read parameter, write EMA) over the median time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch

import mergekit_safe
from mergekit_safe import kernels
from mergekit_safe.training.ema import ParameterEMA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llama_shapes(hidden: int, layers: int, vocab: int, intermediate: int | None = None) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama-style model (MHA, gated MLP, untied head)."""
    inter = intermediate or 64 * round(8 * hidden / 3 / 64)
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + per_layer * layers + [(hidden,), (vocab, hidden)]


def layers_for(params: float, hidden: int, vocab: int, intermediate: int | None) -> int:
    """Layer count whose model has about ``params`` parameters (at least 1)."""
    fixed = sum(torch.Size(s).numel() for s in llama_shapes(hidden, 0, vocab, intermediate))
    layer = sum(torch.Size(s).numel() for s in llama_shapes(hidden, 1, vocab, intermediate)) - fixed
    return max(1, round((params - fixed) / layer))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]


def build(args: argparse.Namespace) -> tuple[list[torch.nn.Parameter], list[tuple[int, ...]]]:
    shapes = llama_shapes(args.hidden, args.layers, args.vocab, args.intermediate)
    dtype = DTYPES[args.dtype]
    params = [torch.nn.Parameter(torch.randn(s, device=args.device, dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params, shapes


def providers(params: list[torch.nn.Parameter], args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    beta = 0.999
    ema = ParameterEMA([(f"p{i}", p) for i, p in enumerate(params)], beta=beta, dtype=args.ema_dtype)
    shadow = [e.clone() for e in ema.shadow]
    plain = [p.detach() for p in params]
    mixed = shadow[0].dtype != plain[0].dtype
    pairs = [[e, p] for e, p in zip(shadow, plain)]
    coeffs = [[beta, 1.0 - beta]] * len(shadow)

    def foreach_lerp() -> None:
        # The cast is part of the cost when the EMA's dtype differs from the parameters'.
        src = [p.to(shadow[0].dtype) for p in plain] if mixed else plain
        torch._foreach_lerp_(shadow, src, 1.0 - beta)

    def naive_loop() -> None:
        for e, p in zip(shadow, plain):  # add_ promotes a bf16 parameter into an fp32 EMA without a copy
            e.mul_(beta).add_(p, alpha=1.0 - beta)

    return {
        "ParameterEMA.update": ema.update,
        "foreach_lerp": foreach_lerp,
        "kernel": lambda: kernels.foreach_weighted_sum_(shadow, pairs, coeffs),
        "naive_loop": naive_loop,
    }


def adamw(params: list[torch.nn.Parameter], impl: str) -> torch.optim.Optimizer:
    options = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}
    return torch.optim.AdamW(params, lr=1e-4, **options[impl])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 8/3 * hidden, a multiple of 64")
    parser.add_argument("--params", type=float, default=None, help="about this many parameters (sets --layers)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype")
    parser.add_argument("--ema-dtype", choices=["fp32", "param"], default="fp32")
    parser.add_argument("--adamw", choices=["default", "foreach", "fused", "loop"], default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", nargs="?", const="-", default=None, help="write JSON records to PATH (- = stdout)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    if args.params:
        args.layers = layers_for(args.params, args.hidden, args.vocab, args.intermediate)

    params, shapes = build(args)
    numel = sum(p.numel() for p in params)
    optimizer = adamw(params, args.adamw)
    results = {"adamw": quantiles(time_ms(optimizer.step, args.device, args.steps, args.warmup))}
    for name, fn in providers(params, args).items():
        results[name] = quantiles(time_ms(fn, args.device, args.steps, args.warmup))
    ema_elem = 4 if args.ema_dtype == "fp32" else params[0].element_size()
    ema_bytes = numel * (2 * ema_elem + params[0].element_size())

    backend = kernels.select_backend(params[0])
    header = (
        f"{numel / 1e6:.1f}M params ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}), "
        f"{args.dtype} params, EMA {args.ema_dtype}, {args.device} "
        f"({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"AdamW {args.adamw}, kernel backend {backend}, {args.steps} steps"
    )
    print(header, file=sys.stderr if args.json == "-" else sys.stdout)
    lines = [f"{'provider':<22} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'GB/s':>8} {'overhead %':>11}"]
    adam_ms = results["adamw"][0]
    records = []
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for name, (med, p20, p80) in results.items():
        is_ema = name != "adamw"
        gbs = ema_bytes / med / 1e6 if is_ema else float("nan")
        overhead = 100 * med / adam_ms if is_ema else float("nan")
        lines.append(
            f"{name:<22} {med:>10.3f} {p20:>9.3f} {p80:>9.3f} {gbs:>8.1f} "
            + (f"{overhead:>10.1f}%" if is_ema else f"{'-':>11}")
        )
        records.append(
            {
                "op": "ema_update" if is_ema else "adamw_step",
                "provider": name,
                "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "params": numel},
                "dtype": args.dtype,
                "ema_dtype": args.ema_dtype,
                "device": args.device,
                "adamw_impl": args.adamw,
                "median_ms": med,
                "p20_ms": p20,
                "p80_ms": p80,
                "overhead_pct": None if not is_ema else overhead,
                "torch": torch.__version__,
                "mergekit_safe": mergekit_safe.__version__,
                "timestamp": stamp,
            }
        )
    print("\n".join(lines), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(records, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return records


if __name__ == "__main__":
    main()
