"""mergekit's other methods (breadcrumbs, DELLA, SCE, Model Stock, the SLERP family, Karcher, NearSwap,
passthrough) against independent float64 references written here, and through the streaming engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_safe.errors import MergeKitSafeError, RecipeError
from mergekit_safe.merge import geometry, sparsify
from mergekit_safe.merge.engine import merge
from mergekit_safe.merge.methods import get_method
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from tests.helpers import assert_close
from tests.test_methods import rand, run_method

NAME = "model.layers.0.mlp.up_proj.weight"
TIGHT = (1e-12, 1e-12)  # float64 on both sides, the same operations up to summation order


# ---- independent references (plain loops and sorts; nothing from the package) ----

def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform_hash(numel: int, seed: int, name: str, model: int) -> list[int]:
    """DARE's documented counter hash, element by element in Python integers."""
    import zlib

    key = _fmix32(_fmix32(seed) ^ zlib.crc32(f"{model}:{name}".encode()))
    return [_fmix32(_fmix32((i & 0xFFFFFFFF) ^ key) ^ (i >> 32)) for i in range(numel)]


def _breadcrumbs_mask64(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = d.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.argsort(d.flatten().abs())
    mask = torch.zeros(n, dtype=torch.float64)
    mask[order[n_bot:n_bot + target]] = 1.0
    return mask.view(d.shape)


def _della_mask64(d: torch.Tensor, density: float, eps: float, seed: int, model: int) -> torch.Tensor:
    rows = d if d.dim() == 2 else d.view(1, -1)
    probs = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        order = sorted(range(rows.shape[1]), key=lambda j: abs(float(rows[r, j])))
        for rank, j in enumerate(order):
            probs[r, j] = density - eps + 2 * eps * rank / (rows.shape[1] - 1)
    h = _uniform_hash(d.numel(), seed, NAME, model)
    flat = probs.flatten()
    keep = [1.0 if h[i] >= math.floor((1 - float(flat[i])) * 2**32) else 0.0 for i in range(d.numel())]
    return torch.tensor(keep, dtype=torch.float64).view(d.shape)


def _l1_rescaled(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    masked = d * mask
    return masked * (d.abs().sum() / masked.abs().sum())


def _consensus64(ds: list[torch.Tensor], ws: list[float], normalize: bool) -> torch.Tensor:
    weighted = [w * d for w, d in zip(ws, ds)]
    out = torch.zeros_like(ds[0])
    for idx in range(out.numel()):
        vals = [float(x.flatten()[idx]) for x in weighted]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [k for k, v in enumerate(vals) if v != 0 and math.copysign(1.0, v) == sign]
        num = sum(vals[k] for k in agree)
        den = sum(ws[k] for k in agree)
        out.view(-1)[idx] = num / den if normalize and den != 0 else num
    return out


# ---- the task-vector processor family ----

@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.1), (0.9, 0.2), (1.0, 0.1)])
def test_breadcrumbs(density: float, gamma: float) -> None:
    base, ms, ws = rand(), [rand(), rand()], [0.7, 0.4]
    got = run_method("breadcrumbs", base, ms, {"density": density, "gamma": gamma, "lambda": 1.1},
                     [{"weight": w} for w in ws])
    ds = [m - base for m in ms]
    if density < 1:
        ds = [d * _breadcrumbs_mask64(d, density, gamma) for d in ds]
    assert_close(got, base + 1.1 * sum(w * d for w, d in zip(ws, ds)), *TIGHT)


def test_breadcrumbs_removes_both_tails() -> None:
    d = torch.arange(1, 101, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(50)
    kept = sparsify.sparsify(d, 0.5, "magnitude_outliers", gamma=0.1) != 0
    assert kept.nonzero().flatten().tolist() == list(range(40, 90))  # |d| = 41..90: 40 smallest, 10 largest gone


@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, True)])
def test_breadcrumbs_ties(normalize: bool, rescale: bool) -> None:
    base, ms, ws = rand(), [rand() for _ in range(3)], [1.0, 0.5, 0.8]
    got = run_method("breadcrumbs_ties", base, ms,
                     {"density": 0.6, "gamma": 0.05, "normalize": normalize, "rescale": rescale},
                     [{"weight": w} for w in ws])
    ds = []
    for m in ms:
        d, mask = m - base, _breadcrumbs_mask64(m - base, 0.6, 0.05)
        ds.append(_l1_rescaled(d, mask) if rescale else d * mask)
    assert_close(got, base + _consensus64(ds, ws, normalize), *TIGHT)


