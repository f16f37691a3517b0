"""The per-tensor methods streamed in chunks: any chunk size gives the bits of the whole-tensor code.

breadcrumbs(_ties), sce, model_stock, nuslerp, multislerp, karcher and nearswap run in the engine as passes over
chunks (exact order statistics, float64 sums per fixed block, then elementwise steps). Each is checked here
against the whole-tensor functions of ``merge/sparsify.py`` and ``merge/geometry.py`` (themselves checked
against float64 references in ``test_methods_extra.py``), bit for bit, with chunk sizes that cut rows and
blocks; and, on a tensor far larger than the chunk, the peak memory of a real merge.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mergekit_safe.merge import geometry, sparsify
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from mergekit_safe.merge.streaming import (
    TensorsStream,
    aligned_blocks,
    kth_smallest,
    run_whole,
)

NAME = "model.layers.0.mlp.up_proj.weight"
BIG = 64 << 20  # elements of the memory test's tensor: 128 MiB of bfloat16
# 256 chunks per tensor: SCE's prepare makes about ten passes, and a pass costs Python time per chunk (at 32 Ki
# elements the SCE case took 76 s of CI); chunk temporaries stay a few MiB, far under the bound below
CHUNK = 256 << 10


def streamed(method: str, base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
             model_params: list[dict], chunk: int | None) -> torch.Tensor:
    """The registered method's streamed path, as the engine runs it, on in-memory tensors."""
    specs = [ModelSpec(f"m{i}", model_params[i]) for i in range(len(models))]
    recipe = Recipe(method, specs, base_model="base" if base is not None else None, parameters=params).validate()
    stream = recipe.method.stream
    assert stream is not None, f"{method} does not stream"
    dtype = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    return run_whole(stream, NAME, base, models, recipe.resolve(NAME, 2), dtype, chunk)


def inputs(shape: tuple[int, ...], dtype: torch.dtype, n: int = 3) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = torch.randn(shape, dtype=torch.float64)
    shared = 0.05 * torch.randn(shape, dtype=torch.float64)
    models = [(base + shared + 0.05 * torch.randn(shape, dtype=torch.float64)).to(dtype) for _ in range(n)]
    base = base.to(dtype)
    models[-1].view(-1)[::7] = base.view(-1)[::7]  # zero task-vector entries: ties at the thresholds
    return base, models


def _gta(consensus: bool, rescale: bool) -> Callable[..., torch.Tensor]:
    def whole(b: torch.Tensor, ms: list[torch.Tensor], out: torch.dtype) -> torch.Tensor:
        return sparsify.task_vector_merge(
            b, ms, name=NAME, sparsification="magnitude_outliers", consensus=consensus, weights=[1.0, 0.5, 0.8],
            densities=[0.3, 0.6, 0.95], normalize=True, rescale=rescale, gammas=[0.05, 0.1, 0.02], out_dtype=out)

    return whole


def _della(consensus: bool, rescale: bool) -> Callable[..., torch.Tensor]:
    def whole(b: torch.Tensor, ms: list[torch.Tensor], out: torch.dtype) -> torch.Tensor:
        return sparsify.task_vector_merge(
            b, ms, name=NAME, sparsification="della_magprune", consensus=consensus, weights=[1.0, 0.5, 0.8],
            densities=[0.3, 0.6, 1.0], normalize=consensus, rescale=rescale, lam=0.9, epsilons=[0.1, 0.25, 0.0],
            seed=4, out_dtype=out)

    return whole


DELLA_MODELS = [{"weight": w, "density": d, "epsilon": e} for w, d, e in ((1.0, 0.3, 0.1), (0.5, 0.6, 0.25),
                                                                          (0.8, 1.0, 0.0))]
