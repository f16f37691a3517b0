"""Peak memory of inspect / ties / slerp / dare on one large tensor: is it set by the chunk or by the tensor?

Each operation runs in a fresh subprocess that first warms up on a tiny pair (imports, thread pools, the
writer), then resets the peak-RSS mark (Linux ``clear_refs``; elsewhere ``ru_maxrss``, which keeps the imports'
peak and so under-reports), runs the operation on a pair of single-tensor checkpoints and reports
how much the peak grew. ``tests/test_memory.py`` uses the same functions on a smaller tensor.

    PYTHONPATH=$PWD python benchmarks/bench_memory.py --numel 256M --dtype float32 --chunk 2M   # 1 GiB tensor
    PYTHONPATH=/path/to/other/tree python benchmarks/bench_memory.py ...                    # compare a tree
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OPS = ("inspect", "ties", "slerp", "dare_ties", "lerp")
PARAMS = {"ties": {"density": 0.5}, "slerp": {"t": 0.3}, "dare_ties": {"density": 0.5}, "lerp": {"alpha": 0.5}}

# The worker: warm up on the tiny pair, then measure the peak RSS growth of one run on the big pair.
_WORKER = """
import inspect, json, resource, sys
op, a, b, out, chunk, tiny_a, tiny_b, tiny_out, params = sys.argv[1:10]
chunk, params = int(chunk), json.loads(params)
from mergekit_safe.merge.engine import merge
from mergekit_safe.merge.inspect import diff_checkpoints
from mergekit_safe.merge.recipe import ModelSpec, Recipe

def run(x, y, o):
    if op == "inspect":
        kw = {"chunk_elems": chunk} if "chunk_elems" in inspect.signature(diff_checkpoints).parameters else {}
        diff_checkpoints(x, y, **kw)
    else:
        recipe = Recipe(op, [ModelSpec(y)], base_model=x, parameters=params)
        merge(recipe, o, chunk_elems=chunk, progress=False, hash_inputs=False)

def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

run(tiny_a, tiny_b, tiny_out)
try:  # Linux: reset the high-water mark, so the peak is this run's and not the imports'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, peak = status_kb("VmRSS"), lambda: status_kb("VmHWM")
except OSError:
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
run(a, b, out)
print(json.dumps({"before_kb": before, "after_kb": peak()}))
"""


def parse_count(text: str) -> int:
    """``"64M"`` -> 67108864 (binary K, M, G suffixes, or a plain count)."""
    t = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def make_pair(folder: Path, numel: int, dtype: str, name: str = "model.layers.0.mlp.up_proj.weight",
              width: int | None = None) -> tuple[Path, Path]:
    """Two single-file checkpoints ``a`` and ``b`` holding one tensor of ``numel`` elements, written in pieces:
    flat, or ``(numel // width, width)`` (a matrix, for methods that work on rows)."""
    import torch

    from mergekit_safe.io.writer import CheckpointWriter, TensorSpec

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for tag in ("a", "b"):
        out = folder / tag
        shape = (numel,) if width is None else (numel // width, width)
        with CheckpointWriter(out, [TensorSpec(name, shape, dt)], 1 << 62) as w:
            for start in range(0, numel, 1 << 22):
                n = min(numel, start + (1 << 22)) - start
                w.write(name, torch.randn(n, generator=gen).to(dt))
            w.finalize()
        paths.append(out)
    return paths[0], paths[1]


def peak_growth(op: str, a: Path, b: Path, tiny: tuple[Path, Path], work: Path, chunk: int,
                pythonpath: str | None = None) -> int:
    """Bytes by which one run of ``op`` on ``a``/``b`` raised the peak RSS of a warmed-up subprocess."""
    # glibc: allocations above 64 KB are mmapped and returned on free, so the peak shows live memory rather
    # than how the heap happened to fragment (the same setting for every tree compared)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    run_dir = Path(tempfile.mkdtemp(prefix=f"{op}-", dir=work))  # a fresh output folder per run
    args = [sys.executable, "-c", _WORKER, op, str(a), str(b), str(run_dir / "out"), str(chunk),
            str(tiny[0]), str(tiny[1]), str(run_dir / "tiny-out"), json.dumps(PARAMS.get(op, {}))]
    # cwd: `python -c` puts the current folder first on sys.path, which would shadow PYTHONPATH's tree
    r = subprocess.run(args, capture_output=True, text=True, env=env, check=False, cwd=run_dir)
    if r.returncode != 0:
        raise RuntimeError(f"{op} worker failed:\n{r.stderr[-3000:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    return (data["after_kb"] - data["before_kb"]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", default="16M", help="elements of the big tensor (K/M/G suffixes)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--chunk", default="2M", help="chunk_elems of the merge and inspect")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    ap.add_argument("--workdir", help="where the checkpoints go [default: a temporary folder]")
    args = ap.parse_args()
    numel, chunk = parse_count(args.numel), parse_count(args.chunk)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        a, b = make_pair(work / "big", numel, args.dtype)
        tiny = make_pair(work / "tiny", 4096, args.dtype)
        import torch

        tensor_bytes = numel * getattr(torch, args.dtype).itemsize
        print(f"one tensor of {numel} {args.dtype} elements ({tensor_bytes / 2**20:.0f} MiB), chunk {chunk}")
        print(f"{'op':<10}{'peak RSS growth (MiB)':>24}{'x tensor':>10}")
        for op in args.ops.split(","):
            grown = peak_growth(op, a, b, tiny, work, chunk)
            print(f"{op:<10}{grown / 2**20:>24.1f}{grown / tensor_bytes:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
