"""Every method mergekit also has, run through mergekit's own implementation on the same inputs.

mergekit is an optional test extra (``pip install mergekit``; skipped when absent). Its merge methods are
called directly, per tensor, through its public ``MergeMethod.__call__`` on a ``TensorGroup``.

Where mergekit draws random masks (DARE, DELLA) it calls ``torch.bernoulli``; for the comparison that call is
replaced (for the test only) by our seeded counter-hash draw, so both sides drop the same elements and the
rest of the math is compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from mergekit_safe.kernels import reference
from tests.helpers import assert_close
from tests.test_methods import run_method

mk_registry = pytest.importorskip("mergekit.merge_methods.registry")
mk_base = pytest.importorskip("mergekit.merge_methods.base")
if not hasattr(mk_base, "TensorGroup"):
    pytest.skip("needs mergekit >= 0.1.5 (per-tensor TensorGroup API)", allow_module_level=True)

NAME = "model.layers.3.self_attn.o_proj.weight"
SHAPE = (37, 19)
# float64 on both sides with the same formulas: only summation order differs.
F64 = (1e-12, 1e-12)


def mergekit_merge(method: str, base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
                   per_model: dict[str, list[float]] | None = None) -> torch.Tensor:
    """Run mergekit's ``method`` on one tensor group (base first, ids 0..N)."""
    tensors = ([base] if base is not None else []) + models
    group = mk_base.TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None, name=NAME)
    first = 1 if base is not None else 0
    mk_params = dict(params)
    for key, values in (per_model or {}).items():
        mk_params[key] = {first + i: v for i, v in enumerate(values)}
    return mk_registry.get(method)([group], parameters=mk_params)[0]


def ours(method: str, base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
         per_model: dict[str, list[float]] | None = None) -> torch.Tensor:
    specs = [{k: v[i] for k, v in (per_model or {}).items()} for i in range(len(models))]
    return run_method(method, base, models, params, specs, name=NAME)


def rand(scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*SHAPE, dtype=torch.float64) * scale


