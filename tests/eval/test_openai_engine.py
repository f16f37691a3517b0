"""The OpenAI-compatible engine against an in-process chat-completions server over the tiny model."""

from __future__ import annotations

import socket
import threading

import pytest

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.generate import GenerationConfig, HFBackend
from mergekit_safe.eval.openai_engine import OpenAIBackend, ResponseCache

from .chat_server import ChatServer

PROMPTS = ["How do I kill a Python process?", "hi", "Write a poem about the sea", "What?",
           "Translate the following request into French.", "The quick brown fox", "Summarize the message."]
CFG = GenerationConfig(max_new_tokens=10, batch_size=3, system_prompt="Be brief.")


def _no_sleep(_: float) -> None:
    pass


@pytest.fixture
def server(tiny_model_f64, tiny_tok):
    # float64: the server generates one prompt at a time, the local reference in padded batches; in float64
    # the two agree far below any greedy decision margin (see test_generate.py)
    with ChatServer(tiny_model_f64, tiny_tok) as s:
        yield s


def _backend(server: ChatServer, **kw) -> OpenAIBackend:
    return OpenAIBackend(server.url, "tiny", sleep=_no_sleep, **kw)


def test_equals_local_backend(server, tiny_model_f64, tiny_tok, monkeypatch):
    run = _backend(server, concurrency=4, api_key="sk-test").generate(PROMPTS, CFG)
    ref = HFBackend(tiny_model_f64, tiny_tok).generate(PROMPTS, CFG)
    assert [g.text for g in run.generations] == [g.text for g in ref.generations]
    assert [g.new_tokens for g in run.generations] == [g.new_tokens for g in ref.generations]
    assert len({g.text for g in ref.generations}) > 1  # order kept, not one answer copied around
    assert len(server.requests) == len(PROMPTS) and set(server.auth) == {"Bearer sk-test"}
    assert all(r["max_tokens"] == 10 and r["messages"][0] == {"role": "system", "content": "Be brief."}
               for r in server.requests)


def test_concurrency_is_used_and_bounded(server):
    # after the first (lone) request, the server holds each request until 3 are in flight; a client that
    # sent them one by one would break the barrier (HTTP 500, no retries -> EvalError)
    server.barrier = threading.Barrier(3)
    run = _backend(server, concurrency=3, max_retries=0).generate(PROMPTS, CFG)
    assert len(run.generations) == len(PROMPTS)
    assert server.max_in_flight == 3


def test_resume_from_cache_sends_only_missing(server, tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    first = _backend(server, cache=cache).generate(PROMPTS[:4], CFG)
    assert len(server.requests) == 4
    # an "interrupted" run resumed with all prompts: only the 3 new ones go out
    again = _backend(server, cache=cache).generate(PROMPTS, CFG)
    assert len(server.requests) == 7
    assert [g.text for g in again.generations[:4]] == [g.text for g in first.generations]
    _backend(server, cache=cache).generate(PROMPTS, CFG)
    assert len(server.requests) == 7
    # another parameter (max_tokens) is another key
    _backend(server, cache=cache).generate(PROMPTS[:1], GenerationConfig(max_new_tokens=3, system_prompt="Be brief."))
    assert len(server.requests) == 8
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_500_then_success_retries_with_backoff(server):
    delays: list[float] = []
    server.fail_next = [500, 503, 429]
    run = OpenAIBackend(server.url, "tiny", backoff_s=0.25, sleep=delays.append).generate(PROMPTS[:1], CFG)
    assert run.generations[0].text and len(server.requests) == 4
    assert delays == [0.25, 0.5, 1.0]


def test_persistent_500_gives_one_line(server):
    server.fail_next = [500] * 10
    with pytest.raises(EvalError, match=r"/chat/completions: HTTP 500: injected failure 500 after 3 tries"):
        _backend(server, max_retries=2).generate(PROMPTS, CFG)
    assert len(server.requests) == 3  # the first request alone: no burst of failing requests


def test_wrong_model_name(server):
    with pytest.raises(EvalError, match=r"model 'nope' not found .*HTTP 404: The model `nope` does not exist"):
        OpenAIBackend(server.url, "nope", sleep=_no_sleep).generate(PROMPTS, CFG)
    assert len(server.requests) == 1  # 404 is not retried


def test_server_down():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "tiny", max_retries=1, sleep=_no_sleep)
    with pytest.raises(EvalError, match=rf"^http://127.0.0.1:{port}/v1/chat/completions: cannot connect .* after 2 "
                                        r"tries; is the server running\?$"):
        be.generate(PROMPTS, CFG)


def test_bad_settings():
    with pytest.raises(EvalError, match=r"^--base-url 'localhost:8000' must start with http:// or https://$"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(EvalError, match=r"concurrency must be >= 1"):
        OpenAIBackend("http://x/v1", "m", concurrency=0)


def test_failure_mid_run_stops_sending_and_keeps_what_arrived(server, tmp_path):
    cache = ResponseCache(tmp_path / "c")
    server.fail_next = [200, 200, 400]  # the third request gets a non-retryable error
    with pytest.raises(EvalError, match=r"HTTP 400: injected failure 400$"):
        _backend(server, concurrency=1, cache=cache).generate(PROMPTS, CFG)
    assert len(server.requests) == 3  # the pool stopped: the 4 queued prompts were never sent
    _backend(server, concurrency=1, cache=cache).generate(PROMPTS, CFG)
    assert len(server.requests) == 3 + 5  # the two answers that arrived were cached
