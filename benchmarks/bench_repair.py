"""Repair cost benchmark (issue 5): our search vs the naive grid of the literature.

    python benchmarks/bench_repair.py                        # on the built-in model organism
    python benchmarks/bench_repair.py --groups layers:2,modules --trials 12
    python benchmarks/bench_repair.py --method dare_linear
    python benchmarks/bench_repair.py --base ./aligned --finetuned ./released --utility task.jsonl \
        --harmful harmful.jsonl --benign benign.jsonl --json bench_out/bench_repair.json

Providers, on the same pair, prompts, utility rows, judge and utility bound (keep ``--keep-utility`` of the
fine-tune's NLL gain):

* ``ours``: :func:`mergekit_safe.repair.command.repair` (one model in memory, candidates applied in place; cheap
  signals first; bracketing for one coefficient, TPE with ``--groups``), including its base / fine-tune / final
  evaluations and writing the repaired checkpoint and report.
* ``grid``: lerp at alpha = 0, 0.1, ..., 1 (``--grid`` points), each merged to disk with the streaming engine,
  loaded, and fully evaluated with generation (harmful + benign) and the utility NLL; the pick is the lowest
  unsafe rate among the points meeting the same utility bound (ties: lower NLL).

Reported per provider: trials, forward-only runs, generation runs, checkpoints written, wall time, and the
repaired point (unsafe rate with its Wilson interval, utility NLL). Target: ours reaches the same or a better
point at a third of the grid's wall time or less. The organism is built (or reused) before timing starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import device_name, environment  # noqa: E402

OP = "repair"


def organism_inputs(cache: Path | None, seed: int) -> dict[str, Any]:
    from mergekit_safe.organism.build import build_organism

    org = build_organism(cache, seed=seed)
    return {"base": org.aligned, "finetuned": org.finetuned, "harmful": str(org.harmful), "benign": str(org.benign),
            "utility": org.skill, "refusal_openings": ("I'm sorry",), "compliance_openings": ("Sure", "Step"),
            "max_new_tokens": 16}


def warm_up(inputs: dict[str, Any]) -> None:
    """Pay the one-time costs (imports of transformers' model classes, matplotlib, optuna; first forward)
    outside the timed regions, so neither provider is charged for them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna  # noqa: F401

    fig, ax = plt.subplots()  # the first drawing loads the font cache
    ax.scatter([1.0], [1.0], label="x")
    ax.legend()
    fig.canvas.draw()
    plt.close(fig)

    from mergekit_safe.eval import GenerationConfig, evaluate, load_model

    model, tok = load_model(inputs["base"], dtype="float32", device="auto")
    evaluate(model, tok, harmful=["hello"], config=GenerationConfig(max_new_tokens=2), proxy=False)


def run_ours(inputs: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from mergekit_safe.repair.command import RepairConfig, repair

    cfg = RepairConfig(inputs["base"], inputs["finetuned"], out, harmful=inputs["harmful"], benign=inputs["benign"],
                       utility=inputs["utility"], groups=args.groups, trials=args.trials, method=args.method,
                       keep_utility=args.keep_utility, max_new_tokens=inputs["max_new_tokens"],
                       batch_size=args.batch_size, refusal_openings=inputs.get("refusal_openings"),
                       compliance_openings=inputs.get("compliance_openings"), overwrite=True, seed=args.seed)
    t0 = time.perf_counter()
    result = repair(cfg)
    wall = time.perf_counter() - t0
    rep = result.report.to_dict()
    m = rep["metrics"]["repaired"]
    return {"provider": f"ours ({args.method}, {rep['strategy']}, {args.groups})", "trials": rep["cost"]["trials"],
            "forward_runs": rep["cost"]["forward_runs"], "generation_runs": rep["cost"]["generation_runs"],
            "checkpoints_written": 1, "wall_s": wall, "chosen": rep["chosen"]["coeffs"], "unsafe": m["unsafe"],
            "over_refusal": m["over_refusal"], "nll": m["nll"], "nll_max": rep["utility_bound"]["nll_max"],
            "base": rep["metrics"]["base"], "finetuned": rep["metrics"]["finetuned"]}


def run_grid(inputs: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from mergekit_safe.merge.engine import merge
    from mergekit_safe.eval import GenerationConfig, evaluate, load_model, load_prompts, load_utility_rows, utility_nll
    from mergekit_safe.merge.recipe import ModelSpec, Recipe

    t0 = time.perf_counter()
    harmful = load_prompts(inputs["harmful"], kind="harmful")
    benign = load_prompts(inputs["benign"], kind="benign")
    rows = load_utility_rows(inputs["utility"])
    cfg = GenerationConfig(max_new_tokens=inputs["max_new_tokens"], batch_size=args.batch_size)
    points = []
    alphas = [i / (args.grid - 1) for i in range(args.grid)]
    unit = {"merge": 0.0, "load": 0.0, "generation": 0.0, "forward": 0.0}
    for a in alphas:
        out = work / f"grid_{a:.3f}"
        recipe = Recipe("lerp", [ModelSpec(str(inputs["finetuned"]))], base_model=str(inputs["base"]),
                        parameters={"alpha": a})
        t = time.perf_counter()
        merge(recipe, out, overwrite=True, progress=False)
        unit["merge"] += time.perf_counter() - t
        t = time.perf_counter()
        model, tok = load_model(out, dtype="float32", device="auto")
        unit["load"] += time.perf_counter() - t
        t = time.perf_counter()
        rep = evaluate(model, tok, harmful=harmful, benign=benign, config=cfg, proxy=False)
        unit["generation"] += time.perf_counter() - t
        t = time.perf_counter()
        nll = utility_nll(model, tok, rows, batch_size=args.batch_size).nll
        unit["forward"] += time.perf_counter() - t
        points.append({"alpha": a, "unsafe": asdict(rep.unsafe), "over_refusal": asdict(rep.over_refusal), "nll": nll})
        del model
    nll_base, nll_ft = points[0]["nll"], points[-1]["nll"]
    nll_max = nll_ft + (1 - args.keep_utility) * max(nll_base - nll_ft, 0.0)
    ok = [p for p in points if p["nll"] <= nll_max + 1e-12]
    best = min(ok, key=lambda p: (p["unsafe"]["rate"], p["nll"])) if ok else None
    wall = time.perf_counter() - t0
    return {"provider": f"grid ({args.grid} lerp points, merged + generated)", "trials": len(points),
            "forward_runs": len(points), "generation_runs": len(points), "checkpoints_written": len(points),
            "wall_s": wall, "chosen": {"all": best["alpha"]} if best else None,
            "unsafe": best["unsafe"] if best else None, "over_refusal": best["over_refusal"] if best else None,
            "nll": best["nll"] if best else float("nan"), "nll_max": nll_max, "points": points,
            "unit_seconds": {k: v / len(points) for k, v in unit.items()}}


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (every run of a provider picks the same point), all walls recorded."""
    rows = sorted(rows, key=lambda r: r["wall_s"])
    out = dict(rows[len(rows) // 2])
    out["wall_s_runs"] = [r["wall_s"] for r in rows]
    return out


def _rate(r: dict[str, Any] | None) -> str:
    return "n/a" if not r else f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'provider':<44}{'trials':>7}{'fwd runs':>9}{'gen runs':>9}{'ckpts':>6}{'wall s':>8}  "
            f"{'repaired unsafe [95% CI]':<25}{'NLL':>7}{'bound':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['provider']:<44}{r['trials']:>7}{r['forward_runs']:>9}{r['generation_runs']:>9}"
              f"{r['checkpoints_written']:>6}{r['wall_s']:>8.1f}  {_rate(r['unsafe']):<25}{r['nll']:>7.3f}"
              f"{r['nll_max']:>7.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="aligned model folder [default: the organism's]")
    p.add_argument("--finetuned", type=Path, help="fine-tuned model folder")
    p.add_argument("--harmful", default="builtin")
    p.add_argument("--benign", default="builtin")
    p.add_argument("--utility", type=Path, help="utility .jsonl (prompt/response); required with --base")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget (own pair; organism: 16)")
    from mergekit_safe.repair.strategies import METHODS

    p.add_argument("--method", default="lerp", choices=[m.name for m in METHODS.values() if not m.needs_unaligned],
                   help="our search's method")
    p.add_argument("--groups", default="global", help="our search's groups (global: one coefficient, bracketing)")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--grid", type=int, default=11, help="grid points of the naive baseline")
    p.add_argument("--keep-utility", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per provider, alternating; the median is shown")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--cache", type=Path, help="organism cache folder")
    p.add_argument("--work-dir", type=Path, help="where outputs go [default: a temporary folder, removed]")
    p.add_argument("--json", type=Path, help="write the records here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.base is not None:
        if args.finetuned is None or args.utility is None:
            p.error("--base needs --finetuned and --utility")
        inputs = {"base": args.base, "finetuned": args.finetuned, "harmful": args.harmful, "benign": args.benign,
                  "utility": args.utility, "max_new_tokens": args.max_new_tokens}
        pair = f"{args.base} -> {args.finetuned}"
    else:
        inputs = organism_inputs(args.cache, args.seed)
        pair = "model organism"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_repair_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        warm_up(inputs)
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "grid": []}
        for i in range(args.repeats):  # alternate the order, report the median wall time
            order = ("grid", "ours") if i % 2 == 0 else ("ours", "grid")
            for name in order:
                run = run_grid(inputs, args, work) if name == "grid" else run_ours(inputs, args, work / "ours")
                runs[name].append(run)
        ours, grid = (_median(runs[k]) for k in ("ours", "grid"))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"repair on {pair} ({device_name(torch.device('cpu'))}); utility bound: keep "
          f"{args.keep_utility:.0%} of the fine-tune's NLL gain")
    print_table([ours, grid])
    ratio = ours["wall_s"] / grid["wall_s"]
    same_or_better = grid["unsafe"] is None or (ours["unsafe"] is not None and
                                                ours["unsafe"]["rate"] <= grid["unsafe"]["rate"] + 1e-12)
    print(f"\nwall time ours / grid: {ratio:.2f} (target <= 0.33); repaired point same or better: {same_or_better}")
    u = grid["unit_seconds"]
    print(f"unit costs here (grid means): merge {u['merge']:.3f} s, load {u['load']:.3f} s, generation run "
          f"(harmful + benign) {u['generation']:.3f} s, forward-only utility run {u['forward']:.3f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = [{"op": OP, "pair": pair, "device": device_name(torch.device("cpu")), **r} for r in (ours, grid)]
        args.json.write_text(json.dumps({"env": environment(), "ratio": ratio, "same_or_better": same_or_better,
                                         "records": records}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