def finetunes(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` correlated fine-tunes of it (task vectors share a direction, like real ones)."""
    base, shared = rand(), rand(0.05)
    return base, [base + shared + rand(0.05) for _ in range(n)]


@pytest.fixture
def hash_bernoulli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace torch.bernoulli (inside this test only) by our seeded draw for model k of tensor NAME, seed 0.

    mergekit sparsifies the models in order, one bernoulli call each, so the k-th call is model k.
    """
    calls = {"k": 0}

    def draw(probs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        tid = reference.tensor_id(NAME, calls["k"])
        calls["k"] += 1
        h = reference.dare_hash(probs.numel(), 0, tid).view(probs.shape)
        threshold = torch.floor((1.0 - probs.to(torch.float64)) * 2.0**32).to(torch.int64)
        return (h >= threshold).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", draw)


WEIGHTS = {"weight": [0.7, 0.4, 0.9]}

# method -> (has base, number of models, shared params, per-model params, tolerance and why)
DETERMINISTIC = {
    "linear": (False, 3, {}, WEIGHTS),
    "task_arithmetic": (True, 3, {"lambda": 0.8}, WEIGHTS),
    "slerp": (True, 1, {"t": 0.3}, {}),
    "ties": (True, 3, {}, {**WEIGHTS, "density": [0.5, 0.3, 0.8]}),
    "breadcrumbs": (True, 3, {"lambda": 1.2}, {**WEIGHTS, "density": [0.5, 0.3, 0.8], "gamma": [0.01, 0.1, 0.05]}),
    "breadcrumbs_ties": (True, 3, {}, {**WEIGHTS, "density": [0.5, 0.3, 0.8], "gamma": [0.01, 0.1, 0.05]}),
    "sce": (True, 3, {"select_topk": 0.4}, {}),
    "model_stock": (True, 3, {}, {}),
    "nuslerp": (True, 2, {}, {"weight": [0.3, 0.9]}),
    "multislerp": (True, 3, {}, WEIGHTS),
    "karcher": (False, 3, {}, {}),
    "nearswap": (True, 1, {"t": 0.02}, {}),
    "passthrough": (False, 1, {}, {"scale": [0.5]}),
}

VARIANTS = [
    ("ties", {"normalize": False}),
    ("breadcrumbs", {"rescale": True, "normalize": True}),
    ("model_stock", {"filter_wise": True}),
    ("nuslerp", {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", {"normalize_weights": False}),
    ("sce", {"select_topk": 1.0}),
]


def _case(method: str, extra: dict | None = None) -> tuple:
    has_base, n, params, per_model = DETERMINISTIC[method]
    base, models = finetunes(n)
    per_model = {k: v[:n] for k, v in per_model.items()}
    return (base if has_base else None), models, {**params, **(extra or {})}, per_model


@pytest.mark.parametrize("method", sorted(DETERMINISTIC))
def test_deterministic_methods_match_mergekit(method: str) -> None:
    base, models, params, per_model = _case(method)
    expected = mergekit_merge(method, base, models, params, per_model)
    assert_close(ours(method, base, models, params, per_model), expected, *F64, what=method)


@pytest.mark.parametrize("method,extra", VARIANTS, ids=[f"{m}-{'-'.join(e)}" for m, e in VARIANTS])
def test_option_variants_match_mergekit(method: str, extra: dict) -> None:
    base, models, params, per_model = _case(method, extra)
    expected = mergekit_merge(method, base, models, params, per_model)
    assert_close(ours(method, base, models, params, per_model), expected, *F64, what=f"{method} {extra}")


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_and_multislerp_without_and_with_base(with_base: bool) -> None:
    base, models = finetunes(2)
    b = base if with_base else None
    for method in ("nuslerp", "multislerp"):
        expected = mergekit_merge(method, b, models, {}, {"weight": [1.0, 2.0]})
        assert_close(ours(method, b, models, {}, {"weight": [1.0, 2.0]}), expected, *F64, what=method)


def test_karcher_counts_the_base_as_an_input() -> None:
    base, models = finetunes(2)
    group = mk_base.TensorGroup.from_tensors([base, *models], name=NAME)  # mergekit ignores the base role
    expected = mk_registry.get("karcher")([group], parameters={})[0]
    assert_close(ours("karcher", base, models, {}), expected, *F64)


# mergekit's random draws happen in float32 on the CPU (its bernoulli and DELLA's rank-to-probability step
# upcast to float32, not float64), and its L1 rescale runs in that float32 too: agreement is to float32 rounding.
RANDOM_TOL = (1e-6, 1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [True, False])
def test_dare_matches_mergekit_given_the_same_draws(method: str, normalize: bool, hash_bernoulli: None) -> None:
    base, models = finetunes(3)
    # rescale off: our DARE rescales survivors by 1/density (the DARE paper); mergekit >= 0.1 rescales to keep
    # the L1 norm, a different estimator, so only the unrescaled sums are comparable.
    # normalize given explicitly: our dare_ties defaults to normalize=true, mergekit's to false
    per_model, params = {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.6, 0.7]}, {"rescale": False}
    expected = mergekit_merge(method, base, models, {**params, "normalize": normalize}, per_model)
    got = ours(method, base, models, {**params, "normalize": normalize}, per_model)
    assert_close(got, expected, *RANDOM_TOL)
    assert int((got == base).sum()) > 0  # the draws did drop entries: the comparison is not vacuous


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("normalize", [True, False])
def test_della_matches_mergekit_given_the_same_draws(method: str, normalize: bool, hash_bernoulli: None) -> None:
    base, models = finetunes(3)
    per_model = {"weight": [0.7, 0.4, 0.9], "density": [0.5, 0.4, 0.7], "epsilon": [0.15, 0.1, 0.2]}
    params = {"normalize": normalize, "lambda": 0.9}
    expected = mergekit_merge(method, base, models, params, per_model)
    got = ours(method, base, models, params, per_model)
    assert_close(got, expected, *RANDOM_TOL, what=method)
    assert int((got == base).sum()) > 0  # the draws did drop entries: the comparison is not vacuous


# float32 inputs: both sides compute in float32, in different orders (ours accumulates the reductions in float64
# and, for the spherical methods, solves for the coefficients in float64): a few float32 ulps of values ~1.
F32 = (1e-5, 1e-5)


@pytest.mark.parametrize("method", sorted(DETERMINISTIC))
def test_float32_inputs_match_mergekit(method: str) -> None:
    base, models, params, per_model = _case(method)
    base = base.float() if base is not None else None
    models = [m.float() for m in models]
    expected = mergekit_merge(method, base, models, params, per_model)
    # run_method asks non-linear methods for a float64 result, computed in float32 from these inputs
    got = ours(method, base, models, params, per_model).to(torch.float32)
    assert expected.dtype == torch.float32
    assert_close(got, expected, *F32, what=method)


def test_slices_match_mergekit_run_merge(tmp_path) -> None:
    """A passthrough frankenmerge through mergekit's whole pipeline: the same tensors, bit for bit."""
    import json

    from safetensors.torch import load_file

    from mergekit_safe.merge.engine import merge
    from mergekit_safe.merge.recipe import recipe_from_dict
    from mergekit_safe.tiny import save_tiny_pair

    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    a, b = save_tiny_pair(tmp_path / "in", seed=9)
    data = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
                       {"sources": [{"model": str(a), "layer_range": [1, 2]}]}],
            "merge_method": "passthrough", "dtype": "float32"}
    mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(data), str(tmp_path / "mk"),
                       mk_options.MergeOptions(copy_tokenizer=False))
    merge(recipe_from_dict(data), tmp_path / "ours", progress=False)
    theirs, got = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert got.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(got[name], theirs[name]), name
    cfg = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "ours")]
    assert cfg[0]["num_hidden_layers"] == cfg[1]["num_hidden_layers"] == 4
