"""The streaming merge executor.

For every output tensor the engine reads the inputs as memory-mapped views, computes in fp32 and streams the
result to the shard writer on a second thread, so reading and computing the next piece overlaps writing the
last one. Every method goes in flat chunks of at most ``chunk_elems`` elements, whose pages are released from
the process as soon as they are used: peak memory is set by the chunk size, not by the model or its largest
tensor. Linear methods take one pass; SLERP and TIES first make passes over the chunks for their per-tensor
constants (:mod:`mergekit_safe.merge.streaming`). Only a method registered with a whole-tensor ``combine`` and
no ``stream`` holds whole tensors.

Vocabulary mismatch (a fine-tune that added tokens): the output vocabulary is the reference's (the input that
config and tokenizer come from) or, with ``tokenizer_source: union``, the union of the inputs'. Embedding and
head rows are matched by token string and missing rows filled, chunk by chunk, by
:mod:`mergekit_safe.merge.vocab`; a fine-tune's tokens left out of the output are named in a warning.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_safe import __version__, kernels
from mergekit_safe.io.adapters import open_input
from mergekit_safe.errors import CheckpointError
from mergekit_safe.io.publish import check_output_path, staged_output
from mergekit_safe.io.source import TensorSource
from mergekit_safe.merge.streaming import Chunk, chunk_step
from mergekit_safe.io.writer import CheckpointWriter, TensorSpec
from mergekit_safe.merge.methods import MergeMethod, TensorJob
from mergekit_safe.merge.recipe import Recipe, num_layers
from mergekit_safe.merge.vocab import VocabPlan, gather_rows, is_vocab_tensor, plan_vocabulary, write_tokenizer

__all__ = ["DEFAULT_CHUNK_ELEMS", "DEFAULT_MAX_SHARD", "MergeResult", "check_output_path", "merge", "merge_into",
           "plan_merge"]

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
    inputs: list[TensorSource]  # base first when there is one
    reference: TensorSource
    specs: list[TensorSpec]
    num_layers: int
    warnings: list[str]
    vocab: VocabPlan | None = None


def _fetch_all(plan: _Plan, name: str, start: int, stop: int) -> list[torch.Tensor]:
    """Flat elements ``[start, stop)`` of every input's tensor ``name`` in the output's layout.

    A vocabulary tensor's rows are gathered by token (:func:`mergekit_safe.merge.vocab.gather_rows`).
    """
    if plan.vocab is not None and is_vocab_tensor(name, plan.reference.info(name).shape):
        rows = [c.info(name).shape[0] for c in plan.inputs]
        width = plan.reference.info(name).shape[1]
        return gather_rows(plan.inputs, name, plan.vocab.row_map(name, rows), width, start, stop)
    return [c.get(name, start, stop) for c in plan.inputs]


def _reference_index(recipe: Recipe, method: MergeMethod, paths: list[str]) -> int:
    if recipe.tokenizer_source in ("base", "union"):
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
    vocab_rows = _check_shapes(inputs, ref)
    ref_index = inputs.index(ref)
    vocab = plan_vocabulary(recipe, inputs, ref_index, vocab_rows)
    specs = []
    for name in ref_keys:
        rinfo = ref.info(name)
        shape = rinfo.shape
        if vocab is not None and name in vocab_rows:
            rmap = vocab.row_map(name, vocab_rows[name])
            shape = (rmap.rows, *rinfo.shape[1:])
        dtype = out_dtype if (out_dtype is not None and rinfo.dtype.is_floating_point) else rinfo.dtype
        specs.append(TensorSpec(name, shape, dtype))
    if vocab is not None:
        warnings += vocab.warnings
    return _Plan(method, inputs, ref, specs, num_layers(ref.config or {}, fallback_names=ref.keys()), warnings, vocab)


def _check_shapes(inputs: list[TensorSource], ref: TensorSource) -> dict[str, list[int]]:
    """Check every input's tensors have the reference's shapes, except the row count of vocabulary tensors.

    Returns:
        Every vocabulary tensor's row count per input.

    Raises:
        CheckpointError: a mismatched shape, naming the file and tensor.
    """
    vocab_rows = {}
    for name in ref.keys():
        rinfo = ref.info(name)
        for ckpt in inputs:
            info = ckpt.info(name)
            if info.shape != rinfo.shape and not (is_vocab_tensor(name, rinfo.shape)
                                                  and info.shape[1:] == rinfo.shape[1:]):
                raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(info.shape)} but "
                                      f"{ref.path} has {list(rinfo.shape)}")
        if is_vocab_tensor(name, rinfo.shape):
            vocab_rows[name] = [c.info(name).shape[0] for c in inputs]
    return vocab_rows


def _nonfinite_source(plan: _Plan, name: str, start: int, stop: int) -> str:
    for ckpt, piece in zip(plan.inputs, _fetch_all(plan, name, start, stop)):
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

    The checkpoint is written by :func:`merge_into` into a folder staged by
    :func:`mergekit_safe.io.publish.staged_output`, which publishes it only when complete.

    Args:
        recipe: a validated or unvalidated :class:`Recipe`.
        out_dir: output folder; must not exist unless ``overwrite``.
        max_shard_size: largest shard in bytes.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``): where the math runs.
        overwrite: replace a previous mergekit-safe output at ``out_dir`` (only once the new one is complete);
            any other existing folder is refused.
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
    if recipe.slices:  # layer stacking copies tensors: no math, so no device, chunking of math or NaN check
        from mergekit_safe.merge.slices import merge_slices  # slices builds on this module

        return merge_slices(recipe, out_dir, max_shard_size=max_shard_size, overwrite=overwrite,
                            allow_pickle=allow_pickle, chunk_elems=chunk_elems, hash_inputs=hash_inputs)
    t0 = time.perf_counter()
    out = Path(out_dir)
    recipe.validate()
    with staged_output(out, overwrite=overwrite, inputs=[Path(p) for p in recipe.input_paths()]) as folder:
        result = merge_into(recipe, folder, max_shard_size=max_shard_size, device=device, strict=strict,
                            allow_pickle=allow_pickle, progress=progress, chunk_elems=chunk_elems,
                            hash_inputs=hash_inputs, extra_card=extra_card, on_tensor=on_tensor)
    result.out_dir = out
    result.seconds = time.perf_counter() - t0
    return result


def merge_into(
    recipe: Recipe,
    folder: str | Path,
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
    """Write a merge's checkpoint (shards, index, side files, model card, recipe) into an existing folder.

    Nothing is published: the caller owns ``folder``, typically the staging folder of
    :func:`mergekit_safe.io.publish.staged_output`, so it can add its own files (a report, a plot) before the
    one atomic publish. On an error the files already written stay in ``folder`` for the caller's cleanup.

    Args:
        recipe: as for :func:`merge`.
        folder: an existing folder to write into.
        overwrite: accepted for the same call as :func:`merge`; unused (publishing is the caller's).
        max_shard_size, device, strict, allow_pickle, progress, chunk_elems, hash_inputs, extra_card,
            on_tensor: as for :func:`merge`.

    Returns:
        A :class:`MergeResult` whose ``out_dir`` is ``folder``.

    Raises:
        RecipeError, CheckpointError, OutputError: with one-line messages naming the file and tensor.

    Example:
        >>> with staged_output(Path("repaired")) as folder:  # doctest: +SKIP
        ...     merge_into(recipe, folder)
        ...     (folder / "repair_report.json").write_text(report)
    """
    del overwrite
    t0 = time.perf_counter()
    folder = Path(folder)
    recipe.validate()
    check_output_path(folder, recipe.input_paths())
    plan = plan_merge(recipe, allow_pickle=allow_pickle)
    dev = kernels.resolve_device(device)  # the one device rule (auto, cpu, cuda[:N]); raises when CUDA is missing
    hasher = _Hasher([f for c in plan.inputs for f in c.files]) if hash_inputs else None
    if hasher:
        hasher.start()
    result = MergeResult(folder, len(plan.specs), sum(s.nbytes for s in plan.specs), 0.0, list(plan.warnings))
    with CheckpointWriter(folder, plan.specs, max_shard_size, publish=False) as writer:
        _stream_tensors(plan, recipe, writer, dev, chunk_elems, strict, result, progress, on_tensor)
        if hasher:
            hasher.join()
            if hasher.error:
                raise CheckpointError(f"cannot hash inputs ({hasher.error})")
            result.input_hashes = hasher.result
        writer.copy_side_files(plan.reference.root, _config_updates(recipe, plan))
        if plan.vocab is not None and plan.vocab.tokenizer is not None:
            write_tokenizer(plan.vocab.tokenizer, folder)
        writer.write_text("README.md", _model_card(recipe, result, plan) + (extra_card or ""))
        writer.write_text("mergekit_safe_recipe.yml", recipe.to_yaml())
        writer.finalize()
    result.seconds = time.perf_counter() - t0
    return result


def _config_updates(recipe: Recipe, plan: _Plan) -> dict[str, Any]:
    """What the output's ``config.json`` changes from the reference's: the dtype asked for, the vocabulary size."""
    updates: dict[str, Any] = {}
    cfg = plan.reference.config
    if cfg is None:
        return updates
    if recipe.dtype:
        key = "dtype" if "dtype" in cfg else "torch_dtype"
        updates[key] = str(recipe.out_dtype()).removeprefix("torch.")
    rows = next((s.shape[0] for s in plan.specs if is_vocab_tensor(s.name, s.shape)), None)
    if plan.vocab is not None and rows is not None and "vocab_size" in cfg and cfg["vocab_size"] != rows:
        updates["vocab_size"] = rows
    return updates


def _stream_tensors(
    plan: _Plan, recipe: Recipe, writer: CheckpointWriter, dev: torch.device, chunk_elems: int, strict: bool,
    result: MergeResult, progress: bool, on_tensor: Callable[[str], None] | None,
) -> None:
    """Merge every planned tensor and hand it to ``writer`` through the writer thread."""
    from tqdm import tqdm

    bar = tqdm(total=result.bytes_written, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
               disable=not progress, leave=False)
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
            pieces = _fetch_all(plan, name, start, stop)
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
    if plan.method.stream is not None:
        _merge_streamed(plan, spec, params, has_base, wt, dev, pool, chunk_elems, strict, result, bar)
        return
    assert plan.method.combine is not None  # a whole-tensor method: memory grows with the tensor
    tensors = [t.view(spec.shape).to(dev) for t in _fetch_all(plan, name, 0, numel)]
    base, models = (tensors[0], tensors[1:]) if has_base else (None, tensors)
    merged = plan.method.combine(TensorJob(name, base, models, params, torch.float32))
    _check_finite(plan, merged, name, 0, numel, strict, result)
    wt.put(name, merged.to(spec.dtype).cpu())
    for c in plan.inputs:
        c.release(name)
    bar.update(spec.nbytes)


class _CheckpointStream:
    """One output tensor's inputs read from the checkpoints chunk by chunk (a :class:`TensorStream`).

    Each chunk's pages are released once the consumer moves on, so a pass holds one chunk per input.
    """

    def __init__(self, plan: _Plan, spec: TensorSpec, has_base: bool, chunk_elems: int, dev: torch.device,
                 unit: int = 1) -> None:
        self.plan, self.name, self.has_base, self.dev = plan, spec.name, has_base, dev
        self.numel, self.shape = math.prod(spec.shape), tuple(spec.shape)
        self.step = chunk_step(max(1, chunk_elems), unit)

    def chunks(self) -> Iterator[Chunk]:
        plan = self.plan
        for start in range(0, max(self.numel, 1), self.step):
            stop = min(self.numel, start + self.step)
            pieces = [t.to(self.dev) for t in _fetch_all(plan, self.name, start, stop)]
            base, models = (pieces[0], pieces[1:]) if self.has_base else (None, pieces)
            yield Chunk(self.name, start, stop, base, models)
            for c in plan.inputs:
                c.release(self.name)


def _merge_streamed(
    plan: _Plan, spec: TensorSpec, params: Any, has_base: bool, wt: _WriterThread, dev: torch.device,
    pool: _BufferPool, chunk_elems: int, strict: bool, result: MergeResult, bar: Any,
) -> None:
    method = plan.method.stream
    assert method is not None
    stream = _CheckpointStream(plan, spec, has_base, chunk_elems, dev, method.chunk_unit(tuple(spec.shape)))
    state = method.prepare(stream, params) if method.prepare is not None else None
    for chunk in stream.chunks():
        # TIES trims a NaN away and DARE may drop it: the output cannot show a bad input, so look at the inputs
        pieces = [chunk.base, *chunk.models] if chunk.base is not None else chunk.models
        if not all(_all_finite(p) for p in pieces):
            _report_nonfinite(plan, spec.name, chunk.start, chunk.stop, strict, result)
        merged = method.apply(chunk, params, state, torch.float32)
        out, give_back = pool.take(chunk.stop - chunk.start, spec.dtype)
        out.copy_(merged)
        _check_finite(plan, out, spec.name, chunk.start, chunk.stop, strict, result)
        wt.put(spec.name, out, done=give_back)
        bar.update((chunk.stop - chunk.start) * spec.dtype.itemsize)


def _all_finite(t: torch.Tensor) -> bool:
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates through min/max; no chunk-sized boolean temporary
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_finite(
    plan: _Plan, merged: torch.Tensor, name: str, start: int, stop: int, strict: bool, result: MergeResult
) -> None:
    # NaN/Inf in any input propagates to the output, and min/max carry NaN: one cheap pass over the output
    # (in its own dtype, so an overflow on the cast is caught too). The inputs are only searched on the rare
    # failure, to name the file.
    if not _all_finite(merged):
        _report_nonfinite(plan, name, start, stop, strict, result)


def _report_nonfinite(plan: _Plan, name: str, start: int, stop: int, strict: bool, result: MergeResult) -> None:
    msg = _nonfinite_source(plan, name, start, stop)
    if strict:
        raise CheckpointError(msg + " (--strict)")
    if msg not in result.warnings:
        result.warnings.append(msg)
