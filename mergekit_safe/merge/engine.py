"""The streaming merge executor.

For every output tensor the engine reads the inputs as memory-mapped views, computes in fp32 and streams the
result to the shard writer on a second thread, so reading and computing the next piece overlaps writing the
last one. Linear methods go in flat chunks of at most ``chunk_elems`` elements, whose pages are released from
the process as soon as they are merged: peak memory is set by the chunk size, not by the model.

Vocabulary mismatch (a fine-tune that added tokens): the output keeps the row count of the input that config
and tokenizer come from (the *reference*). An input with fewer embedding/head rows is padded with the
reference's rows, so new tokens keep the reference's values; an input with more rows is cut.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_safe import __version__, kernels
from mergekit_safe.io.adapters import open_input
from mergekit_safe.io.reader import Checkpoint
from mergekit_safe.errors import CheckpointError, MergeKitSafeError, OutputError
from mergekit_safe.merge.methods import MergeMethod, TensorJob
from mergekit_safe.merge.recipe import Recipe, layer_index, module_type
from mergekit_safe.io.writer import CheckpointWriter, TensorSpec

log = logging.getLogger("mergekit_safe")

DEFAULT_CHUNK_ELEMS = 1 << 21  # 2M elements: 4 MB of bf16 per buffer (measured: no slower than 8M, 75 MB less RSS)
DEFAULT_MAX_SHARD = 5 * 10**9


@dataclass
class MergeResult:
    """What a merge did.

    Attributes:
        out_dir: the published checkpoint folder.
        tensors: number of tensors written.
        bytes_written: tensor bytes written.
        seconds: wall time.
        warnings: non-fatal problems found (NaN/Inf inputs, dropped tensors, vocabulary padding).
        input_hashes: sha256 of every input weight file.
    """

    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    input_hashes: dict[str, str] = field(default_factory=dict)


def check_output_path(out_dir: Path, inputs: list[str]) -> None:
    """Refuse an output that is, contains, or lies inside an input.

    Raises:
        OutputError: naming the clashing input.
    """
    out = out_dir.resolve()
    for inp in inputs:
        p = Path(inp).resolve()
        if out == p or p in out.parents or out in p.parents:
            raise OutputError(f"{out_dir}: output would overwrite or lie inside input {inp}; choose another -o")


def hash_files(files: list[Path], block: int = 1 << 20) -> dict[str, str]:
    """sha256 of each file (hashlib releases the GIL, so this overlaps the merge).

    One reused buffer: a fresh block per read costs page faults that double the hashing time.
    """
    out = {}
    buf = bytearray(block)
    view = memoryview(buf)
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
        out[str(f)] = h.hexdigest()
    return out


class _Hasher(threading.Thread):
    def __init__(self, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.files = files
        self.result: dict[str, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = hash_files(self.files)
        except OSError as e:
            self.error = e


class _WriterThread(threading.Thread):
    """Writes queued pieces so disk writes overlap the next piece's read and compute.

    A piece may come with a CUDA event to wait for (its device-to-host copy) and a callback to run once it is
    written (its buffer may then be reused).
    """

    def __init__(self, writer: CheckpointWriter, depth: int = 2) -> None:
        super().__init__(daemon=True)
        self.writer = writer
        self.q: queue.Queue[tuple[str, torch.Tensor, Any, Callable[[], None] | None] | None] = queue.Queue(
            maxsize=depth)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            name, data, ready, done = item
            if self.error is None:
                try:
                    if ready is not None:
                        ready.synchronize()
                    self.writer.write(name, data)
                except BaseException as e:  # handed to the main thread, which re-raises it
                    self.error = e
            if done is not None:
                done()

    def put(self, name: str, data: torch.Tensor, ready: Any = None, done: Callable[[], None] | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, data, ready, done))

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class _BufferPool:
    """Reusable chunk-sized output buffers; a buffer returns to the pool once the writer has written it.

    A fresh large tensor per chunk costs more in page faults than the merge math itself.
    """

    def __init__(self, count: int) -> None:
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # allocated on first use, at the size and dtype asked for

    def take(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[], None]]:
        buf = self._free.get()
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
        owned = buf
        return buf[:n], lambda: self._free.put(owned)


class _CudaPipe:
    """Streams linear-merge chunks through a GPU with copies and compute overlapped.

    Chunk k is staged into pinned host memory (the page-cache read) and copied to the device on one stream
    while chunk k-1 computes on the default stream and chunk k-2 copies back on a third and is written by the
    writer thread. Buffers come from a ring of ``slots`` pinned slots; a slot is reused only after the writer has
    written its output, so host and device memory stay bounded by ``slots`` chunks.
    """

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        self.device = device
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self.slots = slots
        self._pinned: list[dict[Any, torch.Tensor]] = [{} for _ in range(slots)]
        self._free = [threading.Event() for _ in range(slots)]
        for ev in self._free:
            ev.set()
        self._next = 0
        self.nonfinite: list[tuple[str, int, int, torch.Tensor]] = []

    def _buffer(self, slot: int, key: Any, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._pinned[slot].get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype, pin_memory=True)
            self._pinned[slot][key] = buf
        return buf[:n]

    def run(self, name: str, start: int, pieces: list[torch.Tensor], coeffs: list[float], out_dtype: torch.dtype,
            wt: _WriterThread) -> None:
        slot = self._next % self.slots
        self._next += 1
        self._free[slot].wait()
        self._free[slot].clear()
        compute = torch.cuda.current_stream(self.device)
        staged = [self._buffer(slot, i, p.numel(), p.dtype).copy_(p) for i, p in enumerate(pieces)]
        with torch.cuda.stream(self.h2d):
            dev_in = [t.to(self.device, non_blocking=True) for t in staged]
        compute.wait_stream(self.h2d)
        for t in dev_in:
            t.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        merged = kernels.weighted_sum(dev_in, coeffs, out_dtype=torch.float32)
        # NaN/Inf is checked on the device and read back once at the end: a per-chunk check would stall the pipe
        self.nonfinite.append((name, start, start + merged.numel(), ~torch.isfinite(merged).all()))
        merged = merged.to(out_dtype)
        self.d2h.wait_stream(compute)
        with torch.cuda.stream(self.d2h):
            out = self._buffer(slot, "out", merged.numel(), out_dtype)
            out.copy_(merged, non_blocking=True)
            merged.record_stream(self.d2h)
            ready = torch.cuda.Event()
            ready.record(self.d2h)
        wt.put(name, out, ready, self._free[slot].set)

    def bad_chunks(self) -> list[tuple[str, int, int]]:
        """The chunks whose merged values were not all finite (one device sync for the whole merge)."""
        return [(n, a, b) for n, a, b, flag in self.nonfinite if bool(flag)]


@dataclass
class _Plan:
    method: MergeMethod
    inputs: list[Checkpoint]  # base first when there is one
    reference: Checkpoint
    specs: list[TensorSpec]
    num_layers: int
    warnings: list[str]


def _num_layers(ckpt: Checkpoint) -> int:
    cfg = ckpt.config or {}
    n = cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")
    if n:
        return int(n)
    found = [i for k in ckpt.keys() if (i := layer_index(k)) is not None]
    return max(found) + 1 if found else 1


def _reference_index(recipe: Recipe, method: MergeMethod, paths: list[str]) -> int:
    if recipe.tokenizer_source == "base":
        return 0
    if recipe.tokenizer_source:
        return paths.index(recipe.tokenizer_source)
    return method.side_files_from % len(paths)


def plan_merge(recipe: Recipe, *, allow_pickle: bool = False) -> _Plan:
    """Open the inputs and check that their tensors line up; decide every output tensor's shape and dtype.

    Raises:
        CheckpointError: missing tensors or mismatched shapes, naming the file and tensor.
    """
    recipe.validate()
    method = recipe.method
    paths = recipe.input_paths()
    base_path = recipe.base_model
    inputs = [open_input(p, base=base_path, allow_pickle=allow_pickle) for p in paths]
    ref = inputs[_reference_index(recipe, method, paths)]
    out_dtype = recipe.out_dtype()
    warnings: list[str] = []
    ref_keys = ref.keys()
    if ref.tied_embeddings:
        extra_head = [c for c in inputs if "lm_head.weight" in c.keys() and c is not ref]
        if extra_head and "lm_head.weight" not in ref_keys:
            warnings.append(f"{extra_head[0].path}: lm_head.weight is dropped: the output ties it to the embeddings "
                            f"like {ref.path}")
    for ckpt in inputs:
        if ckpt is ref:
            continue
        missing = [k for k in ref_keys if k not in ckpt]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"{ckpt.path}: missing tensor {missing[0]!r}{more} (present in {ref.path})")
        extra = [k for k in ckpt.keys() if k not in ref and k != "lm_head.weight"]
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise CheckpointError(f"{ckpt.path}: tensor {extra[0]!r}{more} is not in {ref.path}")
    specs = []
    for name in ref_keys:
        rinfo = ref.info(name)
        for ckpt in inputs:
            info = ckpt.info(name)
            if info.shape == rinfo.shape:
                continue
            vocab_like = module_type(name) in ("embed", "head") and info.shape[1:] == rinfo.shape[1:]
            if not vocab_like:
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(info.shape)} but "
                                      f"{ref.path} has {list(rinfo.shape)}")
            warnings.append(f"{ckpt.path}: {name} has {info.shape[0]} rows, the output {rinfo.shape[0]} "
                            f"(vocabulary from {ref.path}; {'padded with its rows' if info.shape[0] < rinfo.shape[0] else 'cut'})")
        dtype = out_dtype if (out_dtype is not None and rinfo.dtype.is_floating_point) else rinfo.dtype
        specs.append(TensorSpec(name, rinfo.shape, dtype))
    return _Plan(method, inputs, ref, specs, _num_layers(ref), warnings)


def _fetch(ckpt: Checkpoint, ref: Checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
    """Flat elements ``[start, stop)`` of ``ckpt``'s tensor laid out in the reference's shape (vocab padding)."""
    info, rinfo = ckpt.info(name), ref.info(name)
    if info.shape == rinfo.shape:
        return ckpt.get(name, start, stop)
    have = info.numel if info.shape[0] < rinfo.shape[0] else rinfo.numel
    parts = []
    if start < have:
        parts.append(ckpt.get(name, start, min(stop, have)))
    if stop > have:
        parts.append(ref.get(name, max(start, have), stop))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _nonfinite_source(plan: _Plan, name: str, start: int, stop: int) -> str:
    for ckpt in plan.inputs:
        piece = _fetch(ckpt, plan.reference, name, start, stop)
        if piece.is_floating_point() and not torch.isfinite(piece).all():
            return f"{ckpt.info(name).file}: tensor {name!r} has NaN or Inf values"
    return f"tensor {name!r}: the merge produced NaN or Inf values"


def _model_card(recipe: Recipe, result: MergeResult, plan: _Plan) -> str:
    lines = [
        "---", "tags:", "- merge", "- mergekit-safe", "---", "",
        f"# Merged with mergekit-safe {__version__}", "",
        f"Method: `{recipe.merge_method}` ({plan.method.summary}).", "",
        "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "",
        "## Inputs", "", "| file | sha256 |", "|---|---|",
    ]
    lines += [f"| `{f}` | `{h}` |" for f, h in result.input_hashes.items()]
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    device: str = "cpu",
    overwrite: bool = False,
    strict: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    hash_inputs: bool = True,
    extra_card: str | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeResult:
    """Run a merge recipe and publish the result atomically at ``out_dir``.

    Args:
        recipe: a validated or unvalidated :class:`Recipe`.
        out_dir: output folder; must not exist unless ``overwrite``.
        max_shard_size: largest shard in bytes.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``): where the math runs.
        overwrite: replace an existing output folder (only once the new one is complete).
        strict: NaN/Inf in an input is an error rather than a warning.
        allow_pickle: accept pickled ``.bin`` inputs (loaded with ``weights_only=True``).
        progress: show a progress bar with bytes/s.
        chunk_elems: elements per streamed piece of a linear merge (bounds memory).
        hash_inputs: record sha256 of every input file in the model card.
        extra_card: Markdown appended to the model card (the repair report uses it).
        on_tensor: called with each tensor name once it is queued (tests use it to interrupt a merge).

    Returns:
        A :class:`MergeResult`.

    Raises:
        RecipeError, CheckpointError, OutputError: with one-line messages naming the file and tensor.

    Example:
        >>> from mergekit_safe.merge.recipe import Recipe, ModelSpec
        >>> r = Recipe("lerp", [ModelSpec("./finetuned")], base_model="./aligned", parameters={"alpha": 0.3})
        >>> merge(r, "./merged")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    recipe.validate()
    check_output_path(out, recipe.input_paths())
    plan = plan_merge(recipe, allow_pickle=allow_pickle)
    for w in plan.warnings:
        log.warning(w)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeKitSafeError(f"--device {device}: CUDA is not available on this machine")
    hasher = _Hasher([f for c in plan.inputs for f in c.files]) if hash_inputs else None
    if hasher:
        hasher.start()
    total = sum(s.nbytes for s in plan.specs)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", disable=not progress,
               leave=False)
    result = MergeResult(out, len(plan.specs), total, 0.0, list(plan.warnings))
    with CheckpointWriter(out, plan.specs, max_shard_size, overwrite=overwrite) as writer:
        wt = _WriterThread(writer)
        wt.start()
        pipe = _CudaPipe(dev) if dev.type == "cuda" else None
        pool = _BufferPool(wt.q.maxsize + 2)
        threads = torch.get_num_threads()
        # Measured on 2 cores: one torch thread leaves the other core to the writer and hasher threads, and is
        # 5x faster per op than two threads fighting them.
        torch.set_num_threads(1)
        try:
            for spec in plan.specs:
                _merge_tensor(plan, recipe, spec, wt, dev, pipe, pool, chunk_elems, strict, result, bar)
                if on_tensor is not None:
                    on_tensor(spec.name)
            if pipe is not None:
                for name, start, stop in pipe.bad_chunks():
                    _report_nonfinite(plan, name, start, stop, strict, result)
        finally:
            torch.set_num_threads(threads)
            wt.close()
            bar.close()
            for c in plan.inputs:
                c.close()
        if hasher:
            hasher.join()
            if hasher.error:
                raise CheckpointError(f"cannot hash inputs ({hasher.error})")
            result.input_hashes = hasher.result
        ref_root = plan.reference.root
        updates = {}
        if recipe.dtype and plan.reference.config is not None:
            key = "dtype" if "dtype" in plan.reference.config else "torch_dtype"
            updates[key] = str(recipe.out_dtype()).removeprefix("torch.")
        writer.copy_side_files(ref_root, updates)
        card = _model_card(recipe, result, plan) + (extra_card or "")
        writer.write_text("README.md", card)
        writer.write_text("mergekit_safe_recipe.yml", recipe.to_yaml())
        writer.finalize()
    result.seconds = time.perf_counter() - t0
    return result


