"""Guard judges on tiny guard-shaped models: prompt building, batching, parsing, detection and error paths."""

from __future__ import annotations

import pytest
import torch

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.generate import Generation
from mergekit_safe.eval.guard import (
    GUARD_FORMATS,
    GuardAnswer,
    detect_guard_format,
    local_guard,
    parse_llama_guard,
    parse_wildguard,
    parse_yes_no,
    served_guard,
    yes_probability,
)
from mergekit_safe.eval.judges import get_judge

from .guard_models import (
    LLAMA_GUARD_TEMPLATE,
    SHIELDGEMMA_TEMPLATE,
    bigram_guard,
    guard_tokenizer,
    random_guard,
    save,
)

PROMPTS = ["How do I kill a Python process?", "hi", "Write a poem about the sea, the sky and the stars", "What?",
           "Summarize"]
RESPONSES = ["Sure, here is how.", "I cannot help with that.", "", "yes no", "Sure"]


def _last_token(tok, fmt: str) -> int:
    f = GUARD_FORMATS[fmt]
    rows = [tok(f.render(tok, p, r), add_special_tokens=f.add_special_tokens)["input_ids"]
            for p, r in zip(PROMPTS, RESPONSES)]
    assert len({r[-1] for r in rows}) == 1  # every guard prompt ends the same way
    return rows[0][-1]


def test_parsers():
    assert parse_llama_guard("\n\nsafe") == GuardAnswer(False)
    assert parse_llama_guard(" unsafe\nS1,S10 ") == GuardAnswer(True, None, ("S1", "S10"))
    assert parse_llama_guard("unsafe") == GuardAnswer(True)
    assert parse_wildguard("Harmful request: yes\nResponse refusal: no\nHarmful response: yes") == \
        GuardAnswer(True, False)
    assert parse_wildguard("Harmful request: yes\nResponse refusal: yes\nHarmful response: no") == \
        GuardAnswer(False, True)
    assert parse_yes_no("Yes") == GuardAnswer(True) and parse_yes_no(" no.") == GuardAnswer(False)
    for parse, bad in ((parse_llama_guard, "unsafely"), (parse_llama_guard, ""), (parse_wildguard, "Harmful request: "
                       "yes"), (parse_yes_no, "maybe")):
        with pytest.raises(ValueError):
            parse(bad)


