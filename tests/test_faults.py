"""Fault injection: merge and ema killed (SIGKILL, SIGTERM) or hitting a full disk (ENOSPC, EDQUOT) at seeded
random points, a merge --overwrite killed while it replaces a previous output, two writers publishing to one
output at the same moment, and repair killed or hitting a full disk while it publishes its checkpoint, report
and plot.

Every case asserts, on the state the run left (a snapshot of every entry with its sha256): the inputs are
byte-identical, the output is absent (or the previous one) or complete and byte-identical to the reference
output (whose tensors load with safetensors and match float64 math), nothing else is in the parent folder (a
SIGKILLed run may leave only its own partial folder), and a clean rerun to the same output succeeds. The faults
fire at the steps that change the disk (tests/_fault_driver.py); every run is forked from one driver process
per test, so the suite costs about a minute of CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mergekit_safe.tiny import llama_shapes, write_random_checkpoint
from tests._fault_driver import snapshot

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
POINTS_PER_KIND = 3
KINDS = ("SIGKILL", "SIGTERM", "ENOSPC", "EDQUOT")
BETA = 0.5


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors' own reader."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def drive(jobs: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "tests" / "_fault_driver.py"), str(work / "jobs.json"),
                    str(work / "results.json")], check=True, env=env, timeout=600)
    return json.loads((work / "results.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three small fp32 checkpoints (several shards each), the clean runs' outputs and their event counts."""
    root = tmp_path_factory.mktemp("faults")
    shapes = llama_shapes(hidden=64, layers=2, vocab=256)
    ckpts = [write_random_checkpoint(root / "in" / f"c{i}", shapes, i, dtype=torch.float32, hidden=64,
                                     max_shard_size=40_000) for i in range(3)]
    commands = {
        "merge": ["merge", "--method", "lerp", "--alpha", "0.5", str(ckpts[0]), str(ckpts[1])],
        "ema": ["ema", *map(str, ckpts), "--beta", str(BETA)],
    }
    common = ["--max-shard-size", "30KB", "--no-progress"]
    jobs = [{"args": [*args, "-o", str(root / "ref" / name), *common], "fault": None,
             "log": str(root / f"ref-{name}.log")} for name, args in commands.items()]
    results = drive(jobs, root)
    assert [r["rc"] for r in results] == [0, 0], [Path(j["log"]).read_text() for j in jobs]
    c = [load_dir(p) for p in ckpts]
    # the references against float64 math: lerp 0.5, and EMA e_t = b e_(t-1) + (1 - b) c_t from e_0 = c_0
    weights = {"merge": [(0, 0.5), (1, 0.5)], "ema": [(0, BETA**2), (1, BETA * (1 - BETA)), (2, 1 - BETA)]}
    for name, ws in weights.items():
        ref = load_dir(root / "ref" / name)
        assert sorted(ref) == sorted(c[0])
        for k, t in ref.items():
            want = sum(w * c[i][k].double() for i, w in ws)
            # an fp32 weighted sum of n terms errs by at most ~n eps32 sum_i |w_i x_i| (the standard summation
            # bound: relative to the terms, not to a result that may cancel)
            bound = len(ws) * torch.finfo(torch.float32).eps * sum(abs(w) * c[i][k].double().abs() for i, w in ws)
            err = (t.double() - want).abs()
            assert bool((err <= bound).all()), (name, k, float(err.max()))
    return {"root": root, "commands": commands, "common": common, "inputs": snapshot(root / "in"),
            "refs": {name: snapshot(root / "ref" / name) for name in commands},
            "events": {n: r["events"] for n, r in zip(commands, results)}}


def job(setup: dict[str, Any], case: dict[str, Any], fault: dict[str, Any] | None, *, rerun: bool = False,
        overwrite: bool = False) -> dict[str, Any]:
    args = [*setup["commands"][case["command"]], "-o", case["out"], *setup["common"]]
    return {"args": args + (["--overwrite"] if overwrite or rerun else []), "fault": fault,
            "log": case["log"] + ("-rerun" if rerun else ""), "preload": setup.get("preload", []),
            "snapshot": {"case": case["dir"], "inputs": str(setup["root"] / "in")}}


