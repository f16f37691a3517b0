"""Whole-checkpoint merge benchmark (issue 2): ``mergekit-safe merge`` vs ``mergekit-yaml`` vs a copy floor.

    python benchmarks/bench_merge.py --sizes 0.85GB,1.7GB --repeats 3 \
        --mergekit-yaml bench_out/mkvenv/bin/mergekit-yaml --json bench_out/bench_merge.json

What it does, per size:

1. Makes (once, cached under ``--work-dir``) a random Llama-shaped bf16 pair "base"/"finetuned" of about that
   many bytes each with :func:`mergekit_safe.tiny.write_random_checkpoint`.
2. Warms the page cache with one full read of both inputs, so every provider reads from memory. Caches are
   not dropped: that needs root and would hit everyone else on a shared machine; warm is also the steady state
   of a merge sweep. The inputs must fit in free RAM for this to hold (the script warns when they may not).
3. Runs the providers as subprocesses, alternating them (and rotating their order) for ``--repeats`` rounds:

   * ``ours``: ``mergekit-safe merge --method lerp --alpha 0.5 BASE FT -o OUT --max-shard-size 2GB --no-progress``
   * ``ours-cuda`` and ``mergekit-cuda`` (on a GPU machine, by ``--providers``): the same two with the math on
     the GPU (``--device cuda`` / ``--cuda``), issue 3's end-to-end GPU merge benchmark.
   * ``mergekit``: ``mergekit-yaml`` on the equivalent linear recipe (weights 0.5/0.5, ``dtype: bfloat16``),
     with shards of the same size and no tokenizer copy; skipped with a note when ``--mergekit-yaml`` is absent.
     Install it in its own venv so its pins cannot touch ours:
     ``python -m venv bench_out/mkvenv && bench_out/mkvenv/bin/pip install torch==2.13.0 && bench_out/mkvenv/bin/pip install mergekit``
   * ``copy``: the floor, a Python subprocess that reads both inputs fully in 16 MiB blocks and writes one
     output of the size of one input (no math, no parsing).

   Wall time is measured around the child (spawn to reap); peak RSS is the child's ``ru_maxrss`` from
   ``os.wait4``, taken in a small launcher process (see ``LAUNCHER`` for why not here). The launcher also
   samples ``/proc/PID/status`` every 20 ms to split the peak into anonymous memory and file-backed (mmap'd
   input) pages, for diagnosis. Before each run the previous output is deleted and
   ``sync`` is called outside the timed region, so one run's dirty pages do not slow the next.
4. Checks equal work: ours against a plain torch lerp of a few tensors read with ``safetensors``, and, when
   mergekit ran, every tensor of ours against mergekit's output, in bf16 ulps.

Prints a table (medians over repeats) and, with ``--json``, writes records keyed by op, provider, size, dtype
and device with versions and a timestamp.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import mergekit_safe
from mergekit_safe.tiny import layers_for_bytes, llama_shapes, write_random_checkpoint
from mergekit_safe.io.writer import parse_size

OP = "merge_lerp"
DTYPE = "bfloat16"
ALPHA = 0.5
SHARD_BYTES = 2 * 10**9  # ours: --max-shard-size 2GB; mergekit counts parameters, so 1B bf16 params
MAX_ULPS = 1  # both compute an exactly-rounded 0.5*a + 0.5*b; one ulp allows a different rounding order

# The copy floor: read every input file fully in big blocks, write as many bytes as one input into one file.
COPY_FLOOR = textwrap.dedent("""
    import sys
    out, a_files, b_files = sys.argv[1], [], []
    cur = a_files
    for arg in sys.argv[2:]:
        if arg == "--":
            cur = b_files
        else:
            cur.append(arg)
    block = 16 << 20
    buf_a, buf_b = bytearray(block), bytearray(block)
    def stream(files, buf):
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    yield n
    with open(out, "wb", buffering=0) as w:
        gb = stream(b_files, buf_b)
        for n in stream(a_files, buf_a):
            next(gb, 0)
            w.write(memoryview(buf_a)[:n])
        for _ in gb:
            pass
