"""Papercuts a new user hit (issue 9): each fixed behaviour checked against an independent reference."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_safe.cli import main
from mergekit_safe.eval.report import wilson_interval


def _wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson bounds as the roots of (p - phat)^2 = z^2 p (1 - p) / n, solved in exact rationals + sqrt."""
    phat, z2, nn = Fraction(k, n), Fraction(z) ** 2, Fraction(n)
    a = 1 + z2 / nn
    b = -(2 * phat + z2 / nn)
    c = phat * phat
    disc = b * b - 4 * a * c  # exactly 0 -> bounds, never negative
    root = math.sqrt(disc)
    return float((-b - Fraction(root)) / (2 * a)), float((-b + Fraction(root)) / (2 * a))


@pytest.mark.parametrize("n", [1, 7, 10, 300, 10_000])
def test_wilson_ends_are_exact_and_inside_unit_interval(n: int) -> None:
    lo0, hi0 = wilson_interval(0, n)
    assert lo0 == 0.0  # was 3.5e-18 at k=0: a lower bound above the rate 0.0
    lon, hin = wilson_interval(n, n)
    assert hin == 1.0
    for k in sorted({0, 1, n // 2, n - 1, n}):
        lo, hi = wilson_interval(k, n)
        rlo, rhi = _wilson_reference(k, n, 1.959963984540054)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
        assert lo == pytest.approx(rlo, abs=1e-12) and hi == pytest.approx(rhi, abs=1e-12)
    assert hi0 == pytest.approx(_wilson_reference(0, n, 1.959963984540054)[1], abs=1e-12)
    assert lon == pytest.approx(_wilson_reference(n, n, 1.959963984540054)[0], abs=1e-12)


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size"])
def test_eval_generation_flags_have_help(flag: str) -> None:
    from mergekit_safe.eval.command import eval_command

    option = next(p for p in eval_command.params if flag in getattr(p, "opts", ()))
    assert option.help and len(option.help.split()) >= 4, option.help
    assert f"{flag} INTEGER" in CliRunner().invoke(main, ["eval", "--help"]).output


def test_every_warning_is_printed_once(tmp_path: Path, tiny_pair: tuple[Path, Path]) -> None:
    nan = tmp_path / "nan"
    shutil.copytree(tiny_pair[1], nan)
    state = load_file(nan / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(state, nan / "model.safetensors", metadata={"format": "pt"})
    # a real process: logging's handlers are configured only outside pytest's capture
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "mergekit_safe", "merge", "--method", "lerp", "--alpha", "0.5",
                           str(tiny_pair[0]), str(nan), "-o", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "has NaN or Inf values" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), proc.stderr
    assert "WARNING" not in proc.stderr