@pytest.mark.parametrize("method,normalize", [("della", True), ("della_linear", False), ("della_linear", True)])
def test_della_against_its_definition(method: str, normalize: bool) -> None:
    base, ms, ws, density, eps, seed = rand(), [rand(), rand()], [0.6, 0.9], 0.5, 0.2, 11
    got = run_method(method, base, ms, {"density": density, "epsilon": eps, "seed": seed, "normalize": normalize,
                                        "lambda": 0.8}, [{"weight": w} for w in ws])
    ds = [_l1_rescaled(m - base, _della_mask64(m - base, density, eps, seed, i)) for i, m in enumerate(ms)]
    if method == "della":
        merged = _consensus64(ds, ws, normalize)
    else:
        merged = sum(w * d for w, d in zip(ws, ds)) / (sum(ws) if normalize else 1.0)
    assert_close(got, base + 0.8 * merged, *TIGHT)


def test_della_keeps_large_magnitudes_more_often_and_is_seeded() -> None:
    d = torch.linspace(-1, 1, 200_001, dtype=torch.float64).view(1, -1)
    kept = sparsify.sparsify(d, 0.5, "della_magprune", epsilon=0.3, seed=5, tid=9) != 0
    small, large = d.abs() < 0.2, d.abs() > 0.8
    # expected keep rates: ~0.5 - 0.3 + 0.6 * 0.1 = 0.26 for the smallest fifth, ~0.74 for the largest
    assert abs(float(kept[small].double().mean()) - 0.26) < 0.01
    assert abs(float(kept[large].double().mean()) - 0.74) < 0.01
    again = sparsify.sparsify(d, 0.5, "della_magprune", epsilon=0.3, seed=5, tid=9) != 0
    other = sparsify.sparsify(d, 0.5, "della_magprune", epsilon=0.3, seed=6, tid=9) != 0
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_della_with_tiny_epsilon_draws_the_dare_mask() -> None:
    from mergekit_safe.kernels import reference

    d = rand()
    della = sparsify.keep_random(torch.full(d.shape, 0.7, dtype=torch.float64), d.shape, 3, 42, d.device)
    assert torch.equal(della, reference.dare_keep_mask(d.numel(), 0.3, 3, 42).view(d.shape))


@pytest.mark.parametrize("method", ["magnitude", "random", "magnitude_outliers", "della_magprune"])
def test_sparsify_edges(method: str) -> None:
    d = rand()
    assert torch.equal(sparsify.sparsify(d, 1.0, method), d)
    assert torch.equal(sparsify.sparsify(d, 0.0, method), torch.zeros_like(d))
    with pytest.raises(RecipeError, match="unknown sparsification 'nope'"):
        sparsify.sparsify(d, 0.5, "nope")


def test_magnitude_keeps_the_largest_and_rescale_keeps_the_l1_norm() -> None:
    d = rand()
    kept = sparsify.sparsify(d, 0.25, "magnitude", rescale=True)
    k = int(0.25 * d.numel())
    top = torch.zeros(d.numel(), dtype=torch.bool)
    top[torch.argsort(d.flatten().abs(), descending=True)[:k]] = True
    assert torch.equal(kept.flatten() != 0, top)
    assert_close(kept.abs().sum(), d.abs().sum(), *TIGHT)
    scale = float(d.abs().sum() / d.flatten()[top].abs().sum())
    assert_close(kept.flatten()[top] / d.flatten()[top], torch.full((k,), scale, dtype=torch.float64), *TIGHT)


def test_della_refuses_epsilon_past_the_density() -> None:
    with pytest.raises(RecipeError, match=r"della: density 0.9 \+- epsilon 0.15 must stay inside \(0, 1\)"):
        run_method("della", rand(), [rand()], {"density": 0.9})


