"""Safe LoRA and SafeMERGE against float64 references that build the d x d projection explicitly.

PEFT's ``utils.safelora`` (huggingface/peft, src/peft/utils/safelora.py) is in no released peft wheel (checked
0.13.2, 0.15.2, 0.17.1, 0.21.2), so :func:`_peft_safelora` restates its algorithm in float64: ``P = V V^T /
||V||_F`` with ``V = base - aligned``, ``W = P B``, ``cos = cos(W A, B A)``, project where ``cos <= threshold``;
``number`` mode takes the ``num_proj_layers`` smallest cosines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_safe.errors import RecipeError
from mergekit_safe.merge.engine import merge
from mergekit_safe.merge.methods import get_method
from mergekit_safe.merge.recipe import ModelSpec, Recipe
from mergekit_safe.merge.safety import applies, cosine, project, safe_lora_adapter
from tests.helpers import assert_close
from tests.test_adapters import make_adapter


def _explicit_p(v: torch.Tensor, exact: bool) -> torch.Tensor:
    v = v.double()
    return v @ torch.linalg.pinv(v) if exact else v @ v.T / torch.linalg.matrix_norm(v)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("vshape,dshape", [((12, 7), (12, 5)), ((6, 10), (6, 10)), ((12, 7), (15, 7)), ((1, 3), (1, 3))])
def test_project_matches_the_explicit_matrix(exact: bool, vshape: tuple, dshape: tuple) -> None:
    v = torch.randn(vshape, dtype=torch.float64)
    if vshape == (12, 7):
        v[:, 6] = v[:, 0] * 2  # rank-deficient: the exact projection needs the pseudo-inverse
    d = torch.randn(dshape, dtype=torch.float64)  # a dense update, or a LoRA B with r columns
    got = project(v, d, exact=exact)
    n = min(v.shape[0], d.shape[0])
    want = d.clone()
    want[:n] = _explicit_p(v[:n], exact) @ d[:n]  # rows past V (a resized vocabulary) keep their update
    assert_close(got, want, 1e-12, 1e-10, "P d")


def _variant(src: Path, dst: Path, seed: int, scale: float, *, rows: int | None = None) -> Path:
    """A copy of ``src`` with every tensor moved by seeded noise (and the vocabulary resized to ``rows``)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in load_file(src / "model.safetensors").items()}
    if rows is not None:
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.randn(max(rows - state[k].shape[0], 0), state[k].shape[1], generator=g)
            state[k] = torch.cat([state[k], extra])[:rows].contiguous()
    dst.mkdir(parents=True)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = state["model.embed_tokens.weight"].shape[0]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _peft_safelora(adapter: Path, aligned: Path, unaligned: Path) -> dict[str, tuple[float, torch.Tensor]]:
    """PEFT's Safe LoRA per module, float64: ``module -> (cos, P @ B)``."""
    lora = load_file(adapter / "adapter_model.safetensors")
    al, un = load_file(aligned / "model.safetensors"), load_file(unaligned / "model.safetensors")
    out = {}
    for kb in [k for k in lora if "lora_B" in k]:
        target = kb.split(".lora_B.")[0].removeprefix("base_model.model.") + ".weight"
        p = _explicit_p(un[target].double() - al[target].double(), exact=False)
        a, b = lora[kb.replace("lora_B", "lora_A")].double(), lora[kb].double()
        w = p @ b
        out[target] = (cosine(w @ a, b @ a), w)
    return out


