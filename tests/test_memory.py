"""Peak memory of inspect and of the non-linear merges is set by the chunk, not by the largest tensor.

Each operation runs in a fresh subprocess on a pair of one-tensor checkpoints far larger than the chunk; the
subprocess warms up first and resets its peak-RSS mark, so the growth measured is the operation's own (see
``benchmarks/bench_memory.py``, which also measures the 1 GiB case for the README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_memory import make_pair, peak_growth

NUMEL = 32 << 20  # 32M bfloat16 elements: a 64 MiB tensor
CHUNK = 32 << 10  # 1024 chunks per tensor


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[Path, Path], Path]:
    work = tmp_path_factory.mktemp("memory")
    a, b = make_pair(work / "big", NUMEL, "bfloat16")
    return a, b, make_pair(work / "tiny", 4096, "bfloat16"), work


@pytest.mark.slow
@pytest.mark.parametrize("op", ["inspect", "ties", "slerp"])
def test_peak_memory_is_set_by_the_chunk(op: str, big_pair: tuple[Path, Path, tuple[Path, Path], Path]) -> None:
    a, b, tiny, work = big_pair
    tensor_bytes = NUMEL * 2
    grown = peak_growth(op, a, b, tiny, work, CHUNK)
    # Whole-tensor code grows by 5-10 tensors (fp32 copies, |delta|, kthvalue's work buffer); chunked code by a
    # few MiB of chunk temporaries and allocator slack (measured 6-10 MiB). A quarter of one tensor separates
    # the two with room for the allocator.
    assert grown < tensor_bytes // 4, f"{op}: peak RSS grew {grown / 2**20:.1f} MiB on a {tensor_bytes >> 20} MiB tensor"


def test_chunked_inspect_matches_float64_reference(tiny_pair: tuple[Path, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    from mergekit_safe.merge.inspect import diff_checkpoints

    a, b = tiny_pair
    diffs, only = diff_checkpoints(str(a), str(b), chunk_elems=7)  # many chunks per tensor, a ragged last one
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert not only and {d.name for d in diffs} == set(sa)
    for d in diffs:
        x, y = sa[d.name].double().flatten(), sb[d.name].double().flatten()
        assert d.numel == x.numel()
        assert d.rel_delta == pytest.approx(float((y - x).norm() / x.norm()), rel=1e-9, abs=1e-12)
        assert d.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), rel=1e-9)
        assert d.max_abs == float((y - x).abs().max())
        assert torch.isfinite(torch.tensor(d.rel_delta))
