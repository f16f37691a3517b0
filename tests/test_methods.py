"""Every registered merge method against an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_safe.errors import RecipeError
from mergekit_safe.kernels import reference
from mergekit_safe.merge.methods import METHODS, TensorJob, ema_coefficients, get_method
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from tests.conftest import assert_close

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
                            "dare_linear", "dare_ties", "safe_lora", "safemerge"}
    with pytest.raises(RecipeError, match="unknown merge_method 'nope'; choose one of dare_linear, dare_ties"):
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