@pytest.fixture(scope="module")
def trio(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """aligned, unaligned (aligned moved by noise), and a LoRA adapter trained on aligned."""
    root = tmp_path_factory.mktemp("trio")
    aligned = tiny_pair[0]
    unaligned = _variant(aligned, root / "unaligned", seed=7, scale=0.05)
    make_adapter(aligned, root / "lora")
    return aligned, unaligned, root / "lora"


@pytest.mark.parametrize("mode", ["threshold", "number"])
def test_safe_lora_adapter_matches_peft(trio: tuple[Path, Path, Path], tmp_path: Path, mode: str) -> None:
    aligned, unaligned, adapter = trio
    ref = _peft_safelora(adapter, aligned, unaligned)
    cosines = sorted(c for c, _ in ref.values())
    kw = {"threshold": cosines[len(cosines) // 2]} if mode == "threshold" else {"num_layers": 3}
    report = safe_lora_adapter(adapter, aligned, unaligned, tmp_path / "safe", **kw)
    cut = kw.get("threshold", cosines[2])  # number mode: PEFT's cut is the num-th smallest cosine
    assert {r.module: r.projected for r in report} == {m: c <= cut for m, (c, _) in ref.items()}
    assert 0 < sum(r.projected for r in report) < len(report)
    got = load_file(tmp_path / "safe" / "adapter_model.safetensors")
    src = load_file(adapter / "adapter_model.safetensors")
    for r in report:
        assert r.cosine == pytest.approx(ref[r.module][0], abs=1e-9)
        kb = "base_model.model." + r.module.removesuffix(".weight") + ".lora_B.weight"
        want = ref[r.module][1] if r.projected else src[kb].double()
        assert_close(got[kb], want, 1e-7, 1e-6, kb)  # fp32 storage of a float64 product
        assert torch.equal(got[kb.replace("lora_B", "lora_A")], src[kb.replace("lora_B", "lora_A")])
    assert json.loads((tmp_path / "safe" / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())
    with pytest.raises(RecipeError, match="exactly one of threshold and num_layers"):
        safe_lora_adapter(adapter, aligned, unaligned, tmp_path / "x")


def _reference(aligned: dict, tuned: dict, unaligned: dict, safe: dict | None, threshold: float) -> dict:
    """safe_lora (safe is None) or safemerge with the paper's 0.8 / 0.2, in float64 with explicit P."""
    out, both = {}, [False, False]
    for name, w in aligned.items():
        if not applies(name, tuple(w.shape)):
            out[name] = tuned[name].double()
            continue
        d = tuned[name].double() - w.double()
        n = min(w.shape[0], unaligned[name].shape[0])
        pd = _explicit_p(w[:n].double() - unaligned[name][:n].double(), exact=False) @ d
        cos = cosine(pd, d)
        hit = cos <= threshold if safe is None else cos < threshold
        both[hit] = True
        if not hit:
            out[name] = tuned[name].double()
        elif safe is None:
            out[name] = w.double() + pd
        else:
            out[name] = w.double() + 0.8 * d + 0.2 * (safe[name].double() - w.double())
    assert all(both), "the test's threshold must leave layers on both sides"
    return out


def _cosines(aligned: dict, tuned: dict, unaligned: dict) -> list[float]:
    cs = []
    for name, w in aligned.items():
        if applies(name, tuple(w.shape)):
            d = tuned[name].double() - w.double()
            cs.append(cosine(_explicit_p(w.double() - unaligned[name].double(), False) @ d, d))
    return sorted(cs)


@pytest.mark.parametrize("method", ["safe_lora", "safemerge"])
def test_merge_methods_match_float64(tiny_pair: tuple[Path, Path], tmp_path: Path, method: str) -> None:
    aligned, tuned = tiny_pair
    unaligned = _variant(aligned, tmp_path / "unaligned", seed=8, scale=0.05)
    safe = _variant(aligned, tmp_path / "safe", seed=9, scale=0.02)
    al, ft, un = (load_file(p / "model.safetensors") for p in (aligned, tuned, unaligned))
    sf = load_file(safe / "model.safetensors") if method == "safemerge" else None
    cs = _cosines(al, ft, un)
    threshold = (cs[len(cs) // 2] + cs[len(cs) // 2 - 1]) / 2  # half the layers on each side, no tie
    models = [ModelSpec(str(tuned)), ModelSpec(str(unaligned))] + ([ModelSpec(str(safe))] if sf else [])
    recipe = Recipe(method, models, base_model=str(aligned), parameters={"threshold": threshold})
    merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = _reference(al, ft, un, sf, threshold)
    for name in want:
        assert_close(got[name], want[name], 1e-6, 1e-5, name)  # fp32 output of float64 math


def test_paper_defaults_and_resized_vocabulary(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    sm = get_method("safemerge")
    assert (sm.param("threshold").default, sm.param("weight").default, sm.param("safety_weight").default) == (
        0.35, 0.8, 0.2)
    assert get_method("safe_lora").param("threshold").default == 0.5  # PEFT's SafeLoraConfig default
    aligned, tuned = tiny_pair
    # an unaligned model with a smaller vocabulary: PEFT raises; the embeddings are not projected here
    unaligned = _variant(aligned, tmp_path / "unaligned", seed=10, scale=0.05, rows=120)
    recipe = Recipe("safe_lora", [ModelSpec(str(tuned)), ModelSpec(str(unaligned))], base_model=str(aligned),
                    parameters={"threshold": 1.0})
    merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    ft = load_file(tuned / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], ft["model.layers.0.mlp.up_proj.weight"])
    shutil.rmtree(tmp_path / "out")