WEIGHTS = [{"weight": w, "density": d, "gamma": g} for w, d, g in ((1.0, 0.3, 0.05), (0.5, 0.6, 0.1), (0.8, 0.95, 0.02))]
# (registered method, recipe parameters, per-model parameters, models, the whole-tensor function it must equal)
CASES = {
    "breadcrumbs": ("breadcrumbs", {"normalize": True}, WEIGHTS, 3, _gta(False, False)),
    "breadcrumbs-rescale": ("breadcrumbs", {"normalize": True, "rescale": True}, WEIGHTS, 3, _gta(False, True)),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"normalize": True, "rescale": True}, WEIGHTS, 3, _gta(True, True)),
    "della": ("della", {"lambda": 0.9, "seed": 4}, DELLA_MODELS, 3, _della(True, True)),
    "della_linear": ("della_linear", {"lambda": 0.9, "seed": 4}, DELLA_MODELS, 3, _della(False, True)),
    "della_linear-plain": ("della_linear", {"lambda": 0.9, "seed": 4, "rescale": False}, DELLA_MODELS, 3,
                           _della(False, False)),
    "sce": ("sce", {"select_topk": 0.4}, [{}] * 3, 3, lambda b, ms, out: sparsify.sce_merge(b, ms, 0.4, out)),
    "sce-all": ("sce", {}, [{}] * 3, 3, lambda b, ms, out: sparsify.sce_merge(b, ms, 1.0, out)),
    "model_stock": ("model_stock", {}, [{}] * 3, 3, lambda b, ms, out: geometry.model_stock(b, ms, out_dtype=out)),
    "model_stock-rows": ("model_stock", {"filter_wise": True}, [{}] * 3, 3,
                         lambda b, ms, out: geometry.model_stock(b, ms, True, out_dtype=out)),
    "nuslerp": ("nuslerp", {}, [{"weight": 1.0}, {"weight": 2.0}], 2,
                lambda b, ms, out: geometry.nuslerp(b, ms, [1.0, 2.0], out_dtype=out)),
    "nuslerp-rows": ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 1.0}] * 2, 2,
                     lambda b, ms, out: geometry.nuslerp(b, ms, [1.0, 1.0], True, False, out_dtype=out)),
    "multislerp": ("multislerp", {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], 3,
                   lambda b, ms, out: geometry.multislerp(b, ms, [1.0, 2.0, 0.5], out_dtype=out)),
    "karcher": ("karcher", {}, [{}] * 3, 3, lambda b, ms, out: geometry.karcher([b, *ms], out_dtype=out)),
    "nearswap": ("nearswap", {"t": 0.03}, [{}], 1, lambda b, ms, out: geometry.nearswap(b, ms[0], 0.03, out)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [7, 100])
def test_streamed_equals_the_whole_tensor_code(case: str, dtype: torch.dtype, chunk: int) -> None:
    method, params, model_params, n, whole = CASES[case]
    base, models = inputs((13, 11), dtype, n)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    want = whole(base, models, out)
    got = streamed(method, base, models, params, model_params, chunk)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"{case} chunk={chunk}: {int((got != want).sum())} of {got.numel()} differ"
    assert torch.equal(streamed(method, base, models, params, model_params, None), want)