""")


@dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes, ru_maxrss
    peak_anon: int  # bytes, sampled RssAnon peak
    peak_file: int  # bytes, sampled RssFile peak
    rc: int
    user_s: float = 0.0  # CPU seconds of the child
    sys_s: float = 0.0


@dataclass
class Pair:
    label: str
    target_bytes: int
    layers: int
    base: Path
    ft: Path
    input_bytes: int  # tensor bytes of one input

    @property
    def files(self) -> tuple[list[Path], list[Path]]:
        return _weight_files(self.base), _weight_files(self.ft)


@dataclass
class Result:
    op: str
    provider: str
    size: str
    dtype: str
    device: str
    input_bytes: int
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def median(self, attr: str) -> float:
        vals = [getattr(r, attr) for r in self.runs if r.rc == 0]
        return statistics.median(vals) if vals else math.nan

    def quantiles(self, attr: str) -> tuple[float, float]:
        vals = sorted(getattr(r, attr) for r in self.runs if r.rc == 0)
        if not vals:
            return math.nan, math.nan
        if len(vals) < 3:
            return vals[0], vals[-1]
        q = statistics.quantiles(vals, n=4, method="inclusive")
        return q[0], q[2]


# --------------------------------------------------------------------------------------------- inputs

def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(wm.values())]
    return [folder / "model.safetensors"]


def make_pair(work: Path, label: str, hidden: int, vocab: int) -> Pair:
    target = parse_size(label)
    layers = layers_for_bytes(target, hidden, vocab)
    shapes = llama_shapes(hidden, layers, vocab)
    nbytes = sum(math.prod(s) for _, s in shapes) * 2
    root = work / "data" / f"llama-h{hidden}-v{vocab}-l{layers}"
    base, ft = root / "base", root / "finetuned"
    for path, seed in ((base, 1), (ft, 2)):
        if (path / "config.json").is_file():  # the writer publishes atomically: present means complete
            continue
        t0 = time.perf_counter()
        print(f"[gen] {path} ({layers} layers, {nbytes / 1e9:.2f} GB bf16)", flush=True)
        write_random_checkpoint(path, shapes, seed, dtype=torch.bfloat16, max_shard_size=SHARD_BYTES, hidden=hidden)
        print(f"[gen] done in {time.perf_counter() - t0:.1f} s", flush=True)
    return Pair(label, target, layers, base, ft, nbytes)


def warm(files: list[Path]) -> float:
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED: no root, touches nobody else's files)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------- providers

def mergekit_recipe(pair: Pair, path: Path) -> Path:
    path.write_text(textwrap.dedent(f"""\
        # mergekit-yaml {path.name} OUT --out-shard-size 1B --no-copy-tokenizer --quiet
        merge_method: linear
        models:
          - model: {pair.base}
            parameters:
              weight: {1 - ALPHA}
          - model: {pair.ft}
            parameters:
              weight: {ALPHA}
        dtype: {DTYPE}
        """))
    return path


def provider_commands(pair: Pair, work: Path, outs: dict[str, Path], mergekit_yaml: Path | None) -> dict[str, list[str]]:
    """The command line of each provider in ``outs`` (provider -> output folder)."""
    a_files, b_files = pair.files
    cmds = {}
    if "ours" in outs:
        cmds["ours"] = [sys.executable, "-m", "mergekit_safe", "merge", "--method", "lerp", "--alpha", str(ALPHA),
                        str(pair.base), str(pair.ft), "-o", str(outs["ours"]), "--max-shard-size", "2GB",
                        "--no-progress"]
    if "ours-cuda" in outs:  # issue 3's end-to-end GPU merge: the same command with the math on the GPU
        cmds["ours-cuda"] = [sys.executable, "-m", "mergekit_safe", "merge", "--method", "lerp", "--alpha",
                             str(ALPHA), str(pair.base), str(pair.ft), "-o", str(outs["ours-cuda"]),
                             "--max-shard-size", "2GB", "--no-progress", "--device", "cuda"]
    for name, extra in (("mergekit", []), ("mergekit-cuda", ["--cuda"])):
        if name in outs and mergekit_yaml is not None:
            recipe = mergekit_recipe(pair, work / f"mergekit-linear-{pair.label}.yml")
            cmds[name] = [str(mergekit_yaml), str(recipe), str(outs[name]), "--out-shard-size",
                          f"{SHARD_BYTES // 2 // 10**9}B", "--no-copy-tokenizer", "--quiet", *extra]
    if "copy" in outs:
        cmds["copy"] = [sys.executable, "-c", COPY_FLOOR, str(outs["copy"] / "copy.bin"), *map(str, a_files), "--",
                        *map(str, b_files)]
    return cmds


# The children are started by this small launcher (python -S, no torch) rather than by the benchmark process:
# Linux carries the spawning process's high-water RSS into the child's ru_maxrss across exec, so a child spawned
# straight from here (torch imported, verification buffers touched) would report at least our own peak. The
# launcher's peak (about 10 MB) is the floor of what it can report instead. It also samples /proc/PID/status
# every 20 ms to split the peak into anonymous and file-backed (mmap'd input) pages.
LAUNCHER = textwrap.dedent("""
    import json, os, sys, threading, time
    result, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    peaks = {}
    stop = threading.Event()
    def sample(pid):
        while not stop.is_set():
            try:
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith(("RssAnon:", "RssFile:", "VmHWM:")):
                            key, val = line.split()[:2]
                            peaks[key] = max(peaks.get(key, 0), int(val) * 1024)
            except (OSError, ValueError):
                pass
            stop.wait(0.02)
    t0 = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    sampler = threading.Thread(target=sample, args=(pid,), daemon=True)
    sampler.start()
    killer = threading.Timer(timeout, os.kill, (pid, 9))
    killer.start()
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    killer.cancel()
    stop.set()
    sampler.join()
    with open(result, "w") as fh:
        json.dump({"wall_s": wall, "rc": os.waitstatus_to_exitcode(status), "peak_rss": ru.ru_maxrss * 1024,
                   "peak_anon": peaks.get("RssAnon:", 0), "peak_file": peaks.get("RssFile:", 0),
                   "hwm_sampled": peaks.get("VmHWM:", 0), "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, fh)
""")


def run_once(cmd: list[str], out: Path, log: Path, timeout: float, cold: list[Path] | None = None) -> Run:
    """Run one provider from a clean output folder; wall time and peak RSS of the child as the launcher saw them."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cmd[1] == "-c":  # the copy floor writes a file into an existing folder
        out.mkdir()
    os.sync()  # flush the previous run's dirty pages outside the timed region
    if cold:
        evict(cold)
    result = log.with_suffix(".run.json")
    result.unlink(missing_ok=True)
    with open(log, "ab") as lf:
        shown = cmd[:1] + ["-c", "<copy floor>"] + cmd[3:] if cmd[1] == "-c" else cmd
        lf.write(("\n$ " + " ".join(shown) + "\n").encode())
        lf.flush()
        subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(result), str(timeout), *cmd], stdout=lf,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True)
    r = json.loads(result.read_text())
    return Run(r["wall_s"], r["peak_rss"], r["peak_anon"], r["peak_file"], r["rc"], r["user_s"], r["sys_s"])


