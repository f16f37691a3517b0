"""benchmarks/gpu_check.sh in its --dry-run mode (toy sizes on the CPU), and its table on failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_prints_one_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--steps", "tests,ema,eval",
                        "--work-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("check ")))
    body = lines[start + 2:]
    assert any(ln.startswith("gpu-marked tests") and "skipped" in ln for ln in body)  # no CUDA here: skipped
    ema = json.loads((tmp_path / "ema.json").read_text())
    adamw = next(r["median_ms"] for r in ema if r["provider"] == "adamw")
    upd = next(r["median_ms"] for r in ema if r["provider"] == "ParameterEMA.update")
    assert "EMA update [ParameterEMA.update]" in p.stdout and f"{100 * upd / adamw:.1f}% of AdamW step" in p.stdout
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert set(ev["providers"]) == {"batched", "fast"} and ev["providers"]["fast"]["texts_identical"] == 3
    assert f"{ev['providers']['fast']['prompts_per_s']:.1f} prompts/s" in p.stdout


def test_table_reports_a_failed_step_as_a_row():
    results = {"tests": {"rc": 1, "tail": ["1 failed, 2 passed in 3.0s"], "json": None},
               "merge": {"rc": 124, "tail": ["timed out after 150 s"], "json": None},
               "ema": {"rc": 0, "tail": [], "json": [{"provider": "adamw", "median_ms": 4.0},
                                                     {"provider": "kernel", "median_ms": 0.1}]}}
    lines = gpu_check.table(results).splitlines()
    assert lines[2].split() == ["gpu-marked", "tests", "1", "failed,", "2", "passed", "in", "3.0s"]
    assert lines[3].split()[:3] == ["merge", "FAILED", "rc=124"] and lines[3].endswith("timed out after 150 s")
    assert lines[4].split() == ["EMA", "update", "[kernel]", "0.100", "ms", "2.5%", "of", "AdamW", "step", "(4.00",
                                "ms)"]


def test_table_shows_the_testbed_build_per_stage():
    manifest = {"device": "cuda", "build_seconds": 181.4,
                "stages": {"base": {"seconds": 20.0}, "data": {"seconds": 11.2}, "aligned": {"seconds": 70.1},
                           "finetune": {"seconds": 80.1}}}
    line = gpu_check.table({"testbed": {"rc": 0, "tail": [], "json": manifest}}).splitlines()[2]
    assert line.split() == ["testbed", "build", "[cuda]", "181", "s", "base", "20", "s,", "data", "11", "s,",
                            "aligned", "70", "s,", "finetune", "80", "s"]


def test_package_view_makes_kernels_importable_without_install(tmp_path):
    root = gpu_check.package_root(tmp_path, force_view=True)
    assert root == tmp_path / "src"
    code = "import mergekit_safe.kernels, mergekit_safe.eval; print(mergekit_safe.kernels.__file__)"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith(str(tmp_path / "src" / "mergekit_safe" / "kernels"))
    assert gpu_check.package_root(tmp_path, force_view=True) == root  # idempotent
