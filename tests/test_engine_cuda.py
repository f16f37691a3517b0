"""The GPU streaming path gives the CPU path's bytes (skipped without a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_safe.merge.engine import merge
from mergekit_safe.merge.recipe import ModelSpec, Recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("method,params", [("lerp", {"alpha": 0.3}), ("ties", {"density": 0.5})])
def test_cuda_merge_matches_cpu(tiny_pair: tuple[Path, Path], tmp_path: Path, method: str, params: dict) -> None:
    recipe = Recipe(method, [ModelSpec(str(tiny_pair[1]))], base_model=str(tiny_pair[0]), parameters=params)
    merge(recipe, tmp_path / "cpu", progress=False)
    # a tiny chunk size forces many chunks through the pinned ring and both copy streams
    merge(recipe, tmp_path / "gpu", progress=False, device="cuda", chunk_elems=1000)
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    for k in cpu:
        # same fp32 math on both devices; FMA contraction on the GPU can change the last bit
        torch.testing.assert_close(gpu[k], cpu[k], atol=1e-6, rtol=1e-6)
