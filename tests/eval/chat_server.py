"""An in-process OpenAI-compatible chat-completions server over a model in memory, for the engine tests.

It answers ``POST /v1/chat/completions`` with our :class:`HFBackend` on the given model (one prompt per
request), ``GET /v1/models``, an OpenAI-style 404 for an unknown model name, and can be told to fail the
next requests with a status code or to hold requests until several are in flight at once (a barrier).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mergekit_safe.eval.generate import Generation, GenerationConfig, HFBackend, greedy_rows


class ChatServer:
    """Serve ``model`` as ``name`` on 127.0.0.1 (a free port); use as a context manager."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "tiny") -> None:
        self.backend = HFBackend(model, tokenizer)
        self.name = name
        self.requests: list[dict] = []  # every chat body received, in arrival order
        self.fail_next: list[int] = []  # status codes for the next requests, popped one per request
        self.barrier: threading.Barrier | None = None  # if set, chat requests wait here (after the first)
        self.in_flight = self.max_in_flight = 0
        self.auth: list[str | None] = []
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def chat(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(body)
            first = len(self.requests) == 1
            code = self.fail_next.pop(0) if self.fail_next else 200
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if code != 200:
                return code, {"error": {"message": f"injected failure {code}", "code": code}}
            if body.get("model") != self.name:
                return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                       "type": "NotFoundError", "code": 404}}
            if self.barrier is not None and not first:
                self.barrier.wait(timeout=20)  # raises (-> 500) unless enough requests arrive together
            msgs = body["messages"]
            assert body["temperature"] == 0.0
            with self._model_lock:
                g = self._answer(msgs, body["max_tokens"])
            return 200, {"id": "x", "object": "chat.completion", "model": self.name,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": g.text}}],
                         "usage": {"completion_tokens": g.new_tokens}}
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, msgs: list[dict], max_tokens: int) -> Generation:
        """A chat turn: user (+ system) through HFBackend; a whole conversation (a guard's input) through the
        chat template as it is, the way vLLM renders it."""
        if any(m["role"] == "assistant" for m in msgs):
            tok, model = self.backend.tokenizer, self.backend.model
            ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
            return greedy_rows(model, tok, [ids], max_tokens, 1)[0]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        user = next(m["content"] for m in msgs if m["role"] == "user")
        return self.backend.generate([user], GenerationConfig(max_new_tokens=max_tokens,
                                                              system_prompt=system)).generations[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": outer.name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    self._send(*outer.chat(body))
                except Exception as e:  # a broken barrier or assertion becomes a 500 the test will see
                    self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})

        return Handler