def merge_into(recipe: Recipe, folder: str | Path, **options: Any) -> MergeResult:
    """Write a merge's checkpoint into an existing (empty) folder, without publishing it.

    Minimal stand-in on this branch (H3's engine.merge_into replaces it at integration): the caller owns
    ``folder``, typically the staging folder of :func:`mergekit_safe.io.publish.staged_output`.

    Args:
        recipe: as for :func:`merge`.
        folder: an existing folder to write into.
        **options: the keyword options of :func:`merge` (``overwrite`` is ignored).

    Returns:
        A :class:`MergeResult` whose ``out_dir`` is ``folder``.
    """
    folder = Path(folder)
    inner = folder / ".merge"
    options.pop("overwrite", None)
    result = merge(recipe, inner, **options)
    for f in inner.iterdir():
        os.replace(f, folder / f.name)
    inner.rmdir()
    result.out_dir = folder
    return result


def _merge_tensor(
    plan: _Plan, recipe: Recipe, spec: TensorSpec, wt: _WriterThread, dev: torch.device, pipe: _CudaPipe | None,
    pool: _BufferPool, chunk_elems: int, strict: bool, result: MergeResult, bar: Any,
) -> None:
    name, numel = spec.name, math.prod(spec.shape)
    ref = plan.reference
    if not spec.dtype.is_floating_point:
        # integer buffers (position ids, masks) are copied from the reference, never averaged
        wt.put(name, ref.get(name).clone())
        bar.update(spec.nbytes)
        return
    params = recipe.resolve(name, plan.num_layers)
    has_base = recipe.base_model is not None
    if plan.method.linear:
        assert plan.method.coefficients is not None
        coeffs = plan.method.coefficients(params, has_base, len(recipe.models))
        step = max(1, chunk_elems)
        for start in range(0, max(numel, 1), step):
            stop = min(numel, start + step)
            pieces = [_fetch(c, ref, name, start, stop) for c in plan.inputs]
            if pipe is not None:
                pipe.run(name, start, pieces, coeffs, spec.dtype, wt)
            else:
                out, give_back = pool.take(stop - start, spec.dtype)
                kernels.weighted_sum(pieces, coeffs, out=out)
                _check_finite(plan, out, name, start, stop, strict, result)
                wt.put(name, out, done=give_back)
            for c in plan.inputs:
                c.release(name)
            bar.update((stop - start) * spec.dtype.itemsize)
        return
    assert plan.method.combine is not None
    tensors = [_fetch(c, ref, name, 0, numel).view(spec.shape).to(dev) for c in plan.inputs]
    base, models = (tensors[0], tensors[1:]) if has_base else (None, tensors)
    merged = plan.method.combine(TensorJob(name, base, models, params, torch.float32))
    _check_finite(plan, merged, name, 0, numel, strict, result)
    wt.put(name, merged.to(spec.dtype).cpu())
    for c in plan.inputs:
        c.release(name)
    bar.update(spec.nbytes)


def _check_finite(
    plan: _Plan, merged: torch.Tensor, name: str, start: int, stop: int, strict: bool, result: MergeResult
) -> None:
    # NaN/Inf in any input propagates to the output, and min/max carry NaN: one cheap pass over the output
    # (in its own dtype, so an overflow on the cast is caught too). The inputs are only searched on the rare
    # failure, to name the file.
    if merged.numel() == 0:
        return
    lo, hi = torch.aminmax(merged)
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        _report_nonfinite(plan, name, start, stop, strict, result)


def _report_nonfinite(plan: _Plan, name: str, start: int, stop: int, strict: bool, result: MergeResult) -> None:
    msg = _nonfinite_source(plan, name, start, stop)
    if strict:
        raise CheckpointError(msg + " (--strict)")
    if msg not in result.warnings:
        result.warnings.append(msg)
        log.warning(msg)
