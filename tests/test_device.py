"""One device path: ``--device`` (default from $MERGEKIT_SAFE_DEVICE) and ``--backend`` (default from
$MERGEKIT_SAFE_BACKEND) are read once at the CLI entry and passed down to the code that computes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import mergekit_safe.kernels as K
from mergekit_safe.cli import main
from mergekit_safe.errors import KernelError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
AUTO = "cuda" if torch.cuda.is_available() else "cpu"


def _commands(pair: tuple[Path, Path], tmp: Path) -> dict[str, list[str]]:
    a, b = map(str, pair)
    return {
        "merge": ["merge", "--method", "lerp", "--alpha", "0.5", a, b, "-o", str(tmp / "m"), "--no-progress"],
        "ema": ["ema", a, b, "-o", str(tmp / "e"), "--no-progress"],
        "inspect": ["inspect", a, b, "--json"],
        "eval": ["eval", a, "--limit", "1", "--max-new-tokens", "1"],
    }


def test_resolve_device_is_the_one_rule() -> None:
    assert K.resolve_device("auto").type == AUTO
    assert K.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(KernelError, match=r"^--device 'tpu' is not one of auto, cpu, cuda, cuda:N$"):
        K.resolve_device("tpu")
    with pytest.raises(KernelError, match=r"^--device 'cuda:x' is not one of"):
        K.resolve_device("cuda:x")


@no_cuda
@pytest.mark.parametrize("command", ["merge", "ema", "inspect", "eval"])
def test_device_from_the_environment_reaches_every_command(tiny_pair: tuple[Path, Path], tmp_path: Path,
                                                           command: str) -> None:
    args = _commands(tiny_pair, tmp_path)[command]
    res = CliRunner().invoke(main, args, env={"MERGEKIT_SAFE_DEVICE": "cuda"})
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert res.output.splitlines()[-1] == "Error: --device cuda: CUDA is not available on this machine"
    res = CliRunner().invoke(main, [*args, "--device", "npu"], env={"MERGEKIT_SAFE_DEVICE": "cpu"})
    assert res.output.splitlines()[-1] == "Error: --device 'npu' is not one of auto, cpu, cuda, cuda:N"
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize(("env", "flag", "expected"), [({}, [], AUTO), ({"MERGEKIT_SAFE_DEVICE": "cpu"}, [], "cpu"),
                                                       ({"MERGEKIT_SAFE_DEVICE": "cuda"}, ["--device", "cpu"], "cpu")])
def test_merge_passes_the_resolved_device_down(tiny_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: Any,
                                               env: dict[str, str], flag: list[str], expected: str) -> None:
    import mergekit_safe.merge.engine as engine

    seen: dict[str, Any] = {}

    def fake_merge(recipe: Any, out: Path, **kw: Any) -> Any:
        seen.update(kw)
        raise KernelError("stop here")

    monkeypatch.setattr(engine, "merge", fake_merge)
    res = CliRunner().invoke(main, [*_commands(tiny_pair, tmp_path)["merge"], *flag], env=env)
    assert res.output.splitlines()[-1] == "Error: stop here"
    assert seen["device"] == expected


def test_backend_from_the_environment_is_scoped_to_the_command(tiny_pair: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel tests' conftest may have turned the interpreter on
    args = _commands(tiny_pair, tmp_path)["merge"] + ["--device", "cpu"]
    res = CliRunner().invoke(main, args, env={"MERGEKIT_SAFE_BACKEND": "triton"})
    assert res.exit_code == 1, res.output
    assert res.output.splitlines()[-1].startswith("Error: backend triton is forced but ")
    assert K.current_backend() == "auto"  # the scope closed with the command
    res = CliRunner().invoke(main, ["--backend", "torch", *args], env={"MERGEKIT_SAFE_BACKEND": "triton"})
    assert res.exit_code == 0, res.output  # the flag wins over the environment's default
    res = CliRunner().invoke(main, args, env={"MERGEKIT_SAFE_BACKEND": "cuda"})
    assert res.exit_code == 2 and "'cuda' is not one of 'auto', 'torch', 'triton'" in res.output


@cuda
@pytest.mark.gpu
def test_inspect_on_cuda_matches_cpu(tiny_pair: tuple[Path, Path]) -> None:
    from mergekit_safe.merge.inspect import diff_checkpoints

    a, b = map(str, tiny_pair)
    cpu, _ = diff_checkpoints(a, b, device="cpu")
    gpu, _ = diff_checkpoints(a, b, device="cuda")
    for c, g in zip(cpu, gpu):
        assert c.name == g.name
        # float64 on both devices; only the reduction order differs
        assert g.rel_delta == pytest.approx(c.rel_delta, rel=1e-12) and g.cosine == pytest.approx(c.cosine, rel=1e-12)
        assert g.max_abs == c.max_abs


def test_inspect_device_flag_gives_the_same_report(tiny_pair: tuple[Path, Path]) -> None:
    a, b = map(str, tiny_pair)
    plain = CliRunner().invoke(main, ["inspect", a, b, "--json"], env={"MERGEKIT_SAFE_DEVICE": "cpu"})
    explicit = CliRunner().invoke(main, ["inspect", a, b, "--json", "--device", AUTO])
    assert plain.exit_code == explicit.exit_code == 0, plain.output + explicit.output
    p, e = json.loads(plain.output), json.loads(explicit.output)
    assert [t["name"] for t in p["tensors"]] == [t["name"] for t in e["tensors"]]
    for tp, te in zip(p["tensors"], e["tensors"]):
        assert te["rel_delta"] == pytest.approx(tp["rel_delta"], rel=1e-12)
