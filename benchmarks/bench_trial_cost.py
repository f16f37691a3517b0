"""What one repair trial costs (issue 12, section 1): a weight write against a forward run and a generation run.

    python benchmarks/bench_trial_cost.py                                   # tiny Llama built in-process
    python benchmarks/bench_trial_cost.py --hidden 256 --layers 4 --prompts 8 --tokens 16
    python benchmarks/bench_trial_cost.py --model ./finetuned --base ./aligned --prompts 4 --tokens 8

A repair candidate is written in place into the loaded model (``CandidateSpace.apply``: one ``apply_`` kernel
call over every changed tensor), then measured. Timed, on the same model and device:

* ``apply``: writing one candidate (``base + a * tau`` into every parameter the task vector changes);
* ``forward``: one utility-NLL run (teacher-forced, ``P`` rows whose answers are about ``T`` tokens);
* ``generate``: one greedy generation run, ``P`` prompts x at most ``T`` new tokens (the repair's backend).

The table gives each median and the ratios apply / generate and forward / generate; the JSON goes to
``benchmarks/results/trial_cost-<name>.json`` (or ``--json``). Without ``--base`` the task vector of a ``--model``
folder is seeded noise (the write's cost does not depend on the values). Nothing is written next to the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name, environment

_WORDS = ["how", "do", "I", "bake", "bread", "at", "home", "with", "simple", "tools", "and", "a", "little", "patience", "every", "single", "day", "the", "answer", "depends", "on", "the", "oven", "flour", "water", "salt", "yeast", "time", "and", "heat"]


class _Tensors:
    """A dict of tensors behind the small checkpoint interface ``build_space`` reads (keys, get, path)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        self.tensors, self.path = tensors, path

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _text(i: int, n_words: int) -> str:
    return " ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for k in range(n_words))


def _tiny(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from mergekit_safe.tiny import toy_llama, toy_tokenizer

    tok = toy_tokenizer([_text(i, 24) for i in range(200)], vocab_size=400)
    heads = max(args.hidden // 32, 1)
    model = toy_llama(tok, hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=heads, seed=args.seed)
    return model, tok, f"tiny-h{args.hidden}-l{args.layers}"


def _sources(model: Any, args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """(base, plus) checkpoints for the task vector, plus what to close afterwards."""
    from mergekit_safe.io.reader import open_checkpoint

    if args.model is not None and args.base is not None:
        base, plus = open_checkpoint(args.base), open_checkpoint(args.model)
        return base, plus, [base, plus]
    gen = torch.Generator().manual_seed(args.seed)
    state = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    noisy = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in state.items()}
    return _Tensors(state, "in-memory base"), _Tensors(noisy, "in-memory base + noise"), []


def _median_ms(fn: Callable[[], object], reps: int) -> tuple[float, list[float]]:
    fn()  # warm-up: allocations, lazy init, the first kernel dispatch
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time the three parts of a trial; returns the JSON record."""
    from mergekit_safe.eval import GenerationConfig, UtilityRow, load_model, utility_nll
    from mergekit_safe.eval.generate import HFBackend
    from mergekit_safe.merge.recipe import num_layers
    from mergekit_safe.repair.groups import parse_groups
    from mergekit_safe.repair.space import build_space

    if args.model is not None:
        model, tok = load_model(args.model, dtype="float32", device=args.device)
        name = Path(args.model).name
    else:
        model, tok, name = _tiny(args)
        model = model.to(args.device)
    layers = num_layers(model.config, fallback_names=(n for n, _ in model.named_parameters()))
    base, plus, opened = _sources(model, args)
    try:
        space = build_space(model, base, plus, None, method="lerp", groups=parse_groups(args.groups),
                            num_layers=layers)
    finally:
        for c in opened:
            c.close()
    coeffs = iter([0.25, 0.75] * 10_000)
    prompts = [_text(i, 12) for i in range(args.prompts)]
    rows = [UtilityRow(p, _text(i + 1, args.tokens)) for i, p in enumerate(prompts)]
    config = GenerationConfig(max_new_tokens=args.tokens, batch_size=args.prompts)
    backend = HFBackend(model, tok)
    gen_tokens: list[int] = []

    def generate() -> None:
        gen_tokens.append(backend.generate(prompts, config).new_tokens)

    parts = {
        "apply": lambda: space.apply({g: next(coeffs) for g in space.groups}),
        "forward": lambda: utility_nll(model, tok, rows, batch_size=args.prompts),
        "generate": generate,
    }
    timed = {k: _median_ms(fn, args.reps) for k, fn in parts.items()}
    written = sum(space.targets[n].numel() * space.targets[n].element_size() for n in space.names)
    gen_ms = timed["generate"][0]
    return {
        "op": "trial_cost", "model": name, "device": device_name(torch.device(args.device)),
        "params": sum(p.numel() for p in model.parameters()), "bytes_written_per_apply": written,
        "prompts": args.prompts, "max_new_tokens": args.tokens, "generated_tokens": gen_tokens[-1],
        "threads": torch.get_num_threads(), "reps": args.reps,
        "median_ms": {k: v[0] for k, v in timed.items()}, "times_ms": {k: v[1] for k, v in timed.items()},
        "apply_over_generate": timed["apply"][0] / gen_ms, "forward_over_generate": timed["forward"][0] / gen_ms,
        "environment": environment(),
    }


def table(rec: dict[str, Any]) -> str:
    """The printed table of one record."""
    m = rec["median_ms"]
    head = f"{'model':<28}{'apply ms':>10}{'forward ms':>12}{'generate ms':>13}{'apply/gen':>11}{'fwd/gen':>9}"
    row = (f"{rec['model']:<28}{m['apply']:>10.2f}{m['forward']:>12.1f}{m['generate']:>13.1f}"
           f"{rec['apply_over_generate']:>11.4f}{rec['forward_over_generate']:>9.3f}")
    note = (f"{rec['params'] / 1e6:.1f}M params, {rec['bytes_written_per_apply'] / 2**20:.1f} MiB written per apply, "
            f"P={rec['prompts']} prompts x T={rec['max_new_tokens']} tokens ({rec['generated_tokens']} generated), "
            f"{rec['threads']} threads on {rec['device']}, median of {rec['reps']}")
    return "\n".join([head, "-" * len(head), row, note])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a model folder (read only); default: a tiny Llama in memory")
    p.add_argument("--base", type=Path, help="the base the task vector starts from (with --model)")
    p.add_argument("--hidden", type=int, default=64, help="tiny model width")
    p.add_argument("--layers", type=int, default=2, help="tiny model blocks")
    p.add_argument("--groups", default="global", help="coefficient groups of the candidate")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts (and NLL rows) per run")
    p.add_argument("--tokens", type=int, default=16, help="T: new tokens per prompt (and NLL answer length)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per part (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="where to write the JSON (default benchmarks/results/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.base is not None and args.model is None:
        raise SystemExit("--base needs --model")
    if args.threads:
        torch.set_num_threads(args.threads)  # a script entry point: it may set process state
    torch.manual_seed(args.seed)
    rec = run(args)
    print(table(rec))
    out = args.json or Path(__file__).resolve().parent / "results" / f"trial_cost-{rec['model']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
