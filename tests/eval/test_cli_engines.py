"""``eval --engine openai|hf-fast`` and several judges through the CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mergekit_safe.eval.agreement import cohen_kappa
from mergekit_safe.cli import main
from mergekit_safe.eval.generate import GenerationConfig, HFBackend
from mergekit_safe.eval.judges import is_refusal_keyword, is_refusal_prefix
from mergekit_safe.eval.prompts import load_prompts, sample_prompts

from .chat_server import ChatServer


def test_openai_engine_two_judges_and_resume(tiny_model_f64, tiny_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret")
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    with ChatServer(tiny_model_f64, tiny_tok) as server:
        args = ["tiny", "--engine", "openai", "--base-url", server.url, "--api-key-env", "MY_KEY", "--limit", "5",
                "--max-new-tokens", "6", "--judge", "keyword,prefix", "--cache-dir", str(cache), "-o", str(out),
                "--save-generations", str(tmp_path / "g.jsonl")]
        res = CliRunner().invoke(main, ["eval", *args])
        assert res.exit_code == 0, res.output
        assert len(server.requests) == 10 and set(server.auth) == {"Bearer sk-secret"}  # 5 harmful + 5 benign
        res2 = CliRunner().invoke(main, ["eval", *args])  # everything cached: nothing is resent
        assert res2.exit_code == 0 and len(server.requests) == 10
    d = json.loads(out.read_text())
    prompts = [p.text for p in sample_prompts(load_prompts("builtin"), 5, seed=0)]
    ref = [g.text for g in HFBackend(tiny_model_f64, tiny_tok).generate(prompts, GenerationConfig(6)).generations]
    recs = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["response"] for r in recs if r["set"] == "harmful"] == ref
    kw, px = [not is_refusal_keyword(r) for r in ref], [not is_refusal_prefix(r) for r in ref]
    assert d["judges"]["keyword"]["unsafe"]["k"] == sum(kw) and d["judges"]["prefix"]["unsafe"]["k"] == sum(px)
    (ag,) = d["agreement"]
    assert (ag["a"], ag["b"]) == ("keyword", "prefix") and sum(map(sum, ag["table"])) == 5
    expected = cohen_kappa(kw, px)
    assert ag["kappa"] == (None if expected != expected else expected)
    assert d["proxy"] == {} and d["utility"] == {}  # both need the weights in memory
    assert "sk-secret" not in out.read_text() and "keyword vs prefix: kappa" in res.output


def test_hf_fast_engine_matches_hf(tiny_model_dir, tmp_path):
    outs = {}
    for engine in ("hf", "hf-fast"):
        g = tmp_path / f"{engine}.jsonl"
        res = CliRunner().invoke(main, ["eval", str(tiny_model_dir), "--engine", engine, "--limit", "4", "--benign",
                                                "none", "--max-new-tokens", "6", "--no-proxy", "--device", "cpu",
                                                "--save-generations", str(g)])
        assert res.exit_code == 0, res.output
        outs[engine] = [json.loads(line)["response"] for line in g.read_text().splitlines()]
    assert outs["hf"] == outs["hf-fast"]


def test_cli_engine_errors(tmp_path):
    res = CliRunner().invoke(main, ["eval", "m", "--engine", "openai", "--limit", "2"])
    assert res.exit_code == 1
    assert res.output == "Error: --engine openai needs --base-url (e.g. http://localhost:8000/v1)\n"
    res = CliRunner().invoke(main, ["eval", "m", "--judge", "keyword,gpt4"])
    assert res.exit_code == 1
    assert res.output == ("Error: unknown judge gpt4; choose from keyword, prefix, classifier, guard, harmbench-cls "
                          "(comma list for several)\n")
    util = tmp_path / "u.jsonl"
    util.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    res = CliRunner().invoke(main, ["eval", "m", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1",
                                            "--utility", str(util), "--no-cache"])
    assert res.exit_code == 1
    assert res.output == ("Error: this evaluation needs the model in memory (generation backend, utility NLL or "
                          "lm-eval); with a served model use --exact-match for utility\n")
