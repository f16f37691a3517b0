"""Generation through any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, TGI).

:class:`OpenAIBackend` implements :class:`~mergekit_safe.eval.generate.GenerationBackend`, so judges and
metrics cannot tell a served model from one in memory. Requests are greedy (``temperature 0``), sent from a
bounded thread pool (the work is waiting on sockets, so threads are enough and need no event loop), retried
with exponential backoff on 429, 5xx and connection errors, and every answer is cached on disk under a key
of ``(base_url, model, messages, params)``: an interrupted evaluation sent again resends nothing it already has.

Only the standard library is used (``urllib``), so the engine adds no dependency.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.generate import Generation, GenerationConfig, GenerationRun

Messages = list[dict[str, str]]
_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def default_cache_dir() -> Path:
    """``$MERGEKIT_SAFE_CACHE/responses`` if the variable is set, else ``~/.cache/mergekit_safe/responses``."""
    root = os.environ.get("MERGEKIT_SAFE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "mergekit_safe") / "responses"


def user_messages(prompt: str, system_prompt: str | None = None) -> Messages:
    """The chat turns for one user prompt, with an optional system turn first."""
    msgs = [{"role": "user", "content": prompt}]
    return [{"role": "system", "content": system_prompt}, *msgs] if system_prompt else msgs


@dataclass
class ResponseCache:
    """One JSON file per request in ``folder``, named by the SHA-256 of the request; written atomically.

    Attributes:
        folder: created on the first write.
    """

    folder: Path

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        """A stable key of a JSON-able request (sorted keys, so dict order does not matter)."""
        return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> Generation | None:
        """The cached answer, or None (a missing or unreadable entry is a miss, never an error)."""
        try:
            d = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            return Generation(str(d["text"]), int(d["new_tokens"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, gen: Generation) -> None:
        """Store an answer: temp file + rename, so a killed run never leaves a half-written entry."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"text": gen.text, "new_tokens": gen.new_tokens}, f)
            os.replace(tmp, self.folder / f"{key}.json")
        except OSError as e:
            raise EvalError(f"{self.folder}: cannot write the response cache ({e.strerror})") from None


@dataclass
class OpenAIBackend:
    """Greedy chat completions from a served model.

    Attributes:
        base_url: the API root including ``/v1``, e.g. ``http://localhost:8000/v1``.
        model: the served model name (vLLM: ``--served-model-name`` or the path it was started with).
        api_key: sent as ``Authorization: Bearer``; None sends no header (local servers need none).
        concurrency: requests in flight at once. Default 16.
        max_retries: retries of one request on 429 / 5xx / connection errors. Default 5.
        backoff_s: first retry delay; doubles per retry (a numeric ``Retry-After`` wins). Default 0.5.
        timeout_s: socket timeout per request. Default 300.
        cache: response cache, or None for none.
        sleep: the delay function (tests pass a no-op).
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never printed into reports or logs
    concurrency: int = 16
    max_retries: int = 5
    backoff_s: float = 0.5
    timeout_s: float = 300.0
    cache: ResponseCache | None = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise EvalError(f"--base-url {self.base_url!r} must start with http:// or https://")
        if self.concurrency < 1 or self.max_retries < 0:
            raise EvalError(f"concurrency must be >= 1 and retries >= 0, got {self.concurrency}, {self.max_retries}")
        self.base_url = self.base_url.rstrip("/")

    def generate(self, prompts: Sequence[str], config: GenerationConfig) -> GenerationRun:
        """Greedy responses to raw user prompts, in their order (see :meth:`chat`)."""
        start = time.perf_counter()
        gens = self.chat([user_messages(p, config.system_prompt) for p in prompts], config.max_new_tokens)
        return GenerationRun(gens, time.perf_counter() - start)

    def chat(self, conversations: Sequence[Messages], max_tokens: int) -> list[Generation]:
        """One greedy completion per conversation, in order; cached answers are not resent.

        The first uncached request goes alone, so a server that is down or a wrong model name costs one
        request's retries and one error line, not one per prompt.

        Raises:
            EvalError: the server is unreachable, does not serve ``model``, refuses the key, or keeps failing.
        """
        bodies = [{"model": self.model, "messages": list(m), "temperature": 0.0, "max_tokens": max_tokens}
                  for m in conversations]
        keys = [ResponseCache.key({"base_url": self.base_url, **b}) for b in bodies]
        out: list[Generation | None] = [self.cache.get(k) if self.cache else None for k in keys]
        todo = [i for i, g in enumerate(out) if g is None]

        failed = threading.Event()  # after one failure, queued requests are not sent

        def run(i: int) -> None:
            if failed.is_set():
                return
            try:
                out[i] = self._complete(bodies[i])
            except BaseException:
                failed.set()
                raise
            if self.cache:
                self.cache.put(keys[i], out[i])  # type: ignore[arg-type]

        if todo:
            run(todo[0])
            pool = ThreadPoolExecutor(max_workers=self.concurrency)
            try:
                for f in [pool.submit(run, i) for i in todo[1:]]:
                    f.result()  # re-raises the first failure
            finally:  # on a failure what is in flight finishes (and is cached); the rest is never sent
                pool.shutdown(wait=True, cancel_futures=True)
        return [g for g in out if g is not None]

    def _complete(self, body: dict[str, Any]) -> Generation:
        d = self._post("/chat/completions", body)
        try:
            choice = d["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise EvalError(f"{self.base_url}: answer is not a chat completion: {str(d)[:200]}") from None
        n = (d.get("usage") or {}).get("completion_tokens", 0)
        return Generation(text.strip(), int(n or 0))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON with retries; every failure ends as one :class:`EvalError` line."""
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            delay = self.backoff_s * 2**attempt
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                reason = _server_message(e)
                if e.code not in _RETRY_STATUS:
                    raise EvalError(self._http_error(e.code, reason)) from None
                last = f"HTTP {e.code}: {reason}"
                after = e.headers.get("Retry-After") if e.headers else None
                delay = float(after) if after and after.replace(".", "", 1).isdigit() else delay
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = f"cannot connect ({getattr(e, 'reason', e)})"
            except ValueError:
                raise EvalError(f"{url}: the answer is not JSON; is this an OpenAI-compatible server?") from None
            if attempt < self.max_retries:
                self.sleep(delay)
        raise EvalError(f"{url}: {last} after {self.max_retries + 1} tries; is the server running?")

    def _http_error(self, code: int, reason: str) -> str:
        if code == 404:
            return (f"{self.base_url}: model {self.model!r} not found or no chat-completions route (HTTP 404: "
                    f"{reason}); check --model against {self.base_url}/models and that --base-url ends in /v1")
        if code in (401, 403):
            return f"{self.base_url}: the server refused the API key (HTTP {code}: {reason}); see --api-key-env"
        return f"{self.base_url}: HTTP {code}: {reason}"


def _server_message(e: urllib.error.HTTPError) -> str:
    """The ``error.message`` of an OpenAI-style error body, else its first 200 characters."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        return str(e.reason)
    try:
        err = json.loads(raw).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg or raw)[:200]
    except (ValueError, AttributeError):
        return raw[:200] or str(e.reason)