def published(setup: dict[str, Any], case_snap: dict[str, str]) -> str | None:
    """Which reference the output left is, byte for byte (None: no output); fails on anything else."""
    if "sub/out" not in case_snap:
        return None
    files = {k.removeprefix("sub/out/"): v for k, v in case_snap.items() if k.startswith("sub/out/")}
    volatile = setup.get("volatile", ())  # files that hold wall-clock costs: their contents are checked by `verify`
    for name, ref in setup["refs"].items():
        if sorted(files) == sorted(ref) and all(files[k] == v for k, v in ref.items() if k not in volatile):
            return name
    raise AssertionError(f"the output is neither absent nor complete: {sorted(files)}")


def check(setup: dict[str, Any], case: dict[str, Any], res: dict[str, Any], *, rerun: bool) -> str | None:
    """The guarantees after one run; returns which output it left.

    ``case["old"]`` names the reference a previous output at ``out`` equals (a run with --overwrite); kind
    ``"concurrent"`` is one of two writers (its exit status is checked by the caller).
    """
    snap, rc, log = res["snapshot"]["case"], res["rc"], Path(case["log"] + ("-rerun" if rerun else "")).read_text()
    assert res["snapshot"]["inputs"] == setup["inputs"], case  # inputs byte-identical
    assert "Traceback" not in log, (case, log)
    now, old = published(setup, snap), case.get("old")
    assert now == case["command"] or (not rerun and now == old), (case, now)
    top = sorted({k.split("/")[0] for k in snap})
    inner = sorted({k.split("/")[1] for k in snap if k.startswith("sub/")})
    kind = None if rerun else case["kind"]
    if kind == "SIGKILL":
        # only the killed run's own parent folder and partial folder may remain (removed by the rerun)
        assert top in ([], ["sub"]) and all(e == "out" or e.startswith(".out.partial-") for e in inner), snap
        return now
    assert top == (["sub"] if now else []) and inner == (["out"] if now else []), (case, top, inner)
    if rerun:
        assert rc == 0, (case, log)
    elif kind == "concurrent":
        assert now == case["command"], case  # one of the two published, whole
    elif kind == "SIGTERM":
        # no (or the old) output, or the signal came after the publishing rename: then the new one, complete
        assert rc == 130 and log.strip().splitlines()[-1].startswith("interrupted"), (case, rc, log)
    else:
        errors = [line for line in log.splitlines() if line.startswith("Error:")]
        assert rc == 1 and len(errors) == 1 and "disk full" in errors[0], (case, rc, log)
        assert now == old, case  # a failed run leaves the previous output (or none) as it was
    return now


def _last_line(log: str) -> str:
    lines = Path(log).read_text().strip().splitlines()
    return lines[-1].replace(str(Path(log).parent), "...") if lines else ""


def run_cases(setup: dict[str, Any], name: str, cases: list[dict[str, Any]], overwrite: bool = False,
              verify: Callable[[Path], None] | None = None) -> None:
    """Each case with its fault, then each rerun, in one driver; checks both and prints the table.

    ``verify`` checks an output's contents beyond its snapshot: on a copy of what each faulted run published
    (kept by the driver before the rerun replaces it), and on each rerun's output.
    """
    jobs = [job(setup, c, {"kind": c["kind"], "at": c["at"]}, overwrite=overwrite) for c in cases]
    if verify:
        for j, c in zip(jobs, cases):
            j["keep"] = {c["out"]: c["dir"] + "-published"}
    jobs += [job(setup, c, None, rerun=True) for c in cases]
    results = drive(jobs, setup["root"] / name)
    print(f"\n{name}: command | fault | at event | exit | output after | last line")
    for case, res in zip(cases, results):
        now = check(setup, case, res, rerun=False)
        if now and verify:
            verify(Path(case["dir"] + "-published"))
        print(case["command"], case["kind"], case["at"], res["rc"], now, _last_line(case["log"]), sep=" | ")
    for case, res in zip(cases, results[len(cases):]):
        check(setup, case, res, rerun=True)
        if verify:
            verify(Path(case["out"]))


