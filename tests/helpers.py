"""The one close-check of the test suite: it says where, how many and by how much tensors differ."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float | torch.Tensor = 0.0, rtol: float = 0.0,
                 what: str = "") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, in float64.

    A NaN matches a NaN at the same place (both sides produced the same non-value); anything else against a
    NaN fails. ``atol`` may be a tensor of ``expected``'s shape (a per-element bound).

    On failure the message says how many elements differ out of how many, and lists the first ones with
    their index, both values and the allowed error.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    e = expected.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if torch.is_tensor(atol):
        atol_t = atol.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:
        atol_t = torch.full_like(e, float(atol))
    allowed = atol_t + rtol * e.abs()
    err = (a - e).abs()
    bad = ~(err <= allowed) & ~(a.isnan() & e.isnan())
    if bad.any():
        idx = bad.nonzero().reshape(-1)
        rows = [
            f"  [{i}] got {a[i].item():.9g} expected {e[i].item():.9g} |diff| {err[i].item():.3g} "
            f"allowed {allowed[i].item():.3g}"
            for i in idx[:8].tolist()
        ]
        raise AssertionError(
            f"{what}: {idx.numel()} of {e.numel()} elements differ (shape {tuple(actual.shape)}, max |diff| "
            f"{err[idx].max().item():.3g}); first:\n" + "\n".join(rows)
        )