def test_llama_guard_local_batched(tmp_path):
    tok = guard_tokenizer(LLAMA_GUARD_TEMPLATE)
    text = GUARD_FORMATS["llama_guard"].render(tok, "How?", "Like this.")
    assert "User: How?\n\nAgent: Like this.\n\n<END CONVERSATION>" in text
    after = _last_token(tok, "llama_guard")
    unsafe_dir = save(bigram_guard(tok, after, "unsafe\nS1"), tok, tmp_path / "llama-guard-tiny")
    judge = get_judge("guard", model_path=unsafe_dir, batch_size=2)  # format detected from the folder name
    assert judge(PROMPTS, RESPONSES) == [judge.fn([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert [v.unsafe for v in judge(PROMPTS, RESPONSES)] == [True] * 5
    safe_dir = save(bigram_guard(tok, after, "safe"), tok, tmp_path / "guard-b")
    judge = get_judge("guard", model_path=safe_dir, guard_format="llama_guard", batch_size=3)
    assert [v.unsafe for v in judge(PROMPTS, RESPONSES)] == [False] * 5


def test_harmbench_cls(tmp_path):
    tok = guard_tokenizer(None)
    text = GUARD_FORMATS["harmbench"].render(tok, "Do X", "X done")
    assert "Behavior:\nDo X\n\nGeneration:\nX done\n\n---\nRules:" in text and text.endswith("Answer: [/INST]")
    d = save(bigram_guard(tok, _last_token(tok, "harmbench"), "yes"), tok, tmp_path / "cls")
    judge = get_judge("harmbench-cls", model_path=d, guard_format="llama_guard", batch_size=2)  # format forced
    assert [v.unsafe for v in judge(PROMPTS, RESPONSES)] == [True] * 5


def test_shieldgemma_yes_probability_batched_equals_unpadded(tmp_path):
    tok = guard_tokenizer(SHIELDGEMMA_TEMPLATE)
    model = bigram_guard(tok, _last_token(tok, "shieldgemma"), "Yes")
    for layer in model.model.layers:  # un-zero attention so padding could matter if the mask were wrong
        torch.nn.init.normal_(layer.self_attn.o_proj.weight, std=0.02)
    f = GUARD_FORMATS["shieldgemma"]
    rows = [tok(f.render(tok, p, r), add_special_tokens=False)["input_ids"] for p, r in zip(PROMPTS, RESPONSES)]
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    ref = []
    with torch.no_grad():
        for r in rows:  # independent reference: one unpadded forward per row, float64 softmax
            logits = model(input_ids=torch.tensor([r])).logits[0, -1].double()
            ref.append(torch.softmax(logits[[yes, no]], 0)[0].item())
    got = yes_probability(model, tok, rows, batch_size=2)
    assert got == pytest.approx(ref, abs=1e-5)
    assert all(p > 0.5 for p in got)
    judge = local_guard(model, tok, f, batch_size=3)
    assert [v.unsafe for v in judge(PROMPTS, RESPONSES)] == [p > 0.5 for p in ref]


def test_detection(tmp_path):
    assert detect_guard_format(tmp_path / "Llama-Guard-3-1B", guard_tokenizer(None)) == "llama_guard"
    assert detect_guard_format(tmp_path / "x", guard_tokenizer(LLAMA_GUARD_TEMPLATE)) == "llama_guard"
    assert detect_guard_format(tmp_path / "x", guard_tokenizer(SHIELDGEMMA_TEMPLATE)) == "shieldgemma"
    assert detect_guard_format(tmp_path / "wildguard", guard_tokenizer(None)) == "wildguard"
    with pytest.raises(EvalError, match=r"/plain: cannot tell which guard family this is; pass --guard-format "
                                        r"llama_guard\|shieldgemma\|wildguard\|harmbench$"):
        detect_guard_format(tmp_path / "plain", guard_tokenizer(None))


def test_random_guard_answer_is_an_error_not_safe(tmp_path):
    tok = guard_tokenizer(None)
    text = GUARD_FORMATS["wildguard"].render(tok, "Q", "A")
    assert text.startswith("<s><|user|>\n[INST] ") and "Human user:\nQ\n\nAI assistant:\nA\n\n---" in text
    judge = local_guard(random_guard(tok), tok, GUARD_FORMATS["wildguard"], batch_size=2)
    with pytest.raises(EvalError, match=r"^guard \(wildguard\): cannot read the answer .*is --guard-format right\?$"):
        judge(PROMPTS, RESPONSES)


def test_guard_errors(tmp_path):
    with pytest.raises(EvalError, match="the guard judges need --judge-model PATH"):
        get_judge("guard")
    with pytest.raises(EvalError, match=r"unknown guard format 'x'; choose llama_guard, shieldgemma, wildguard"):
        get_judge("guard", model_path=tmp_path, guard_format="x")
    with pytest.raises(EvalError, match="judge model directory not found|model directory not found"):
        get_judge("guard", model_path=tmp_path / "missing")
    with pytest.raises(EvalError, match="guard format shieldgemma needs raw prompts or logits; run it locally"):
        served_guard(object(), GUARD_FORMATS["shieldgemma"])


def test_served_llama_guard_sends_the_conversation():
    sent = []

    class FakeBackend:
        def chat(self, convs, max_tokens):
            sent.extend(convs)
            return [Generation("unsafe\nS2" if "Sure" in c[1]["content"] else "safe", 2) for c in convs]

    judge = served_guard(FakeBackend(), GUARD_FORMATS["llama_guard"])
    assert [v.unsafe for v in judge(PROMPTS, RESPONSES)] == [True, False, False, False, True]
    assert sent[0] == [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0]}]


def test_cli_keyword_and_guard(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from mergekit_safe.cli import main
    from mergekit_safe.eval.judges import is_refusal_keyword
    from mergekit_safe.eval.report import Rate

    tok = guard_tokenizer(LLAMA_GUARD_TEMPLATE)
    guard_dir = save(bigram_guard(tok, _last_token(tok, "llama_guard"), "unsafe\nS1"), tok, tmp_path / "g")
    out, gens = tmp_path / "r.json", tmp_path / "g.jsonl"
    res = CliRunner().invoke(main, ["eval",
        str(tiny_model_dir), "--limit", "4", "--benign", "none", "--max-new-tokens", "4", "--no-proxy",
        "--judge", "keyword,guard", "--judge-model", str(guard_dir), "--guard-format", "llama_guard",
        "--device", "cpu", "-o", str(out), "--save-generations", str(gens)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    recs = [json.loads(line) for line in gens.read_text().splitlines()]
    kw = [not is_refusal_keyword(r["response"]) for r in recs]
    assert d["judge"] == "keyword" and d["unsafe"]["k"] == sum(kw)
    assert d["judges"]["guard"]["unsafe"] == vars(Rate.of([True] * 4))
    assert d["agreement"][0]["table"] == [[0, 4 - sum(kw)], [0, sum(kw)]]
    assert all(r["unsafe_by_judge"] == {"keyword": k, "guard": True} for r, k in zip(recs, kw))


def test_cli_served_llama_guard(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from mergekit_safe.cli import main

    from .chat_server import ChatServer

    tok = guard_tokenizer(LLAMA_GUARD_TEMPLATE)
    guard = bigram_guard(tok, _last_token(tok, "llama_guard"), "unsafe\nS1")
    out = tmp_path / "r.json"
    with ChatServer(guard, tok, name="llama-guard") as server:
        res = CliRunner().invoke(main, ["eval",
            str(tiny_model_dir), "--limit", "3", "--benign", "none", "--max-new-tokens", "4", "--no-proxy",
            "--judge", "guard", "--judge-base-url", server.url, "--judge-model", "llama-guard", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert len(server.requests) == 3
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in server.requests)
    d = json.loads(out.read_text())
    assert d["judge"] == "guard" and d["unsafe"]["k"] == 3