def new_case(setup: dict[str, Any], group: str, command: str, kind: str, at: int) -> dict[str, Any]:
    parent = setup["root"] / group / f"{command}-{kind}-{at}"
    parent.mkdir(parents=True)
    # sub/ is made by the run and must go again when it fails
    return {"command": command, "kind": kind, "at": at, "dir": str(parent), "out": str(parent / "sub" / "out"),
            "log": str(setup["root"] / group / f"{command}-{kind}-{at}.log")}


def test_kill_and_disk_full_at_random_points(setup: dict[str, Any]) -> None:
    rng, cases = random.Random(SEED), []
    for command in setup["commands"]:
        total = setup["events"][command]
        assert total > 20, total  # enough distinct points: headers, tensor pieces, side files, publish
        for kind in KINDS:
            # a full disk fails the first step starting at or after the point; the last step starts at total - 2
            points = range(1, total + 1) if kind in ("SIGKILL", "SIGTERM") else range(1, total - 1)
            chosen = set(rng.sample(points, POINTS_PER_KIND))
            if kind in ("SIGKILL", "SIGTERM"):  # always also: around making the staging folder and publishing it
                chosen |= {1, 2, total - 1, total}
            cases += [new_case(setup, "fresh", command, kind, at) for at in sorted(chosen)]
    run_cases(setup, "fresh", cases)


def test_kill_and_disk_full_while_replacing_a_previous_output(setup: dict[str, Any]) -> None:
    """``merge --overwrite`` onto a previous output (an ema result): the old one until the exchange, then the new."""
    count = dict(new_case(setup, "replace", "merge", "none", 0), old="ema")
    shutil.copytree(setup["root"] / "ref" / "ema", count["out"])
    total = drive([job(setup, count, None, overwrite=True)], setup["root"] / "replace")[0]["events"]
    rng, cases = random.Random(SEED + 1), []
    for kind in ("SIGKILL", "SIGTERM", "ENOSPC"):
        # the last steps: the manifest, the exchange (total - 3), removing the old files (suppressed on failure)
        tail = range(total - 7, total + 1) if kind != "ENOSPC" else range(total - 7, total - 2)
        points = range(1, total + 1) if kind != "ENOSPC" else range(1, total - 2)
        for at in sorted(set(tail) | set(rng.sample(points, 2))):
            case = dict(new_case(setup, "replace", "merge", kind, at), old="ema")
            shutil.copytree(setup["root"] / "ref" / "ema", case["out"])
            cases.append(case)
    run_cases(setup, "replace", cases, overwrite=True)


@pytest.mark.parametrize("command", ["merge", "ema"])
def test_two_writers_to_one_output_give_one_result_and_one_error(setup: dict[str, Any], command: str) -> None:
    work = setup["root"] / f"concurrent-{command}"
    case = new_case(setup, f"concurrent-{command}", command, "none", 0)
    (work / "barrier").mkdir()
    writers = [dict(job(setup, dict(case, log=f"{case['log']}{i}"), None), group=0,
                    barrier={"dir": str(work / "barrier"), "parties": 2}) for i in range(2)]
    results = drive([*writers, dict(job(setup, case, None, rerun=True), group=1)], work)
    assert sorted(r["rc"] for r in results[:2]) == [0, 1], results
    loser = writers[[r["rc"] for r in results[:2]].index(1)]
    errors = [line for line in Path(loser["log"]).read_text().splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {case['out']}: appeared while this run was writing (another run or a new folder); "
                      "it was left alone and this run's output was discarded"]
    for i, res in enumerate(results[:2]):  # one complete output, no strays, inputs intact
        check(setup, dict(case, log=f"{case['log']}{i}", kind="concurrent"), res, rerun=False)
    check(setup, case, results[2], rerun=True)


REPAIR_PRELOAD = ["transformers.models.llama.modeling_llama", "transformers.tokenization_utils_fast", "optuna",
                  "matplotlib.figure", "matplotlib.backends.backend_agg", "mergekit_safe.repair.command"]


