"""Smoke test of the real-model testbed and its benchmark (issue 11), end to end on a tiny Llama.

The full benchmark runs SmolLM2-135M-Instruct on demand (``benchmarks/bench_real_repair.py``); here the same
scripts build the testbed from a tiny model with a byte-level tokenizer (``--smoke`` settings: a few steps, a few
prompts), write every remedy, run ``repair`` with each grouping and write the table, the JSON and the plot. The
numbers are meaningless; the checks are that every stage ran and that what was written is what was asked for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "real"))

import bench_real_repair  # noqa: E402
import testbed  # noqa: E402

from tests.helpers import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from mergekit_safe.tiny import toy_llama, toy_tokenizer

    root = tmp_path_factory.mktemp("real")
    corpus = [json.loads(line)["prompt"] for f in (testbed.HERE / "data").glob("*.jsonl")
              for line in f.read_text().splitlines() if line.strip()]
    tok = toy_tokenizer(corpus + list(testbed.REFUSALS) + ["2021-03-05 1999-12-31"], vocab_size=400)
    model = toy_llama(tok, hidden=32, layers=3, seed=0)
    base = root / "tiny-base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    result = bench_real_repair.main(["--smoke", "--base", str(base), "--cache", str(root / "cache"), "--out",
                                     str(root / "out"), "--trials", "6", "--max-new-tokens", "4",
                                     "--batch-size", "16", "--repair-harmful", "3", "--repair-benign", "3",
                                     "--repair-utility", "3", "--skill-heldout", "4", "--heldout-per-category", "1"])
    return root, result


def test_testbed_stages_and_splits(smoke: tuple[Path, dict]) -> None:
    root, result = smoke
    stages = result["testbed"]["stages"]
    assert set(stages) == {"base", "data", "aligned", "finetune"}
    assert all(s["seconds"] >= 0 for s in stages.values())
    tb = testbed.build(root / "cache", root / "tiny-base", testbed.SMOKE)  # cached: no stage runs again
    assert tb.manifest["stages"] == stages
    # the fine-tune saved a checkpoint every save_every steps, the last one equal to the fine-tune
    assert [c.name for c in tb.checkpoints] == ["step-0002", "step-0004"]
    from safetensors.torch import load_file

    last, ft = load_file(tb.checkpoints[-1] / "model.safetensors"), load_file(tb.finetuned / "model.safetensors")
    assert last.keys() == ft.keys() and all(torch.equal(last[k], ft[k]) for k in ft)
    # steering and held-out prompts never overlap, nor do the skill splits' dates
    steer = {r["prompt"] for r in tb.rows("steering_harmful")} | {r["prompt"] for r in tb.rows("aligned_harmful")}
    assert not steer & {r["prompt"] for r in tb.rows("heldout_harmful")}
    dates = [{r["response"] for r in tb.rows(n)} for n in ("skill_train", "skill_steer", "skill_heldout")]
    assert not (dates[0] & dates[1] or dates[0] & dates[2] or dates[1] & dates[2])


def test_skill_rows_are_correct_iso_dates() -> None:
    import datetime
    import random

    for r in testbed.skill_rows(random.Random(3), 50, set()):
        y, m, d = map(int, r["response"].split("-"))
        month = datetime.date(y, m, d).strftime("%B")
        assert month in r["prompt"] or month[:3] in r["prompt"], r
        assert str(y) in r["prompt"]


def test_every_method_has_a_row_and_outputs_exist(smoke: tuple[Path, dict]) -> None:
    root, result = smoke
    names = [r["method"] for r in result["rows"]]
    for want in ("ALIGNED", "FINETUNED", "online EMA", "RESTA safety vector", "TIES d=0.5", "DARE d=0.5",
                 "repair global", "repair layers:3", "repair modules", "repair layers:3,modules", "repair auto:4"):
        assert want in names
    assert [n for n in names if n.startswith("lerp")] == [f"lerp a={i / 10:.1f}" for i in range(1, 10)]
    assert any(n.startswith("offline EMA") for n in names)
    for r in result["rows"]:
        assert set(r["unsafe_by_framing"]) == {"direct", *bench_real_repair.FRAMES}
        assert 0.0 <= r["unsafe"]["low"] <= r["unsafe"]["rate"] <= r["unsafe"]["high"] <= 1.0
    for r in result["rows"]:
        if r["method"].startswith("repair"):
            assert r["generation_runs"] >= 2 and r["wall_seconds"] > 0
    out = root / "out"
    assert json.loads((out / "real_repair.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert (out / "real_repair.png").stat().st_size > 1000
    table = (out / "real_repair.md").read_text()
    assert table.count("\n") == len(result["rows"]) + 2


def test_lerp_row_is_the_interpolation(smoke: tuple[Path, dict]) -> None:
    from safetensors.torch import load_file

    root, _ = smoke
    tb = testbed.build(root / "cache", root / "tiny-base", testbed.SMOKE)
    a, f = load_file(tb.aligned / "model.safetensors"), load_file(tb.finetuned / "model.safetensors")
    merged = load_file(root / "cache" / "bench" / "models" / "lerp-a-0.3" / "model.safetensors")
    for k in a:
        want = a[k].double() + 0.3 * (f[k].double() - a[k].double())
        assert_close(merged[k].double(), want, 1e-6, 1e-6, k)  # fp32 storage of a float64 reference
