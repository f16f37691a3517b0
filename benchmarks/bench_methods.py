"""Peak memory and wall time of every registered merge method on one random Llama-shaped bf16 input set.

    python benchmarks/bench_methods.py --size 200MB --json bench_out/bench_methods.json
    nice -n 15 python benchmarks/bench_methods.py --size 1.7GB --hidden 2048 \\
        --work-dir /tmp/bm --json benchmarks/results/bench_methods_1.7GB.json   # the README's 1.7 GB set

Makes (once, cached under ``--work-dir``) a base and up to three "fine-tunes" of about ``--size`` bytes each
with :func:`mergekit_safe.tiny.write_random_checkpoint` (``--hidden 2048`` gives the shapes of
``bench_merge.py``'s 1.7 GB pair), warms the page cache, then runs the ``copy`` floor (a subprocess that reads
the base and two fine-tunes and writes one input's bytes: ``bench_merge``'s read+write baseline) and
``python -m mergekit_safe merge --method M ...`` once per method through ``bench_merge``'s launcher (peak RSS
is the child's ``ru_maxrss``; the launcher also samples its anonymous and file-backed RSS). Methods with a base
get it first; each gets as many models as it needs, at least two where it allows them (``safemerge``: three).
Prints a table: wall time, peak RSS, its anonymous part, and peak RSS as a fraction of one input.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import COPY_FLOOR, run_once  # noqa: E402

from mergekit_safe.io.writer import parse_size  # noqa: E402
from mergekit_safe.merge.methods import METHODS  # noqa: E402
from mergekit_safe.tiny import layers_for_bytes, llama_shapes, write_random_checkpoint  # noqa: E402

# Parameters a method needs (or that make it do its real work) on the command line.
PARAMS = {
    "ties": ["density=0.5"], "dare_linear": ["density=0.5"], "dare_ties": ["density=0.5"],
    "breadcrumbs": ["density=0.5"], "breadcrumbs_ties": ["density=0.5"], "della": ["density=0.5"],
    "della_linear": ["density=0.5"], "sce": ["select_topk=0.5"], "nearswap": ["t=0.001"],
}
NAMES = ("base", "ft1", "ft2", "ft3")


def models_for(method: str) -> int:
    """How many non-base models the benchmark gives ``method``: two where it allows, more only if it needs."""
    m = METHODS[method]
    hi = m.max_models if m.max_models is not None else 2
    return max(m.min_models, min(hi, 2))


def inputs(work: Path, size: int, hidden: int, vocab: int, count: int) -> list[Path]:
    """The cached base and ``count - 1`` fine-tunes (independent random draws: the math's cost does not depend
    on them)."""
    shapes = llama_shapes(hidden, layers_for_bytes(size, hidden, vocab), vocab)
    out = []
    for i, name in enumerate(NAMES[:count]):
        p = work / f"{size}-{hidden}" / name
        if not p.exists():
            write_random_checkpoint(p, shapes, seed=i, hidden=hidden)
        out.append(p)
    return out


def command(method: str, paths: list[Path], out: Path) -> list[str]:
    """The ``mergekit-safe merge`` command line of ``method`` on the cached inputs."""
    m = METHODS[method]
    base, models = paths[0], paths[1:]
    chosen = models[:models_for(method)]
    positional = ([base] if m.base == "required" else []) + chosen
    params = [a for p in PARAMS.get(method, []) for a in ("-p", p)]
    return [sys.executable, "-m", "mergekit_safe", "merge", "--method", method, *params, *map(str, positional),
            "-o", str(out), "--no-progress"]


def copy_command(paths: list[Path], out: Path) -> list[str]:
    """The read+write floor: read the base and two fine-tunes, write one input's bytes."""
    files = [sorted(str(f) for f in p.glob("*.safetensors")) for p in paths[:3]]
    return [sys.executable, "-c", COPY_FLOOR, str(out / "copy.bin"), *files[0], *files[1], "--", *files[2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="200MB", help="bf16 bytes per input [%(default)s]")
    ap.add_argument("--hidden", type=int, default=1024, help="model width [%(default)s]")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary [%(default)s]")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset [all]")
    ap.add_argument("--no-copy", action="store_true", help="skip the read+write floor")
    ap.add_argument("--work-dir", type=Path, default=Path("bench_out"), help="cache and outputs [%(default)s]")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed [%(default)s]")
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each merged checkpoint (default: deleted once measured; at 1.7 GB a full run's "
                         "outputs fill tens of GB)")
    args = ap.parse_args()
    size = parse_size(args.size)
    methods = args.methods.split(",")
    count = 1 + max([2] + [models_for(m) for m in methods])
    paths = inputs(args.work_dir, size, args.hidden, args.vocab, count)
    one_input = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    for p in paths:  # warm the page cache: every method reads from memory
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    largest = max(math.prod(s) for _, s in llama_shapes(args.hidden, 1, args.vocab)) * 2
    rows = []
    log = args.work_dir / "bench_methods.log"
    print(f"inputs: {one_input / 1e6:.0f} MB each (bf16), largest tensor {largest / 1e6:.0f} MB")
    print(f"{'method':<18}{'wall':>9}{'peak RSS':>11}{'anon':>9}{'RSS/input':>11}")
    jobs = ([] if args.no_copy else [("copy", copy_command(paths, args.work_dir / "methods_out" / "copy"))])
    jobs += [(m, command(m, paths, args.work_dir / "methods_out" / m)) for m in methods]
    for method, cmd in jobs:
        out = args.work_dir / "methods_out" / method
        run = run_once(cmd, out, log, args.timeout)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)  # only this benchmark's own output folder
        rec = {"method": method, "rc": run.rc, "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss,
               "peak_anon_bytes": run.peak_anon, "input_bytes": one_input, "largest_tensor_bytes": largest,
               "models": 2 if method == "copy" else models_for(method), "size": args.size, "hidden": args.hidden,
               "vocab": args.vocab}
        rows.append(rec)
        status = "" if run.rc == 0 else f"  (exit {run.rc}, see {log})"
        print(f"{method:<18}{run.wall_s:>8.1f}s{run.peak_rss / 1e6:>9.0f}MB{run.peak_anon / 1e6:>7.0f}MB"
              f"{run.peak_rss / one_input:>10.0%}{status}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