def _sce64(base: torch.Tensor, ms: list[torch.Tensor], topk: float) -> torch.Tensor:
    tvs = [m - base for m in ms]
    n = base.numel()
    if topk < 1:
        var = [float(torch.tensor([float(t.flatten()[i]) for t in tvs], dtype=torch.float64).var(unbiased=False))
               for i in range(n)]
        k = int(sum(v != 0 for v in var) * topk)
        keep = torch.zeros(n, dtype=torch.float64)
        keep[sorted(range(n), key=lambda i: -var[i])[:k]] = 1.0
        tvs = [t * keep.view(base.shape) for t in tvs]
    energy = [float((t**2).mean()) for t in tvs]
    w = [e / sum(energy) for e in energy]
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        vals = [float(t.flatten()[i]) for t in tvs]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [k for k, v in enumerate(vals) if v != 0 and math.copysign(1.0, v) == sign]
        den = max(sum(w[k] for k in agree), 1e-6)
        out[i] = sum(w[k] * vals[k] for k in agree) / den
    return base + out.view(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce(topk: float) -> None:
    base, ms = rand(), [rand(), 2 * rand(), rand()]
    assert_close(run_method("sce", base, ms, {"select_topk": topk}), _sce64(base, ms, topk), *TIGHT)


# ---- the geometric family ----

def _model_stock64(base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    offs = [(m - base).flatten() for m in ms]
    cos = [float(a @ b / (a.norm() * b.norm())) for i, a in enumerate(offs) for b in offs[i + 1:]]
    c, n = sum(cos) / len(cos), len(ms)
    t = n * c / (1 + (n - 1) * c)
    return t * sum(ms) / n + (1 - t) * base


def test_model_stock() -> None:
    base = rand()
    shared = rand()
    ms = [base + 0.5 * shared + 0.3 * rand() for _ in range(3)]  # correlated fine-tunes: 0 < t < 1
    assert_close(run_method("model_stock", base, ms, {}), _model_stock64(base, ms), *TIGHT)


def test_model_stock_filter_wise() -> None:
    base, ms = rand(), [rand(), rand()]
    got = run_method("model_stock", base, ms, {"filter_wise": True})
    for r in range(base.shape[0]):
        row = _model_stock64(base[r:r + 1], [m[r:r + 1] for m in ms])
        assert_close(got[r:r + 1], row, *TIGHT, what=f"row {r}")


def _slerp64(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    theta = torch.arccos((v0.flatten() @ v1.flatten()) / (v0.norm() * v1.norm()))
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(with_base: bool) -> None:
    base, m0, m1 = rand(), rand(), rand()
    got = run_method("nuslerp", base if with_base else None, [m0, m1], {}, [{"weight": 1.0}, {"weight": 3.0}])
    if with_base:
        expected = base + _slerp64(m0 - base, m1 - base, 0.75)
    else:
        expected = _slerp64(m0, m1, 0.75)
    assert_close(got, expected, 1e-10, 1e-10)  # arccos and sin of the same angle: a few ulps of float64


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_row(row_wise: bool) -> None:
    m0, m1 = rand(), rand()
    got = run_method("nuslerp", None, [m0, m1], {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise})
    a, b = (m0.T, m1.T) if row_wise else (m0, m1)
    rows = torch.stack([_slerp64(a[r], b[r], 0.5) for r in range(a.shape[0])])
    assert_close(got, rows.T if row_wise else rows, 1e-10, 1e-10)


def test_nuslerp_of_parallel_inputs_is_lerp() -> None:
    a = rand()
    assert_close(run_method("nuslerp", None, [a, 3 * a], {}), 2 * a, *TIGHT)


def _multislerp64(xs: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    ws = [w / sum(ws) for w in ws]
    norms = [x.norm() for x in xs]
    units = [x.flatten() / (n + 1e-8) for x, n in zip(xs, norms)]
    mean = sum(w * u for w, u in zip(ws, units))
    mean = mean / mean.norm()
    tangent = sum(w * (u - (u @ mean) * mean) for w, u in zip(ws, units))
    tn = tangent.norm() + 1e-8
    out = mean * torch.cos(tn) + tangent * torch.sin(tn) / tn
    return (out * sum(w * n for w, n in zip(ws, norms))).view(xs[0].shape)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(with_base: bool) -> None:
    base, ms, ws = rand(), [rand() for _ in range(3)], [0.2, 0.5, 0.3]
    got = run_method("multislerp", base if with_base else None, ms, {}, [{"weight": w} for w in ws])
    expected = base + _multislerp64([m - base for m in ms], ws) if with_base else _multislerp64(ms, ws)
    assert_close(got, expected, 1e-10, 1e-10)  # the Gram route sums in another order; cos/sin of small angles


def test_multislerp_refuses_cancelling_inputs() -> None:
    a = rand()
    with pytest.raises(MergeKitSafeError, match="weighted unit vectors cancel out"):
        run_method("multislerp", None, [a, -a, torch.zeros_like(a)], {}, [{"weight": 1.0}, {"weight": 1.0},
                                                                           {"weight": 0.0}])


def _karcher64(xs: list[torch.Tensor], iters: int, tol: float) -> torch.Tensor:
    norms = [float(x.norm()) for x in xs]
    units = [x.flatten() / n for x, n in zip(xs, norms)]
    a = 1.0 / len(xs)
    mean = sum(a * u for u in units)
    mean = mean / mean.norm()
    for _ in range(iters):
        tangent = torch.zeros_like(mean)
        for u in units:
            theta = float(torch.arccos(torch.clamp(mean @ u, -1, 1)))
            if theta >= tol:
                tangent += a * theta / math.sin(theta) * (u - (mean @ u) * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return (sum(norms) / len(xs) * mean).view(xs[0].shape)


@pytest.mark.parametrize("with_base", [False, True])
def test_karcher(with_base: bool) -> None:
    base, ms = rand(), [rand(), 2 * rand(), rand()]
    inputs = ([base] if with_base else []) + ms
    got = run_method("karcher", base if with_base else None, ms, {"max_iter": 50, "tol": 1e-12})
    assert_close(got, _karcher64(inputs, 50, 1e-12), 1e-10, 1e-10)  # converged fixed point, float64 both sides


def test_karcher_mean_is_equidistant_for_two_inputs() -> None:
    a, b = rand(), rand()
    got = geometry.karcher([a, b], max_iter=100, tol=1e-14).flatten()
    cos_a = float(got @ a.flatten() / (got.norm() * a.norm()))
    cos_b = float(got @ b.flatten() / (got.norm() * b.norm()))
    assert math.isclose(cos_a, cos_b, rel_tol=1e-9)  # the geodesic midpoint


def test_gram_subtracts_the_base_exactly() -> None:
    base, ms = rand(3000), [rand(3000), rand(3000)]
    g = geometry.gram(ms, base, chunk=7)  # many uneven chunks
    ds = torch.stack([(m - base) for m in ms])
    assert_close(g, ds @ ds.T, *TIGHT)


@pytest.mark.parametrize("t", [0.0, 0.3, 5.0])
def test_nearswap(t: float) -> None:
    base, model = rand(), rand()
    got = run_method("nearswap", base, [model], {"t": t})
    expected = torch.empty_like(base)
    for i in range(base.numel()):
        a, b = float(base.flatten()[i]), float(model.flatten()[i])
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        expected.view(-1)[i] = w * b + (1 - w) * a
    assert_close(got, expected, *TIGHT)


def test_nearswap_needs_t() -> None:
    with pytest.raises(RecipeError, match="parameter 't' is required by nearswap"):
        Recipe("nearswap", [ModelSpec("m")], base_model="b").validate()


def test_passthrough_scales() -> None:
    m = rand()
    assert_close(run_method("passthrough", None, [m], {}, [{"scale": 0.5}]), 0.5 * m, *TIGHT)


# ---- through the streaming engine, on real tiny checkpoints ----

@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from mergekit_safe.tiny import save_tiny_pair

    root = tmp_path_factory.mktemp("three")
    base, ft1 = save_tiny_pair(root / "a", seed=4)
    _, ft2 = save_tiny_pair(root / "b", seed=4, scale=0.03)  # same base weights (same seed), another fine-tune
    return base, ft1, ft2


ENGINE_CASES = {
    "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5}, "della": {"density": 0.5, "seed": 1},
    "della_linear": {"density": 0.5}, "sce": {"select_topk": 0.5}, "model_stock": {}, "nuslerp": {},
    "multislerp": {}, "karcher": {}, "nearswap": {"t": 0.01},
}


@pytest.mark.parametrize("method", sorted(ENGINE_CASES))
def test_engine_runs_each_method_per_tensor(method: str, three_models: tuple[Path, Path, Path],
                                            tmp_path: Path) -> None:
    base, ft1, ft2 = three_models
    m = get_method(method)
    models = [ft1] if m.max_models == 1 else [ft1, ft2]
    recipe = Recipe(method, [ModelSpec(str(p)) for p in models], base_model=str(base),
                    parameters=ENGINE_CASES[method])
    merge(recipe, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(p / "model.safetensors") for p in [base, *models]]
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        expected = run_method(method, inputs[0][name].double(), [x[name].double() for x in inputs[1:]],
                              ENGINE_CASES[method], name=name)
        # the engine computes in float32 from float32 inputs: a few float32 ulps of the weights
        assert_close(out[name], expected, 1e-6, 1e-5, what=f"{method} {name}")


# ---- slices (frankenmerges) ----

def _write_recipe(tmp_path: Path, slices: list[tuple[Path, int, int]], extra: str = "") -> Path:
    lines = ["# mergekit-safe merge --config franken.yml -o out", "merge_method: passthrough", "slices:"]
    for model, a, b in slices:
        lines += ["  - sources:", f"      - model: {model}", f"        layer_range: [{a}, {b}]"]
    p = tmp_path / "franken.yml"
    p.write_text("\n".join(lines) + "\n" + extra)
    return p


def test_slices_stack_layers_and_load_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mergekit_safe.merge.recipe import load_recipe
    from mergekit_safe.tiny import save_tiny_pair

    a, b = save_tiny_pair(tmp_path / "in", seed=6)
    before = {p: sorted(f.stat().st_mtime_ns for f in p.iterdir()) for p in (a, b)}
    recipe = load_recipe(_write_recipe(tmp_path, [(a, 0, 2), (b, 1, 2), (a, 0, 1)]))
    merge(recipe, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    srcs = [AutoModelForCausalLM.from_pretrained(p) for p in (a, b)]
    expected_layers = [srcs[0].model.layers[0], srcs[0].model.layers[1], srcs[1].model.layers[1],
                       srcs[0].model.layers[0]]
    for k, src in enumerate(expected_layers):
        got, want = model.model.layers[k].state_dict(), src.state_dict()
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"layer {k} {name}"
    assert torch.equal(model.model.embed_tokens.weight, srcs[0].model.embed_tokens.weight)  # first slice's
    assert torch.equal(model.model.norm.weight, srcs[0].model.norm.weight)  # last slice's model (a)
    assert torch.equal(model.lm_head.weight, srcs[0].lm_head.weight)
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.isfinite(model(ids).logits).all()
    assert before == {p: sorted(f.stat().st_mtime_ns for f in p.iterdir()) for p in (a, b)}  # inputs untouched


def test_slices_take_the_head_from_the_last_model_and_cast(tmp_path: Path) -> None:
    from mergekit_safe.merge.recipe import load_recipe
    from mergekit_safe.tiny import save_tiny_pair

    a, b = save_tiny_pair(tmp_path / "in", seed=7)
    recipe = load_recipe(_write_recipe(tmp_path, [(a, 1, 2), (b, 0, 2)], "dtype: bfloat16\n"))
    merge(recipe, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert out["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(out["lm_head.weight"], sb["lm_head.weight"].bfloat16())
    assert torch.equal(out["model.norm.weight"], sb["model.norm.weight"].bfloat16())
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"].bfloat16())
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], sa["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert not any(k.startswith("model.layers.3.") for k in out)


def test_slices_layer_range_outside_the_model_is_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_safe.cli import main
    from mergekit_safe.tiny import save_tiny_pair

    a, _ = save_tiny_pair(tmp_path / "in", seed=8)
    res = CliRunner().invoke(main, ["merge", "--config", str(_write_recipe(tmp_path, [(a, 1, 5)])),
                                    "-o", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: {a}: layer_range [1, 5] is outside its 2 layers"
    assert not (tmp_path / "out").exists()


def test_random_masks_do_not_depend_on_the_hash_chunk() -> None:
    probs = torch.rand(37, 19, dtype=torch.float64)
    whole = sparsify.keep_random(probs, probs.shape, 4, 77, probs.device)
    assert torch.equal(sparsify.keep_random(probs, probs.shape, 4, 77, probs.device, chunk=50), whole)
    assert torch.equal(sparsify.keep_random(0.3, probs.shape, 4, 77, probs.device, chunk=64),
                       sparsify.keep_random(0.3, probs.shape, 4, 77, probs.device))