@pytest.mark.parametrize("case", ["della", "della_linear"])
@pytest.mark.parametrize("chunk", [7, 30, 100])
def test_della_streams_in_whole_rows(case: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # a 2-row block (22 elements): chunks of 1, 1, 4 blocks, so rows are ranked, drawn and L1-summed per chunk
    monkeypatch.setattr(sparsify, "REDUCE_BLOCK", 22)
    assert sparsify.della_unit((13, 11)) == 22
    method, params, model_params, n, whole = CASES[case]
    base, models = inputs((13, 11), torch.bfloat16, n)
    want = whole(base, models, torch.float32)
    got = streamed(method, base, models, params, model_params, chunk)
    assert torch.equal(got, want), f"{case} chunk={chunk}: {int((got != want).sum())} of {got.numel()} differ"


def test_della_unit_is_whole_rows() -> None:
    assert sparsify.della_unit((4096, 576)) == 576 * (sparsify.REDUCE_BLOCK // 576)
    assert sparsify.della_unit((10, 100_000)) == 100_000  # a row longer than the block: one row
    assert sparsify.della_unit((300,)) == 300  # 1-D: one row, ranked whole
    assert sparsify.della_unit((2, 3, 4)) == 24


@pytest.mark.slow
@pytest.mark.parametrize("case", ["breadcrumbs_ties", "sce", "model_stock", "multislerp", "della"])
def test_streamed_equals_whole_across_reduction_blocks(case: str) -> None:
    # past one float64 block of each reduction (the Gram's and the norms'): chunk boundaries fall inside blocks
    # and blocks straddle chunks, so the stitching in aligned_blocks decides the bits
    method, params, model_params, n, whole = CASES[case]
    base, models = inputs((1024, 1100), torch.bfloat16, n)
    assert base.numel() > geometry.GRAM_CHUNK > sparsify.REDUCE_BLOCK and 300_007 % sparsify.REDUCE_BLOCK
    want = whole(base, models, torch.float32)
    got = streamed(method, base, models, params, model_params, 300_007)
    assert torch.equal(got, want), f"{case}: {int((got != want).sum())} of {got.numel()} differ"


@pytest.mark.parametrize("chunk", [1, 5, 16, 23, 64, 1000])
def test_aligned_blocks_cut_at_fixed_offsets(chunk: int) -> None:
    base, models = torch.arange(101.0), [torch.arange(101.0) * 2, -torch.arange(101.0)]
    # a block is valid until the next is asked for (the stitched ones share a buffer): copy each
    got = [(b.clone() if b is not None else None, [m.clone() for m in ms])
           for b, ms in aligned_blocks(TensorsStream("w", base, models, chunk), 16)]
    assert len(got) == 7  # six full blocks of 16 and the 5 left over
    for i, (b, ms) in enumerate(got):
        assert b is not None
        assert torch.equal(b, base[16 * i:16 * i + 16])
        assert all(torch.equal(m, full[16 * i:16 * i + 16]) for m, full in zip(ms, models))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_equals_kthvalue_at_every_rank_kind(dtype: torch.dtype) -> None:
    x = torch.randn(3000, dtype=dtype).abs()
    x[::9] = 0.0
    x[2::17] = x[3]  # many equal values
    x[5] = float("inf")
    x[8] = float("nan")
    ranks = [1, 2, 333, 1500, 2999, 3000]
    for chunk in (97, 1024, 3000):
        stream = TensorsStream("w", x, [x], chunk)
        got = kth_smallest(stream, lambda c: [c.base], [(0, r) for r in ranks])
        want = [float(torch.kthvalue(x, r).values) for r in ranks]
        assert [g.hex() for g in got] == [w.hex() for w in want], (chunk, got, want)


def test_sce_takes_ties_at_the_cut_in_index_order() -> None:
    # every task-vector entry has the same variance: the cut keeps exactly k of them, the first k
    base = torch.zeros(40, dtype=torch.float64)
    models = [torch.full((40,), 1.0, dtype=torch.float64), torch.full((40,), -1.0, dtype=torch.float64)]
    models[0][-2:] = 3.0  # two larger variances, kept first
    for chunk in (None, 3, 16):
        got = streamed("sce", base, models, {"select_topk": 0.25}, [{}, {}], chunk)
        kept = (got != 0).nonzero().reshape(-1).tolist()
        assert kept == [0, 1, 2, 3, 4, 5, 6, 7, 38, 39], (chunk, kept)


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[Path, Path], Path]:
    from benchmarks.bench_memory import make_pair

    work = tmp_path_factory.mktemp("memory")
    a, b = make_pair(work / "big", BIG, "bfloat16")
    return a, b, make_pair(work / "tiny", 4096, "bfloat16"), work


@pytest.fixture(scope="module")
def big_matrix_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[Path, Path], Path]:
    from benchmarks.bench_memory import make_pair

    work = tmp_path_factory.mktemp("memory-rows")
    a, b = make_pair(work / "big", BIG, "bfloat16", width=4096)
    return a, b, make_pair(work / "tiny", 4096, "bfloat16", width=64), work


@pytest.mark.slow
@pytest.mark.parametrize("op,params", [("breadcrumbs", {"density": 0.5}), ("sce", {"select_topk": 0.5}),
                                       ("karcher", {}), ("nearswap", {"t": 0.001}), ("della", {"density": 0.5})])
def test_peak_memory_is_set_by_the_chunk(op: str, params: dict, monkeypatch: pytest.MonkeyPatch,
                                         request: pytest.FixtureRequest) -> None:
    from benchmarks import bench_memory

    monkeypatch.setitem(bench_memory.PARAMS, op, params)
    # DELLA ranks within rows: a flat tensor is one row, ranked whole, so its case is a matrix
    a, b, tiny, work = request.getfixturevalue("big_matrix_pair" if op == "della" else "big_pair")
    tensor_bytes = BIG * 2
    grown = bench_memory.peak_growth(op, a, b, tiny, work, CHUNK)
    # as in test_memory.py: whole-tensor code grows by several float32 copies of the tensor (2x its bf16 size
    # each), chunked code by chunk temporaries, the fixed float64 block of the Gram pass (karcher: 16 MiB for two
    # inputs, whatever the tensor) and allocator slack; a quarter of one tensor separates the two
    assert grown < tensor_bytes // 4, f"{op}: peak RSS grew {grown / 2**20:.1f} MiB on a {tensor_bytes >> 20} MiB tensor"
