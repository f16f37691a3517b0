"""Every registered merge method against an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_safe.errors import RecipeError
from mergekit_safe.kernels import reference
from mergekit_safe.merge.methods import METHODS, TensorJob, ema_coefficients, get_method
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from tests.helpers import assert_close

SHAPE = (37, 19)  # not a power of two


def run_method(method: str, base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
               model_params: list[dict] | None = None, name: str = "model.layers.0.mlp.up_proj.weight") -> torch.Tensor:
    """Apply a registered method to in-memory float64 tensors the way the engine does."""
    specs = [ModelSpec(f"m{i}", (model_params or [{}] * len(models))[i]) for i in range(len(models))]
    recipe = Recipe(method, specs, base_model="base" if base is not None else None, parameters=params).validate()
    m = recipe.method
    resolved = recipe.resolve(name, num_layers=2)
    if m.linear:
        inputs = ([base] if base is not None else []) + models
        return reference.weighted_sum(inputs, m.coefficients(resolved, base is not None, len(models)))
    return m.combine(TensorJob(name, base, models, resolved, torch.float64))


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*(shape or SHAPE), dtype=torch.float64)


def test_registry_lists_every_method() -> None:
    assert set(METHODS) == {"lerp", "ema", "linear", "task_arithmetic", "safety_vector", "slerp", "ties",
                            "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                            "sce", "model_stock", "nuslerp", "multislerp", "karcher", "nearswap", "passthrough",
                            "safe_lora", "safemerge"}
    with pytest.raises(RecipeError, match="unknown merge_method 'nope'; choose one of breadcrumbs, breadcrumbs_ties, dare_linear"):
        get_method("nope")


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 1.5])
def test_lerp(alpha: float) -> None:
    pre, post = rand(), rand()
    assert_close(run_method("lerp", pre, [post], {"alpha": alpha}), (1 - alpha) * pre + alpha * post, 1e-12, 1e-12)


@pytest.mark.parametrize("with_start", [True, False])
def test_ema_matches_the_recursion(with_start: bool) -> None:
    beta, ckpts = 0.7, [rand() for _ in range(4)]
    start = rand() if with_start else None
    e = start if with_start else ckpts[0]
    for c in ckpts if with_start else ckpts[1:]:
        e = beta * e + (1 - beta) * c
    assert_close(run_method("ema", start, ckpts, {"beta": beta}), e, 1e-12, 1e-12)


def test_ema_coefficients_sum_to_one() -> None:
    for n, start in [(1, True), (1, False), (5, True), (7, False)]:
        assert math.isclose(sum(ema_coefficients(n, 0.93, start)), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize: bool) -> None:
    ms, ws = [rand() for _ in range(3)], [0.2, 0.5, 1.3]
    expected = sum(w * m for w, m in zip(ws, ms)) / (sum(ws) if normalize else 1.0)
    got = run_method("linear", None, ms, {"normalize": normalize}, [{"weight": w} for w in ws])
    assert_close(got, expected, 1e-12, 1e-12)


def test_task_arithmetic() -> None:
    base, ms, ws = rand(), [rand(), rand()], [0.4, 0.9]
    expected = base + 0.8 * sum(w * (m - base) for w, m in zip(ws, ms))
    got = run_method("task_arithmetic", base, ms, {"lambda": 0.8}, [{"weight": w} for w in ws])
    assert_close(got, expected, 1e-12, 1e-12)


def test_safety_vector() -> None:
    ft, aligned, unaligned = rand(), rand(), rand()
    got = run_method("safety_vector", ft, [aligned, unaligned], {"scale": 0.6})
    assert_close(got, ft + 0.6 * (aligned - unaligned), 1e-12, 1e-12)


def _slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    ua, ub = a.flatten() / a.norm(), b.flatten() / b.norm()
    omega = torch.arccos(torch.clamp(ua @ ub, -1, 1))
    if abs(float(ua @ ub)) > 0.9995:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp(t: float) -> None:
    a, b = rand(), rand()
    assert_close(run_method("slerp", a, [b], {"t": t}), _slerp64(a, b, t), 1e-10, 1e-10)


def test_slerp_falls_back_to_lerp_when_parallel() -> None:
    a = rand()
    b = 2.0 * a + 1e-6 * rand()
    assert_close(run_method("slerp", a, [b], {"t": 0.3}), 0.7 * a + 0.3 * b, 1e-12, 1e-12)


def _ties64(base: torch.Tensor, ms: list[torch.Tensor], ws: list[float], density: float, lam: float,
            normalize: bool) -> torch.Tensor:
    # Independent of the package: trim with a sort, elect with an explicit loop over models.
    trimmed = []
    for m, w in zip(ms, ws):
        d = (m - base).flatten()
        k = int(density * d.numel())
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[torch.argsort(d.abs(), descending=True)[:k]] = True
        trimmed.append(torch.where(keep, d, 0.0) * w)
    total = sum(trimmed)
    sign = torch.sign(total)
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for tr, w in zip(trimmed, ws):
        agree = (torch.sign(tr) == sign) & (tr != 0)
        num += torch.where(agree, tr, 0.0)
        den += torch.where(agree, torch.full_like(tr, w), 0.0)
    merged = num / torch.where(den == 0, 1.0, den) if normalize else num
    return base + lam * merged.view(base.shape)


@pytest.mark.parametrize("density,normalize", [(0.2, True), (0.5, False), (1.0, True)])
def test_ties(density: float, normalize: bool) -> None:
    base, ms, ws = rand(), [rand() for _ in range(3)], [1.0, 0.5, 0.8]
    got = run_method("ties", base, ms, {"lambda": 0.9, "normalize": normalize, "density": density},
                     [{"weight": w} for w in ws])
    assert_close(got, _ties64(base, ms, ws, density, 0.9, normalize), 1e-12, 1e-12)


def test_dare_keep_rate_and_rescale() -> None:
    base = torch.zeros(200_000, dtype=torch.float64)
    model = torch.ones_like(base)
    p = 0.3
    got = run_method("dare_linear", base, [model], {"density": 1 - p, "seed": 7}, name="w")
    kept = got != 0
    # survivors are rescaled by exactly 1/(1-p)
    assert torch.allclose(got[kept], torch.full_like(got[kept], 1 / (1 - p)), rtol=0, atol=1e-12)
    n, rate = base.numel(), float(kept.double().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate} vs {1 - p} +- {5 * sigma}"


def test_dare_is_seeded_and_deterministic() -> None:
    base, model = rand(), rand()
    a = run_method("dare_linear", base, [model], {"density": 0.5, "seed": 1})
    b = run_method("dare_linear", base, [model], {"density": 0.5, "seed": 1})
    c = run_method("dare_linear", base, [model], {"density": 0.5, "seed": 2})
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_linear_and_dare_ties_against_their_definition() -> None:
    base, ms, ws, density, seed = rand(), [rand(), rand()], [0.6, 0.4], 0.7, 3
    name = "model.layers.1.self_attn.q_proj.weight"
    dropped = [reference.dare(m - base, 1 - density, seed, reference.tensor_id(name, i)) for i, m in enumerate(ms)]
    lin = run_method("dare_linear", base, ms, {"density": density, "seed": seed}, [{"weight": w} for w in ws], name)
    assert_close(lin, base + sum(w * d for w, d in zip(ws, dropped)), 1e-12, 1e-12)
    ties = run_method("dare_ties", base, ms, {"density": density, "seed": seed}, [{"weight": w} for w in ws], name)
    expected = _ties64(torch.zeros_like(base), [d for d in dropped], ws, 1.0, 1.0, True)
    assert_close(ties, base + expected, 1e-12, 1e-12)


# --- chunked (streamed) methods: the engine's path must equal the whole-tensor result

from mergekit_safe.merge.methods import MAX_ABS_VALUE  # noqa: E402
from mergekit_safe.merge.streaming import TensorsStream, chunk_deltas, magnitude_thresholds, run_whole  # noqa: E402


def _chunked(method: str, base: torch.Tensor, models: list[torch.Tensor], params: dict, model_params: list[dict],
             chunk: int | None, name: str = "model.layers.0.mlp.up_proj.weight") -> torch.Tensor:
    specs = [ModelSpec(f"m{i}", model_params[i]) for i in range(len(models))]
    recipe = Recipe(method, specs, base_model="base", parameters=params).validate()
    stream = recipe.method.stream
    assert stream is not None, f"{method} does not stream"
    out_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    return run_whole(stream, name, base, models, recipe.resolve(name, 2), out_dtype, chunk)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3, "normalize": True}), ("ties", {"density": 0.9, "normalize": False}),
    ("dare_linear", {"density": 0.6, "seed": 5}), ("dare_ties", {"density": 0.4, "seed": 9}),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [30, 100])
def test_chunked_equals_whole_tensor_bit_for_bit(method: str, params: dict, dtype: torch.dtype, chunk: int) -> None:
    # an exact selection and elementwise steps: no rounding may depend on the chunk size
    base = torch.randn(13, 11).to(dtype)
    models = [(base.double() + 0.1 * torch.randn(13, 11, dtype=torch.float64)).to(dtype) for _ in range(3)]
    models[1].view(-1)[::7] = base.view(-1)[::7]  # zero deltas: magnitude ties at the threshold
    mp = [{"weight": w} for w in (1.0, 0.5, 0.8)]
    whole = _chunked(method, base, models, params, mp, None)
    got = _chunked(method, base, models, params, mp, chunk)
    assert torch.equal(got, whole), f"{method} chunk={chunk}: {int((got != whole).sum())} elements differ"


@pytest.mark.parametrize("chunk", [64, 500])
def test_chunked_slerp_matches_float64_reference(chunk: int) -> None:
    a, b = rand(), rand()
    got = _chunked("slerp", a, [b], {"t": 0.3}, [{}], chunk)
    assert_close(got, _slerp64(a, b, 0.3), 1e-10, 1e-10)  # float64 sums: only the summation order differs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_threshold_equals_kthvalue(dtype: torch.dtype) -> None:
    x = torch.randn(2000, dtype=dtype)
    x[::11] = 0.0
    x[1::13] = -0.0
    x[2::17] = x[3]  # many equal magnitudes
    x[5] = float("inf")
    x[6] = float("-inf")
    zeros = torch.zeros_like(x)
    densities = [0.0, 1 / 2000, 0.001, 0.25, 0.5, 0.77, 0.999, 1.0]
    for chunk in (61, 512, 1999):
        stream = TensorsStream("w", zeros, [x] * len(densities), chunk)
        got = magnitude_thresholds(stream, chunk_deltas, densities)
        want = [reference.magnitude_threshold(x, rho) for rho in densities]
        assert [struct_bits(g) for g in got] == [struct_bits(w) for w in want], (chunk, got, want)


def test_radix_threshold_sorts_nan_like_kthvalue() -> None:
    x = torch.randn(300)
    x[::50] = float("nan")
    stream = TensorsStream("w", torch.zeros_like(x), [x, x], 16)
    got = magnitude_thresholds(stream, chunk_deltas, [0.01, 0.5])
    want = [reference.magnitude_threshold(x, rho) for rho in (0.01, 0.5)]
    assert math.isnan(got[0]) and math.isnan(want[0]) and got[1] == want[1]


def struct_bits(v: float) -> str:
    return float(v).hex()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_slerp_on_nonfinite_input_falls_back_to_lerp(bad: float) -> None:
    a, b = rand(), rand()
    a[3, 4] = bad
    got = run_method("slerp", a, [b], {"t": 0.25})  # no ZeroDivisionError: no angle exists, so lerp
    ok = torch.ones_like(a, dtype=torch.bool)
    ok[3, 4] = False
    assert_close(got[ok], (0.75 * a + 0.25 * b)[ok], 1e-12, 1e-12)
    assert not torch.isfinite(got[3, 4])  # the bad value reaches the output, where the engine names the file


@pytest.mark.parametrize("value,message", [
    (1e300, f"alpha=1e+300 is outside [{-MAX_ABS_VALUE}, {MAX_ABS_VALUE}]"),
    (float("nan"), "alpha must be a finite number, got nan"),
    (float("inf"), "alpha must be a finite number, got inf"),
    (10**400, "alpha must be a finite number, got 1000000000"),
])
def test_absurd_numbers_are_rejected(value: float, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        Recipe("lerp", [ModelSpec("b")], base_model="a", parameters={"alpha": value}).validate()
    assert message in str(e.value)
    assert len(str(e.value)) < 300


def test_seed_must_be_a_32_bit_whole_number() -> None:
    for seed, message in [(0.5, "seed must be a whole number"), (2**32, "is outside [0, 4294967295]")]:
        with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            Recipe("dare_linear", [ModelSpec("b")], base_model="a", parameters={"seed": seed}).validate()
