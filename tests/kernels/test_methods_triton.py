"""The new merge methods through the Triton kernels (interpreted on the CPU) against their torch path.

Their elementwise passes are the shared kernels (weighted_sum for the geometric methods, masked_merge for the
task-vector combinations, random_keep for DELLA's drop, sce_merge, nearswap); the order statistics and norms stay
in torch. Forcing the Triton backend here checks that those compositions are the ones a CUDA merge runs; the
CLI cases run the sparsifying methods end to end on tiny models with ``--backend triton``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from kernel_testing import EPS32
from safetensors.torch import load_file, save_file

from tests.helpers import assert_close

from mergekit_safe.cli import main
from mergekit_safe.kernels import use_backend
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
    "sce": lambda b, ms: sparsify.sce_merge(b, ms, 0.4),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_triton_path_matches_torch_path(method: str) -> None:
    base, models = _inputs(2)
    with use_backend("torch"):  # the library reads no environment variable: a scope forces the backend
        expected = CASES[method](base, models)
    with use_backend("triton"):
        got = CASES[method](base, models)
    assert got.dtype == torch.float32
    # the same fp32 operations in possibly another order or with fused multiply-adds: a few fp32 roundings of
    # the terms' magnitude (inputs and task vectors are O(1))
    assert_close(got, expected, atol=16 * EPS32 * (base.abs() + 1), rtol=0.0, what=method)


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny base and two fine-tunes with independent updates (the second's noise drawn here)."""
    from mergekit_safe.tiny import save_tiny_pair

    base, ft1 = save_tiny_pair(tmp_path_factory.mktemp("three"), seed=3)
    ft2 = ft1.parent / "finetuned2"
    shutil.copytree(ft1, ft2)
    gen = torch.Generator().manual_seed(7)
    for f in ft2.glob("*.safetensors"):
        tensors = load_file(base / f.name)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}, f,
                  metadata={"format": "pt"})
    return [base, ft1, ft2]


CLI_PARAMS = {
    "breadcrumbs": ["-p", "density=0.6", "-p", "gamma=0.05", "-p", "rescale=true"],
    "breadcrumbs_ties": ["-p", "density=0.6", "-p", "gamma=0.05", "-p", "normalize=true"],
    "della": ["-p", "density=0.5", "-p", "epsilon=0.1", "-p", "seed=3"],
    "della_linear": ["-p", "density=0.5", "-p", "epsilon=0.2", "-p", "lambda=0.8"],
    "sce": ["-p", "select_topk=0.5"],
}


@pytest.mark.parametrize("method", sorted(CLI_PARAMS))
def test_cli_merge_on_triton_matches_torch(method: str, three_models: list[Path], tmp_path: Path) -> None:
    outs = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        args = ["--backend", backend, "merge", "--method", method, *CLI_PARAMS[method], *map(str, three_models),
                "-o", str(out), "--no-progress"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output + repr(result.exception)
        outs[backend] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert outs["torch"].keys() == outs["triton"].keys()
    for name, expected in outs["torch"].items():
        # the same masks (kernel tests check them exactly) and the same fp32 operations, possibly reordered or
        # fused into multiply-adds: a few fp32 roundings of the terms (weights and updates are O(0.1))
        assert_close(outs["triton"][name], expected, atol=16 * EPS32 * (expected.abs() + 1), rtol=0.0,
                     what=f"{method} {name}")
