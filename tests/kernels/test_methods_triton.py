"""The new merge methods through the Triton kernels (interpreted on the CPU) against their torch path.

Their elementwise passes are the shared kernels (weighted_sum for the geometric methods and the linear task-vector
combinations, ties for the consensus step, nearswap); the masks and reductions stay in torch. Forcing the Triton
backend here checks that those compositions are the ones a CUDA merge runs.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import EPS32

from tests.helpers import assert_close

from mergekit_safe.merge import geometry, sparsify

SHAPE = (33, 65)


def _inputs(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = torch.randn(SHAPE)
    shared = 0.1 * torch.randn(SHAPE)
    return base, [base + shared + 0.1 * torch.randn(SHAPE) for _ in range(n)]


CASES = {
    "breadcrumbs": lambda b, ms: sparsify.task_vector_merge(
        b, ms, name="w", sparsification="magnitude_outliers", consensus=False, weights=[0.6, 0.9],
        densities=[0.5, 0.7], normalize=False, rescale=False, gammas=[0.05, 0.05]),
    "della": lambda b, ms: sparsify.task_vector_merge(
        b, ms, name="w", sparsification="della_magprune", consensus=True, weights=[0.6, 0.9],
        densities=[0.5, 0.7], normalize=True, rescale=True, epsilons=[0.1, 0.2], seed=3),
    "model_stock": lambda b, ms: geometry.model_stock(b, ms),
    "nuslerp": lambda b, ms: geometry.nuslerp(b, ms, [1.0, 2.0]),
    "multislerp": lambda b, ms: geometry.multislerp(None, ms, [1.0, 2.0]),
    "karcher": lambda b, ms: geometry.karcher([b, *ms]),
    "nearswap": lambda b, ms: geometry.nearswap(b, ms[0], 0.05),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_triton_path_matches_torch_path(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    base, models = _inputs(2)
    monkeypatch.setenv("MERGEKIT_SAFE_BACKEND", "torch")
    expected = CASES[method](base, models)
    monkeypatch.setenv("MERGEKIT_SAFE_BACKEND", "triton")
    got = CASES[method](base, models)
    assert got.dtype == torch.float32
    # the same fp32 operations in possibly another order or with fused multiply-adds: a few fp32 roundings of
    # the terms' magnitude (inputs and task vectors are O(1))
    assert_close(got, expected, atol=16 * EPS32 * (base.abs() + 1), rtol=0.0, what=method)