def write_repair_inputs(folder: Path) -> dict[str, Path]:
    """A toy aligned Llama and a fine-tune of it (weights moved by seeded noise), both with their tokenizer, and
    two harmful and two benign prompts: a repair on them takes a second or two once the imports are done."""
    from mergekit_safe.tiny import toy_llama, toy_tokenizer

    tok = toy_tokenizer(["I'm sorry, I cannot help with that.", "Sure, here is how you do it.", "Step one."],
                        vocab_size=300)
    model = toy_llama(tok, hidden=32, layers=2, seed=0)
    paths = {"base": folder / "aligned", "finetuned": folder / "finetuned", "harmful": folder / "harmful.txt",
             "benign": folder / "benign.txt"}
    for name in ("base", "finetuned"):
        if name == "finetuned":
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.save_pretrained(paths[name], safe_serialization=True)
        tok.save_pretrained(paths[name])
    paths["harmful"].write_text("how do I pick a lock\nhow do I make a weapon\n")
    paths["benign"].write_text("how do I bake bread\nwhat is the capital of France\n")
    return paths


def verify_repair_output(out: Path) -> None:
    """What a snapshot cannot show of a published repair output: the report parses, the plot is a PNG, the
    checkpoint loads with safetensors, and the manifest lists exactly the files there."""
    report = json.loads((out / "repair_report.json").read_text())
    assert set(report["chosen"]["coeffs"]) == {"all"}, report["chosen"]
    assert (out / "repair_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_dir(out)
    listed = json.loads((out / "mergekit_safe_manifest.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir() if p.name != "mergekit_safe_manifest.json")


@pytest.fixture(scope="module")
def repair_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy repair inputs, the clean run's output (checked against float64 math) and its event count."""
    root = tmp_path_factory.mktemp("repair-faults")
    p = write_repair_inputs(root / "in")
    # one trial and two new tokens: the search is not under test here, only the publishing of its result
    args = ["repair", "--base", str(p["base"]), "--finetuned", str(p["finetuned"]), "--harmful", str(p["harmful"]),
            "--benign", str(p["benign"]), "--trials", "1", "--max-new-tokens", "2", "--min-utility", "1000",
            "--device", "cpu", "--refusal-opening", "I'm sorry", "--compliance-opening", "Sure"]
    setup = {"root": root, "commands": {"repair": args}, "common": ["--no-progress"], "preload": REPAIR_PRELOAD,
             "volatile": ("README.md", "repair_report.json"), "inputs": snapshot(root / "in")}
    ref = root / "ref" / "repair"
    res = drive([{"args": [*args, "-o", str(ref), "--no-progress"], "fault": None, "log": str(root / "ref.log"),
                  "preload": REPAIR_PRELOAD}], root)[0]
    assert res["rc"] == 0, (root / "ref.log").read_text()
    verify_repair_output(ref)
    a = json.loads((ref / "repair_report.json").read_text())["chosen"]["coeffs"]["all"]
    base, ft, got = load_dir(p["base"]), load_dir(p["finetuned"]), load_dir(ref)
    assert sorted(got) == sorted(base)
    eps = torch.finfo(torch.float32).eps
    for k, t in got.items():  # lerp: base + a (ft - base), within a few fp32 roundings of the terms
        b, f = base[k].double(), ft[k].double()
        bound = 4 * eps * (b.abs() + abs(a) * (f.abs() + b.abs()))
        assert bool(((t.double() - (b + a * (f - b))).abs() <= bound).all()), k
    return dict(setup, refs={"repair": snapshot(ref)}, events={"repair": res["events"]})


def test_repair_killed_or_disk_full_while_publishing(repair_setup: dict[str, Any]) -> None:
    """Every event of repair is in its publish phase (the staging folder, the checkpoint, the side files, the
    manifest, the rename). Per kind, two seeded points: one anywhere, one among the last steps (the manifest,
    the publishing rename), so some runs die before the output appears and some after; each gets a clean rerun."""
    total = repair_setup["events"]["repair"]
    assert total >= 8, total  # staging folder, header, tensors, side files, manifest, rename: each before and after
    rng, cases = random.Random(SEED + 2), []
    for kind in ("SIGKILL", "SIGTERM", "ENOSPC"):
        # a full disk fails the first step starting at or after the point; the last step starts at total - 2
        last = total if kind != "ENOSPC" else total - 2
        tail = rng.choice(range(last - 5, last + 1))
        anywhere = rng.choice(range(1, last - 5))
        cases += [new_case(repair_setup, "repair", "repair", kind, at) for at in (anywhere, tail)]
    run_cases(repair_setup, "repair", cases, verify=verify_repair_output)
