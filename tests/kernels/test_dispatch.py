"""Backend selection and the public functions on both backends (torch reference on CPU, Triton interpreted)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import EPS32, OUT_RTOL, kernel_module, make
from tests.helpers import assert_close

import mergekit_safe.kernels as K
from mergekit_safe.errors import KernelError
from mergekit_safe.kernels import reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_select_backend(monkeypatch):
    x = torch.zeros(3)
    assert K.select_backend(x) == "torch"  # CPU tensors, auto
    with K.use_backend("triton"):
        assert K.select_backend(x) == "triton"  # TRITON_INTERPRET=1 (conftest)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(KernelError, match=r"^backend triton is forced but needs CUDA tensors \(or TRITON_INTERPRET=1"):
            K.select_backend(x)
    with pytest.raises(KernelError, match=r"^backend 'cuda' is not one of auto, torch, triton$"):
        with K.use_backend("cuda"):
            pass


def test_backend_scope_restores_and_ignores_the_environment(monkeypatch):
    """Library code reads no environment variable: only a scope (the CLI opens one from the env) forces a backend."""
    monkeypatch.setenv("MERGEKIT_SAFE_BACKEND", "triton")
    assert K.current_backend() == "auto" and K.select_backend(torch.zeros(3)) == "torch"
    with K.use_backend("torch"):
        with K.use_backend("triton"):
            assert K.current_backend() == "triton"
        assert K.current_backend() == "torch"
    assert K.current_backend() == "auto"
    with pytest.raises(RuntimeError), K.use_backend("triton"):
        raise RuntimeError("unwinds")
    assert K.current_backend() == "auto"


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "triton_available", lambda: False)
    with K.use_backend("triton"), pytest.raises(KernelError, match=r"^backend triton is forced but triton is not installed"):
        K.weighted_sum([torch.zeros(3)], [1.0])


def test_public_names_are_the_dispatch_functions():
    """The kernel files share the functions' names; importing them must not shadow the functions."""
    kernel_module("weighted_sum")
    for name in ("weighted_sum", "dare", "ties", "slerp", "apply_", "foreach_weighted_sum_"):
        assert callable(getattr(K, name)) and getattr(K, name).__module__ == "mergekit_safe.kernels", name


def make_inputs(dtype):
    """Every input of :func:`run_all`, drawn once on the CPU (one RNG stream, whatever device runs the math)."""
    return {
        "abc": [make((1000,), dtype) for _ in range(3)],
        "bases": [make((5, 7), dtype), make((3,), dtype)],
        "deltas": [[make((5, 7), dtype)], [make((3,), dtype)]],
    }


def run_all(inputs, device="cpu", out_dtype=None):
    """Every public kernel on ``inputs`` moved to ``device``; the results stay there."""
    a, b, c = (t.to(device) for t in inputs["abc"])
    bases = [t.to(device) for t in inputs["bases"]]
    deltas = [[d.to(device) for d in ds] for ds in inputs["deltas"]]
    outs = [torch.empty_like(t) for t in bases]
    K.apply_(outs, bases, deltas, [[0.5], [-1.0]])
    return {
        "weighted_sum": K.weighted_sum([a, b, c], [0.2, 0.3, 0.5], out_dtype),
        "dare": K.dare(a, 0.3, 1, 2, True, out_dtype),
        "ties": K.ties([a, b, c], [1.0, 1.0, 1.0], 0.5, True, out_dtype),
        "slerp": K.slerp(a, 0.6 * a + 0.8 * b, 0.3, out_dtype),
        "apply_0": outs[0],
        "apply_1": outs[1],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree(dtype, monkeypatch):
    inputs = make_inputs(dtype)
    ref = run_all(inputs)
    spy = {}
    wsk = kernel_module("weighted_sum")
    real = wsk.weighted_sum
    monkeypatch.setattr(wsk, "weighted_sum", lambda *a, **k: spy.setdefault("called", True) and real(*a, **k))
    with K.use_backend("triton"):
        got = run_all(inputs)
    assert spy.get("called"), "the triton backend did not call the weighted_sum kernel"
    for name in ref:
        # Both are fp32 math of the same values; |values| <= ~10, so 2**-18 absolute covers their fp32
        # differences (order, FMA, fp32-vs-fp64 SLERP stats); plus one output ulp.
        assert_close(got[name], ref[name], atol=2.0**-18, rtol=OUT_RTOL[dtype], what=name)


def test_out_argument_on_both_backends():
    x, y = make((100,), torch.float32), make((100,), torch.float32)
    for backend in ("torch", "triton"):
        with K.use_backend(backend):
            out = torch.empty(100, dtype=torch.bfloat16)
            assert K.weighted_sum([x, y], [0.5, 0.5], out=out) is out
        assert_close(out, 0.5 * x.double() + 0.5 * y.double(), atol=3 * EPS32, rtol=OUT_RTOL[torch.bfloat16])


def test_float64_goes_to_reference_unless_triton_is_forced():
    x = torch.randn(10, dtype=torch.float64)
    assert torch.equal(K.weighted_sum([x], [2.0]), reference.weighted_sum([x], [2.0]))
    with K.use_backend("triton"), pytest.raises(
            KernelError, match=r"^weighted_sum: backend triton is forced but the kernels take float32"):
        K.weighted_sum([x], [2.0])


def test_cpu_and_device_runs_see_the_same_inputs():
    """What test_cuda_matches_reference relies on: inputs are made once and moved, not redrawn per device."""
    inputs = make_inputs(torch.float32)
    first = run_all(inputs)
    torch.randn(100)  # a different RNG position must not matter: nothing is drawn inside run_all
    second = run_all(inputs, device="cpu")
    for name in first:
        assert torch.equal(first[name], second[name]), name


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    """Real compiled kernels on a GPU against the CPU reference on the very same inputs (made on the CPU, moved)."""
    inputs = make_inputs(dtype)
    ref = run_all(inputs)
    got = run_all(inputs, device="cuda")
    assert K.select_backend(got["weighted_sum"]) == ("triton" if K.triton_available() else "torch")
    for name in ref:
        assert got[name].device.type == "cuda", name
        assert_close(got[name].cpu(), ref[name], atol=2.0**-18, rtol=OUT_RTOL[dtype], what=name)


@cuda
@pytest.mark.gpu
def test_cuda_weighted_sum_reaches_copy_bandwidth():
    """Weighted sum of 2 bf16 inputs at 256 MB each: >= 85% of a device-to-device copy's bandwidth."""
    import triton.testing

    n = 128 * 2**20
    a, b = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    t_ws = triton.testing.do_bench(lambda: K.weighted_sum([a, b], [0.5, 0.5], out=out))
    t_copy = triton.testing.do_bench(lambda: out.copy_(a))
    ws_gbps, copy_gbps = 3 * a.nbytes / t_ws, 2 * a.nbytes / t_copy
    assert ws_gbps >= 0.85 * copy_gbps, f"weighted_sum {ws_gbps / 1e6:.0f} GB/s vs copy {copy_gbps / 1e6:.0f} GB/s"
