"""Fault injection: merge and ema killed (SIGKILL, SIGTERM) or hitting a full disk (ENOSPC, EDQUOT) at seeded
random points, and two writers publishing to one output at the same moment.

Every case asserts: the inputs are byte-identical (sha256), the output is absent or complete (loads with
safetensors and equals the reference merge, itself checked against float64 math), nothing else is left in
the parent folder (a SIGKILLed run may leave only its own partial folder, which the next run removes), and a
clean rerun succeeds. The faults fire at the steps that change the disk (tests/_fault_driver.py); all runs are
forked from one driver process, so the suite costs a few seconds of CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mergekit_safe.io.publish import MANIFEST
from mergekit_safe.tiny import llama_shapes, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
POINTS_PER_KIND = 3
KINDS = ("SIGKILL", "SIGTERM", "ENOSPC", "EDQUOT")
BETA = 0.5


def sha256_tree(folders: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a published output, read with safetensors' own reader."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def drive(jobs: list[dict[str, Any]], work: Path) -> list[dict[str, int]]:
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "tests" / "_fault_driver.py"), str(work / "jobs.json"),
                    str(work / "results.json")], check=True, env=env, timeout=600)
    return json.loads((work / "results.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three small fp32 checkpoints (several shards each), the clean runs' references and event counts."""
    root = tmp_path_factory.mktemp("faults")
    shapes = llama_shapes(hidden=64, layers=2, vocab=256)
    ckpts = [write_random_checkpoint(root / "in" / f"c{i}", shapes, i, dtype=torch.float32, hidden=64,
                                     max_shard_size=40_000) for i in range(3)]
    commands = {
        "merge": ["merge", "--method", "lerp", "--alpha", "0.5", str(ckpts[0]), str(ckpts[1])],
        "ema": ["ema", *map(str, ckpts), "--beta", str(BETA)],
    }
    common = ["--max-shard-size", "30KB", "--no-progress"]
    (root / "logs").mkdir()
    jobs = [{"args": [*args, "-o", str(root / "ref" / name), *common], "fault": None,
             "log": str(root / "logs" / f"ref-{name}")} for name, args in commands.items()]
    results = drive(jobs, root)
    assert [r["rc"] for r in results] == [0, 0], [Path(j["log"]).read_text() for j in jobs]
    c = [load_dir(p) for p in ckpts]
    refs = {name: load_dir(root / "ref" / name) for name in commands}
    # the references against float64 math: lerp 0.5, and EMA e_t = b e_(t-1) + (1 - b) c_t from e_0 = c_0
    weights = {"merge": [(0, 0.5), (1, 0.5)], "ema": [(0, BETA**2), (1, BETA * (1 - BETA)), (2, 1 - BETA)]}
    for name, ws in weights.items():
        assert sorted(refs[name]) == sorted(c[0])
        for k, t in refs[name].items():
            want = sum(w * c[i][k].double() for i, w in ws)
            # an fp32 weighted sum of n terms errs by at most ~n eps32 sum_i |w_i x_i| (the standard summation
            # bound: relative to the terms, not to a result that may cancel)
            bound = len(ws) * torch.finfo(torch.float32).eps * sum(abs(w) * c[i][k].double().abs() for i, w in ws)
            err = (t.double() - want).abs()
            assert bool((err <= bound).all()), (name, k, float(err.max()))
    return {"root": root, "inputs": ckpts, "hashes": sha256_tree([root / "in"]), "commands": commands,
            "common": common, "refs": refs, "events": {n: r["events"] for n, r in zip(commands, results)}}


