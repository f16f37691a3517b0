"""Kernel benchmarks: achieved GB/s of each merge kernel against torch eager, torch.compile and a copy.

Sizes are the bytes of ONE input tensor (``--sizes 1MB,64MB``); an op's bytes are what it must read and write
at least (N inputs + 1 output for a weighted sum; see BYTES below), the same for every provider, so GB/s
compare directly. On a CPU only the torch providers run (the Triton kernels need a GPU; under
TRITON_INTERPRET=1 they are a correctness tool, not a speed one).

    python benchmarks/bench_kernels.py                        # GPU: 1MB..1GB, bf16, all ops
    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py --json bench.json   # CPU: 1MB,16MB

Targets (GPU): weighted sum N=2, N=8 and apply >= 85% of copy bandwidth at >= 64 MB; N-way EMA >= 1.5x the
unfused torch chain at N=8; DARE and TIES >= 2x plain torch. ``band`` (breadcrumbs' masked combine, N=3 with
base), ``della_keep`` (DELLA's per-element seeded keep, incl. turning the probabilities into thresholds) and
``sce`` (SCE's apply, N=3) count their minimal traffic the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Result, fmt_size, measure, parse_size, print_table, write_json  # noqa: E402

from mergekit_safe.kernels import reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("ws2", "ws8", "ema8", "dare", "ties", "band", "della_keep", "sce", "slerp", "apply")
N_APPLY_TENSORS = 64
EMA_BETA = 0.9


def ema_coeffs(n: int, beta: float = EMA_BETA) -> list[float]:
    """Offline EMA of checkpoints c_0..c_{n-1}: weights beta^(n-1), (1-beta) beta^(n-1-t)."""
    return [beta ** (n - 1)] + [(1 - beta) * beta ** (n - 1 - t) for t in range(1, n)]


def providers(op: str, numel: int, dtype: torch.dtype, device: torch.device, want: set[str]):
    """Yield ``(provider, setup, note)``; each setup builds its inputs and returns the callable to time."""
    from mergekit_safe import kernels as K

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    gpu = device.type == "cuda"
    ours = gpu and "ours" in want

    def copy_setup():
        a = rand(numel)
        out = torch.empty_like(a)
        return lambda: out.copy_(a)

    if op in ("ws2", "ws8", "ema8"):
        n = 2 if op == "ws2" else 8
        coeffs = ema_coeffs(n) if op == "ema8" else [1.0 / n] * n

        def inputs():
            return [rand(numel) for _ in range(n)]

        if ours:
            def s_ours():
                xs, out = inputs(), torch.empty(numel, device=device, dtype=dtype)
                return lambda: K.weighted_sum(xs, coeffs, out=out)
            yield "ours (triton)", s_ours, ""
        if "eager" in want:
            def s_eager():
                xs = inputs()
                return lambda: reference.weighted_sum(xs, coeffs)
            yield "torch eager (unfused)", s_eager, "reference.weighted_sum"
            if op == "ws2":
                def s_lerp():
                    a, b = inputs()
                    return lambda: torch.lerp(a, b, 0.5)
                yield "torch.lerp", s_lerp, "native dtype math"
            if op == "ema8":
                def s_chain():
                    xs = inputs()

                    def chain():
                        acc = xs[0].float()
                        for x in xs[1:]:
                            acc.lerp_(x.float(), 1 - EMA_BETA)
                        return acc.to(dtype)
                    return chain
                yield "torch lerp_ chain", s_chain, "acc.lerp_(c_t, 1-beta) per checkpoint"
        if "compile" in want:
            def s_comp():
                xs, f = inputs(), torch.compile(reference.weighted_sum)
                return lambda: f(xs, coeffs)
            yield "torch.compile", s_comp, ""
        nbytes = (n + 1) * numel * dtype.itemsize
    elif op == "dare":
        if ours:
            def s_ours():
                x, out = rand(numel), torch.empty(numel, device=device, dtype=dtype)
                return lambda: K.dare(x, 0.9, 0, 1, out=out)
            yield "ours (triton)", s_ours, ""
        if "eager" in want:
            def s_eager():
                x = rand(numel)
                return lambda: reference.dare(x, 0.9, 0, 1)
            yield "torch eager", s_eager, "reference.dare"
        if "compile" in want:
            def s_comp():
                x, f = rand(numel), torch.compile(reference.dare)
                return lambda: f(x, 0.9, 0, 1)
            yield "torch.compile", s_comp, ""
        nbytes = 2 * numel * dtype.itemsize
    elif op == "ties":
        if ours:
            def s_ours():
                xs, out = [rand(numel) for _ in range(3)], torch.empty(numel, device=device, dtype=dtype)
                return lambda: K.ties(xs, [1.0, 1.0, 1.0], 0.2, out=out)
            yield "ours (triton)", s_ours, "incl. 3 kthvalue threshold passes"
        if "eager" in want:
            def s_eager():
                xs = [rand(numel) for _ in range(3)]
                return lambda: reference.ties(xs, [1.0, 1.0, 1.0], 0.2)
            yield "torch eager", s_eager, "reference.ties, N=3"
        nbytes = 4 * numel * dtype.itemsize
    elif op in ("band", "della_keep", "sce"):
        yield from _sparsify_providers(op, numel, rand, ours, want)
        nbytes = {"band": 5 * numel * dtype.itemsize,
                  "della_keep": 2 * numel * dtype.itemsize + 8 * numel,  # + the float64 probabilities
                  "sce": 5 * numel * dtype.itemsize + 4 * numel}[op]  # + the fp32 variances
    elif op == "slerp":
        if ours:
            def s_ours():
                a, b, out = rand(numel), rand(numel), torch.empty(numel, device=device, dtype=dtype)
                return lambda: K.slerp(a, b, 0.3, out=out)
            yield "ours (triton)", s_ours, "2 passes: 4 reads + 1 write"
        if "eager" in want:
            def s_eager():
                a, b = rand(numel), rand(numel)
                return lambda: reference.slerp(a, b, 0.3)
            yield "torch eager", s_eager, "reference.slerp"
        nbytes = 3 * numel * dtype.itemsize
    elif op == "apply":
        per = max(1, numel // N_APPLY_TENSORS)

        def model():
            return [rand(per) for _ in range(N_APPLY_TENSORS)]

        if ours:
            def s_ours():
                t, b, d1, d2 = model(), model(), model(), model()
                return lambda: K.apply_(t, b, [[x, y] for x, y in zip(d1, d2)], [[0.5, -0.3]] * N_APPLY_TENSORS)
            yield "ours (triton)", s_ours, f"{N_APPLY_TENSORS} tensors, 1 launch"
        if "eager" in want:
            def s_eager():
                t, b, d1, d2 = model(), model(), model(), model()
                return lambda: reference.apply_(t, b, [[x, y] for x, y in zip(d1, d2)], [[0.5, -0.3]] * N_APPLY_TENSORS)
            yield "torch eager", s_eager, "reference.apply_"

            def s_foreach():
                t, b, d1, d2 = model(), model(), model(), model()

                def f():
                    torch._foreach_copy_(t, b)
                    torch._foreach_add_(t, d1, alpha=0.5)
                    torch._foreach_add_(t, d2, alpha=-0.3)
                return f
            yield "torch._foreach", s_foreach, "copy_ + 2 add_ (one alpha for all)"

            def s_lerp():
                ema, params = model(), model()
                return lambda: torch._foreach_lerp_(ema, params, 1 - EMA_BETA)
            yield "torch._foreach_lerp_", s_lerp, "online EMA: 2 reads + 1 write"
        numel = per * N_APPLY_TENSORS
        nbytes = 4 * numel * dtype.itemsize
    else:
        raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    if "copy" in want:
        yield "copy (ceiling)", copy_setup, "device-to-device copy, 2x bytes of one tensor"
    providers.nbytes = nbytes  # type: ignore[attr-defined]


def _sparsify_providers(op: str, numel: int, rand, ours: bool, want: set[str]):
    """``(provider, setup, note)`` of the sparsifying methods' elementwise kernels: ours and torch eager."""
    from mergekit_safe import kernels as K

    def args():
        base = rand(numel)
        models = [base + 0.01 * rand(numel) for _ in range(3)]
        if op == "band":
            lo, hi = [0.002] * 3, [0.02] * 3
            return (base, models, [1.0, 0.8, 0.6]), {"lo": lo, "hi": hi, "scales": [1.1] * 3, "lam": 0.9}
        if op == "della_keep":
            return (models[0] - base, torch.rand(numel, device=base.device, dtype=torch.float64), 0, 1), {}
        var = torch.stack([(m - base).float() for m in models]).var(0, unbiased=False)
        key = int(var.view(torch.int32).median())
        return (base, models, [0.3, 0.3, 0.4], var, key, 0), {}

    fn = {"band": (K.masked_merge, reference.masked_merge), "della_keep": (K.random_keep, reference.random_keep),
          "sce": (K.sce_merge, reference.sce_merge)}[op]
    if ours:
        def s_ours():
            a, kw = args()
            return lambda: fn[0](*a, **kw)
        yield "ours (triton)", s_ours, "one launch" if op != "della_keep" else "thresholds (torch) + one launch"
    if "eager" in want:
        def s_eager():
            a, kw = args()
            return lambda: fn[1](*a, **kw)
        yield "torch eager", s_eager, f"reference.{fn[1].__name__}"


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="bytes of one input tensor, comma separated (default: GPU "
                   "1MB,16MB,64MB,256MB,1GB; CPU 1MB,16MB)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--ops", default=",".join(OPS), help=f"comma separated from {', '.join(OPS)}")
    p.add_argument("--providers", default=None, help="comma separated from ours,eager,compile,copy (default: all "
                   "on GPU; eager,copy on CPU, where torch.compile spends minutes compiling with a C++ compiler)")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = [parse_size(s) for s in (args.sizes or ("1MB,16MB,64MB,256MB,1GB" if gpu else "1MB,16MB")).split(",")]
    want = set((args.providers or ("ours,eager,compile,copy" if gpu else "eager,copy")).split(","))
    dtype = DTYPES[args.dtype]
    if not gpu:
        print("note: no GPU: timing the torch providers only; the Triton kernels' numbers need a CUDA device.\n")
    results: list[Result] = []
    for op in args.ops.split(","):
        for size in sizes:
            numel = size // dtype.itemsize
            rows = []
            for name, setup, note in providers(op, numel, dtype, device, want):
                rows.append((name, setup, note))
            nbytes = providers.nbytes  # type: ignore[attr-defined]
            for name, setup, note in rows:
                b = nbytes
                if name in ("copy (ceiling)", "torch._foreach_lerp_"):  # these move 2 (copy) or 3 (lerp) tensors
                    b = (2 if name == "copy (ceiling)" else 3) * numel * dtype.itemsize
                results.append(measure(op, name, setup, shape=(numel,), dtype=dtype, device=device, nbytes=b, note=note))
                results[-1].extra["size_per_input"] = fmt_size(size)
                if gpu:
                    torch.cuda.empty_cache()
    print_table(results)
    if args.json:
        write_json(args.json, results, meta={"sizes": [fmt_size(s) for s in sizes], "argv": sys.argv[1:]})
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