# --------------------------------------------------------------------------------------------- equal work

def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in _weight_files(folder):
        with safe_open(str(f), framework="pt") as so:
            for k in so.keys():
                where[k] = f
    return where


def _ordered_bf16(x: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers ordered like the values (so differences count ulps; +0 == -0)."""
    i = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(max ulp distance, number of differing elements) between two bf16 tensors."""
    d = (_ordered_bf16(a) - _ordered_bf16(b)).abs()
    return int(d.max()) if d.numel() else 0, int((d != 0).sum())


def verify(pair: Pair, ours: Path, mergekit_out: Path | None) -> dict:
    """Ours vs a torch lerp of a few tensors, and vs every tensor of mergekit's output when there is one."""
    from safetensors import safe_open

    report: dict = {"size": pair.label, "max_ulps_allowed": MAX_ULPS}
    ours_at, base_at, ft_at = _tensor_files(ours), _tensor_files(pair.base), _tensor_files(pair.ft)

    def load(where: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as so:
            return so.get_tensor(name)

    last = pair.layers - 1
    picks = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
             f"model.layers.{last}.self_attn.k_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
             "lm_head.weight"]
    ref_rows = []
    for name in picks:
        expect = ((1 - ALPHA) * load(base_at, name).float() + ALPHA * load(ft_at, name).float()).to(torch.bfloat16)
        got = load(ours_at, name)
        ok_shape = got.shape == expect.shape and got.dtype == expect.dtype
        mu, nd = ulp_diff(got, expect) if ok_shape else (-1, -1)
        ref_rows.append({"tensor": name, "max_ulps": mu, "differing": nd, "numel": expect.numel(),
                         "ok": ok_shape and 0 <= mu <= MAX_ULPS})
    report["vs_torch_reference"] = ref_rows
    ok = all(r["ok"] for r in ref_rows)
    if mergekit_out is not None:
        mk_at = _tensor_files(mergekit_out)
        missing = sorted(set(ours_at) ^ set(mk_at))
        worst, differing, numel, bad = 0, 0, 0, []
        for name in ours_at:
            if name not in mk_at:
                continue
            a, b = load(ours_at, name), load(mk_at, name)
            if a.shape != b.shape or a.dtype != b.dtype:
                bad.append(f"{name}: ours {list(a.shape)} {a.dtype}, mergekit {list(b.shape)} {b.dtype}")
                continue
            mu, nd = ulp_diff(a, b)
            worst, differing, numel = max(worst, mu), differing + nd, numel + a.numel()
        report["vs_mergekit"] = {"tensors": len(ours_at), "key_mismatch": missing, "shape_or_dtype_mismatch": bad,
                                 "max_ulps": worst, "differing": differing, "numel": numel,
                                 "ok": not missing and not bad and worst <= MAX_ULPS}
        ok = ok and report["vs_mergekit"]["ok"]
    report["ok"] = ok
    return report


# --------------------------------------------------------------------------------------------- report

def _versions(mergekit_yaml: Path | None) -> dict[str, str]:
    import safetensors
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__,
         "transformers": transformers.__version__, "mergekit_safe": mergekit_safe.__version__,
         "platform": platform.platform(), "cpus": str(os.cpu_count())}
    if mergekit_yaml is not None:
        py = mergekit_yaml.parent / "python"
        try:
            v["mergekit"] = subprocess.run(
                [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"],
                capture_output=True, text=True, timeout=60, check=True).stdout.strip().replace(" ", " (torch ") + ")"
        except (OSError, subprocess.SubprocessError):
            v["mergekit"] = "unknown"
    return v


def _gb(x: float) -> str:
    return "-" if math.isnan(x) else f"{x / 1e9:.2f} GB"


def _ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x"


def table(results: list[Result]) -> str:
    head = ["provider", "size", "input", "wall median", "wall q25-q75", "cpu median", "peak RSS", "RSS/input",
            "anon pk", "file pk", "x mergekit", "x copy", "runs"]
    by = {(r.provider, r.size): r for r in results}
    rows = []
    for r in results:
        w, rss = r.median("wall_s"), r.median("peak_rss")
        q1, q3 = r.quantiles("wall_s")
        mk, cp = by.get(("mergekit", r.size)), by.get(("copy", r.size))
        n_ok = sum(x.rc == 0 for x in r.runs)
        cpu = statistics.median([x.user_s + x.sys_s for x in r.runs if x.rc == 0] or [math.nan])
        rows.append([r.provider, r.size, _gb(r.input_bytes), f"{w:.2f} s", f"{q1:.2f}-{q3:.2f}", f"{cpu:.2f} s", _gb(rss),
                     f"{rss / r.input_bytes:.1%}" if not math.isnan(rss) else "-", _gb(r.median("peak_anon")),
                     _gb(r.median("peak_file")), _ratio(w, mk.median("wall_s")) if mk else "-",
                     _ratio(w, cp.median("wall_s")) if cp else "-", f"{n_ok}/{len(r.runs)}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def targets(results: list[Result]) -> list[dict]:
    """Issue 2's targets for ``ours``: wall <= 0.35x mergekit and <= 1.5x copy; RSS < 25% of one input, flat."""
    by = {(r.provider, r.size): r for r in results}
    ours = [r for r in results if r.provider == "ours"]
    checks = []
    for r in ours:
        w = r.median("wall_s")
        if (mk := by.get(("mergekit", r.size))) is not None:
            ratio = w / mk.median("wall_s")
            checks.append({"size": r.size, "target": "wall <= 0.35x mergekit", "value": round(ratio, 3),
                           "met": ratio <= 0.35})
        if (cp := by.get(("copy", r.size))) is not None:
            ratio = w / cp.median("wall_s")
            checks.append({"size": r.size, "target": "wall <= 1.5x copy floor", "value": round(ratio, 3),
                           "met": ratio <= 1.5})
        frac = r.median("peak_rss") / r.input_bytes
        checks.append({"size": r.size, "target": "peak RSS < 25% of one input", "value": round(frac, 3),
                       "met": frac < 0.25})
    if len(ours) >= 2:
        lo, hi = min(ours, key=lambda r: r.input_bytes), max(ours, key=lambda r: r.input_bytes)
        a, b = lo.median("peak_rss"), hi.median("peak_rss")
        # flat: the larger model's peak within 10% (or 64 MB) of the smaller's, while the input grew
        growth = b - a
        checks.append({"size": f"{lo.size}->{hi.size}", "target": "peak RSS flat (growth <= max(10%, 64 MB))",
                       "value": f"{growth / 1e6:+.0f} MB ({b / a - 1:+.1%}) for input x{hi.input_bytes / lo.input_bytes:.2f}",
                       "met": growth <= max(0.10 * a, 64e6)})
    return checks


def write_json(path: Path, results: list[Result], meta: dict, started: str) -> None:
    """JSON keyed by op, provider, size, dtype and device, through benchmarks/harness.py when it is importable.

    Times go in as milliseconds (the harness's unit); peak RSS, CPU time, every run and the ratios go in
    ``extra``.
    """
    rows = []
    by = {(r.provider, r.size): r for r in results}
    for r in results:
        ok = [x for x in r.runs if x.rc == 0]
        walls = sorted(x.wall_s * 1e3 for x in ok) or [math.nan]
        q = statistics.quantiles(walls, n=10, method="inclusive") if len(walls) > 1 else [walls[0]] * 9
        med = statistics.median(walls)
        moved = 3 * r.input_bytes
        extra = {
            "input_bytes": r.input_bytes,
            "peak_rss_bytes": r.median("peak_rss"), "peak_anon_bytes": r.median("peak_anon"),
            "peak_file_bytes": r.median("peak_file"), "peak_rss_fraction_of_input": r.median("peak_rss") / r.input_bytes,
            "cpu_s": statistics.median([x.user_s + x.sys_s for x in ok] or [math.nan]),
            "x_mergekit": med / by[("mergekit", r.size)].median("wall_s") / 1e3 if ("mergekit", r.size) in by else None,
            "x_copy": med / by[("copy", r.size)].median("wall_s") / 1e3 if ("copy", r.size) in by else None,
            "runs": [asdict(x) for x in r.runs],
        }
        rows.append(dict(op=r.op, provider=r.provider, shape=r.size, dtype=r.dtype, device=r.device, bytes=moved,
                         median_ms=med, p20_ms=q[1], p80_ms=q[7], gbps=moved / (med * 1e-3) / 1e9, note=r.note,
                         extra=extra))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import harness  # benchmarks/harness.py (on sys.path when this file is run as a script)
    except ImportError:
        harness = None
    if harness is not None and hasattr(harness, "write_json") and hasattr(harness, "Result"):
        harness.write_json(path, [harness.Result(**row) for row in rows], {"started": started, **meta})
        return
    nested: dict = {}
    for row in rows:
        nested.setdefault(row["op"], {}).setdefault(row["provider"], {}).setdefault(row["shape"], {}).setdefault(
            row["dtype"], {})[row["device"]] = {k: v for k, v in row.items()
                                                 if k not in ("op", "provider", "shape", "dtype", "device")}
    env = {"timestamp": started, "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    path.write_text(json.dumps({"environment": env, "meta": meta, "results": nested}, indent=1, default=str))


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.85GB,1.7GB", help="bf16 bytes per input, comma-separated [%(default)s]")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per size [%(default)s]")
    ap.add_argument("--work-dir", type=Path, default=Path("bench_out"), help="cache and outputs [%(default)s]")
    ap.add_argument("--mergekit-yaml", type=Path, default=None,
                    help="path to mergekit-yaml (e.g. bench_out/mkvenv/bin/mergekit-yaml); skipped when absent")
    ap.add_argument("--providers", default="ours,mergekit,copy", help="subset to run [%(default)s]")
    ap.add_argument("--hidden", type=int, default=2048, help="model width [%(default)s]")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary [%(default)s]")
    ap.add_argument("--cache", choices=["warm", "cold"], default="warm",
                    help="warm: inputs read once first and left in the page cache; cold: the inputs' pages are "
                         "evicted (posix_fadvise DONTNEED) before every run, so reads hit the disk [%(default)s]")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a run is killed [%(default)s]")
    ap.add_argument("--no-verify", action="store_true", help="skip the equal-work check")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    mk = args.mergekit_yaml.resolve() if args.mergekit_yaml else None
    wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
    known = {"ours", "mergekit", "copy", "ours-cuda", "mergekit-cuda"}
    unknown = sorted(set(wanted) - known)
    if unknown:
        ap.error(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    notes = []
    for name in [p for p in ("mergekit", "mergekit-cuda") if p in wanted and (mk is None or not mk.is_file())]:
        notes.append(f"mergekit skipped: --mergekit-yaml {args.mergekit_yaml or '(not given)'} is not a file; "
                     "install it with bench_out/mkvenv/bin/pip install mergekit (see the module docstring)")
        print("note: " + notes[-1], flush=True)
        wanted.remove(name)
    log = work / "bench_merge.log"
    cold = args.cache == "cold"
    cache_note = ("cold: the inputs' pages evicted with posix_fadvise(DONTNEED) before every run (after sync)"
                  if cold else "warm: one full read of both inputs first; caches not dropped (shared machine)")
    results: list[Result] = []
    checks: list[dict] = []
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    for label in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        pair = make_pair(work, label, args.hidden, args.vocab)
        a_files, b_files = pair.files
        need = 2 * pair.input_bytes * 1.2
        if _mem_available() and _mem_available() < need:
            notes.append(f"{label}: MemAvailable {_mem_available() / 1e9:.1f} GB < {need / 1e9:.1f} GB: inputs may "
                         "not stay cached, timings then include disk reads")
            print("note: " + notes[-1], flush=True)
        if not cold:
            print(f"[{label}] warm-up read of inputs: {warm(a_files + b_files):.1f} s", flush=True)
        outs = {p: work / "out" / f"{p}-{label}" for p in wanted}
        cmds = provider_commands(pair, work, outs, mk)
        res = {p: Result(OP, p, label, DTYPE, "cuda" if p.endswith("cuda") else "cpu", pair.input_bytes)
               for p in cmds}
        order = list(cmds)
        for rep in range(args.repeats):
            k = rep % len(order)
            for p in order[k:] + order[:k]:  # rotate who goes first each round
                if res[p].runs and res[p].runs[-1].rc != 0:
                    continue  # failed once: do not keep paying for it
                keep = rep == args.repeats - 1
                run = run_once(cmds[p], outs[p], log, args.timeout, a_files + b_files if cold else None)
                res[p].runs.append(run)
                print(f"[{label}] round {rep + 1}/{args.repeats} {p:9s} {run.wall_s:7.2f} s  "
                      f"peak RSS {run.peak_rss / 1e9:.2f} GB (anon {run.peak_anon / 1e9:.2f}, "
                      f"file {run.peak_file / 1e9:.2f})  cpu {run.user_s + run.sys_s:.1f} s  rc={run.rc}", flush=True)
                if run.rc != 0:
                    res[p].note = f"exit {run.rc}; see {log}"
                    print(f"  failed: see {log}", flush=True)
                if not keep and outs[p].exists():
                    shutil.rmtree(outs[p])
        results += res.values()
        if not args.no_verify and "ours" in res and res["ours"].runs and res["ours"].runs[-1].rc == 0:
            mk_out = outs.get("mergekit") if "mergekit" in res and res["mergekit"].runs[-1].rc == 0 else None
            t0 = time.perf_counter()
            rep = verify(pair, outs["ours"], mk_out)
            rep["seconds"] = round(time.perf_counter() - t0, 1)
            checks.append(rep)
            vm = rep.get("vs_mergekit")
            print(f"[{label}] equal work: torch reference "
                  f"{'ok' if all(r['ok'] for r in rep['vs_torch_reference']) else 'MISMATCH'} "
                  f"(max {max(r['max_ulps'] for r in rep['vs_torch_reference'])} ulp)"
                  + (f"; vs mergekit {'ok' if vm['ok'] else 'MISMATCH'}: max {vm['max_ulps']} ulp, "
                     f"{vm['differing']}/{vm['numel']} elements differ over {vm['tensors']} tensors" if vm else
                     "; mergekit output not available"), flush=True)
        for p in outs.values():
            if p.exists():
                shutil.rmtree(p)

    tgt = targets(results)
    print()
    print(table(results))
    print()
    for c in tgt:
        print(f"target {c['target']:45s} {c['size']:14s} {c['value']!s:40s} {'MET' if c['met'] else 'MISSED'}")
    for n in notes:
        print("note: " + n)
    print("page cache: " + cache_note)

    if args.json:
        meta = {
            "versions": _versions(mk),
            "setup": {"alpha": ALPHA, "hidden": args.hidden, "vocab": args.vocab, "repeats": args.repeats,
                      "page_cache": cache_note,
                      "rss": "ru_maxrss from os.wait4 in a small launcher; anon/file split sampled from /proc "
                             "every 20 ms",
                      "bytes": "bytes moved: both inputs read and one output written (3x one input)",
                      "commands": {p: " ".join(c) if p != "copy" else "python -c <copy floor>"
                                   for p, c in cmds.items()} if results else {}},
            "targets": tgt,
            "equal_work": checks,
            "notes": notes,
        }
        write_json(args.json, results, meta, started)
        print(f"wrote {args.json}")
    return 0 if all(c.get("ok", True) for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