def check_case(setup: dict[str, Any], case: dict[str, Any], rc: int, *, rerun: bool) -> None:
    """The guarantees after one run: inputs intact, output absent or complete, no strays."""
    assert sha256_tree([setup["root"] / "in"]) == setup["hashes"], case
    parent, out = Path(case["dir"]), Path(case["out"])
    log = Path(case["log"]).read_text()
    assert "Traceback" not in log, (case, log)
    if out.exists():
        got = load_dir(out)
        ref = setup["refs"][case["command"]]
        assert sorted(got) == sorted(ref), case
        assert all(torch.equal(got[k], ref[k]) for k in ref), case
        listed = json.loads((out / MANIFEST).read_text())["files"]
        assert sorted(listed + [MANIFEST]) == sorted(os.listdir(out)), case
    kind = None if rerun else case["kind"]
    entries = sorted(os.listdir(parent))
    if kind == "SIGKILL":
        # only the killed run's own parent folder and partial folder may remain (removed by the next run)
        inner = sorted(os.listdir(parent / "sub")) if entries == ["sub"] else []
        assert entries in ([], ["sub"]), (case, entries)
        assert all(e == "out" or e.startswith(".out.partial-") for e in inner), (case, inner)
        return
    assert entries == (["sub"] if out.exists() else []), (case, entries)
    if out.exists():
        assert os.listdir(parent / "sub") == ["out"], case
    if rerun:
        assert rc == 0, (case, log)
    elif kind == "SIGTERM":
        assert rc == 130 and log.strip().splitlines()[-1].startswith("interrupted"), (case, rc, log)
        # either no output, or the signal came after the publishing rename and the output is complete
    else:
        errors = [line for line in log.splitlines() if line.startswith("Error:")]
        assert rc == 1 and len(errors) == 1 and "disk full" in errors[0], (case, rc, log)
        assert not out.exists(), case


def test_kill_and_disk_full_at_random_points(setup: dict[str, Any]) -> None:
    root, rng = setup["root"], random.Random(SEED)
    cases, jobs = [], []
    for command, args in setup["commands"].items():
        total = setup["events"][command]
        assert total > 20, total  # enough distinct points: headers, tensor pieces, side files, publish
        for kind in KINDS:
            # every step is two events, before (odd) and after (even); a full disk fails a step before it acts
            points = range(1, total + 1, 2) if kind in ("ENOSPC", "EDQUOT") else range(1, total + 1)
            chosen = set(rng.sample(points, POINTS_PER_KIND))
            if kind in ("SIGKILL", "SIGTERM"):  # always also: around making the staging folder and publishing it
                chosen |= {1, 2, total - 1, total}
            for at in sorted(chosen):
                parent = root / "cases" / f"{command}-{kind}-{at}"
                parent.mkdir(parents=True)
                out = parent / "sub" / "out"  # sub/ is made by the run: it must go again on failure
                case = {"command": command, "kind": kind, "at": at, "dir": str(parent), "out": str(out),
                        "log": str(root / "logs" / parent.name)}
                cases.append(case)
                jobs.append({"args": [*args, "-o", str(out), *setup["common"]], "log": case["log"],
                             "fault": {"kind": kind, "at": at}})
    results = drive(jobs, root)
    table = []
    for case, res in zip(cases, results):
        check_case(setup, case, res["rc"], rerun=False)
        table.append((case["command"], case["kind"], case["at"], res["rc"], Path(case["out"]).exists()))
    # a clean rerun to each output: stale partials of killed runs are removed, a complete output is replaced
    reruns = [{"args": [*setup["commands"][c["command"]], "-o", c["out"], *setup["common"]]
               + (["--overwrite"] if Path(c["out"]).exists() else []), "fault": None, "log": c["log"] + "-rerun"}
              for c in cases]
    for case, res in zip(cases, drive(reruns, root)):
        check_case(setup, dict(case, log=case["log"] + "-rerun"), res["rc"], rerun=True)
    print("\ncommand kind at rc output_published")
    for row in table:
        print(*row)


@pytest.mark.parametrize("command", ["merge", "ema"])
def test_two_writers_to_one_output_give_one_result_and_one_error(setup: dict[str, Any], command: str) -> None:
    root = setup["root"] / f"concurrent-{command}"
    (root / "barrier").mkdir(parents=True)
    (root / "dir").mkdir()
    out = root / "dir" / "sub" / "out"
    jobs = [{"args": [*setup["commands"][command], "-o", str(out), *setup["common"]], "fault": None, "group": 0,
             "log": str(root / f"log{i}"), "barrier": {"dir": str(root / "barrier"), "parties": 2}}
            for i in range(2)]
    results = drive(jobs, root)
    assert sorted(r["rc"] for r in results) == [0, 1], results
    loser = jobs[[r["rc"] for r in results].index(1)]
    errors = [line for line in Path(loser["log"]).read_text().splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {out}: appeared while this run was writing (another run or a new folder); it was "
                      "left alone and this run's output was discarded"]
    for job in jobs:
        check_case(setup, {"command": command, "dir": str(root / "dir"), "out": str(out), "log": job["log"]}, 0,
                   rerun=True)
