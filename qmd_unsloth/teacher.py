"""Teacher: a small client for any OpenAI-compatible chat endpoint (llama.cpp, Ollama, vLLM, hosted APIs).

    from qmd_unsloth.teacher import Teacher, TeacherError

    with Teacher("http://127.0.0.1:8080/v1", "qwen3", concurrency=4, max_requests=500) as t:
        t.check()                                   # one-line TeacherUnreachable / TeacherAuthError when it is not usable
        reply = t.chat([{"role": "user", "content": "hi"}])          # blocking; raises TeacherError after retries
        fut = t.submit([{"role": "user", "content": "hi"}])          # concurrent.futures.Future[Reply]
        print(reply.text, reply.completion_tokens, t.stats.as_dict())

Built on the ``openai`` client with its own retries switched off (``max_retries=0``: one call, one HTTP request), so
that every HTTP request goes through one loop here and counts against ``max_requests``: the first try, every retry
(429, 408/409, 5xx, timeouts, connection errors and bodies cut short on the wire, with the client's exponential
backoff and jitter, ``Retry-After`` honoured), every re-ask of a 200 whose body is not a chat completion (malformed
or truncated JSON, no choices), and ``check()``'s ``GET /models``.  A budget of N sends at most N HTTP requests.
The API key is read from the environment variable ``api_key_env`` and never printed, logged or written:
``scrub()`` removes it from any text that came back from the server.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field

from .cli import UserError

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "no-key"  # sent when the variable is unset: local servers (llama.cpp, Ollama, vLLM) ignore the key
RETRY_BASE_DELAY, RETRY_MAX_DELAY = 0.5, 8.0  # the openai client's own backoff constants
RETRY_AFTER_MAX = 60.0  # a server-directed delay (Retry-After) longer than this is not waited for: backoff instead


class TeacherError(Exception):
    """One request failed after its retries.  ``kind``: timeout, connection, rate_limited, http_5xx, http_4xx,
    malformed or budget."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


class BudgetExhausted(TeacherError):
    """``max_requests`` requests were sent already."""

    def __init__(self, max_requests: int):
        super().__init__("budget", f"request budget used up (max_requests {max_requests})")


class TeacherUnreachable(UserError):
    """The endpoint cannot be reached (one line: the URL, the reason and what to check)."""


class TeacherAuthError(UserError):
    """The endpoint refused the key or does not know the model (401/403/404): retrying cannot help."""


@dataclass
class Reply:
    text: str  # the message content ("" when the model wrote nothing)
    finish_reason: str | None  # "stop", "length" (cut by max_tokens), ...
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    attempts: int  # HTTP requests sent for this reply (1 unless it was retried)
    retries: int  # attempts - 1


@dataclass
class TeacherStats:
    requests: int = 0  # HTTP requests sent, retries and the start-up check included (each counts against max_requests)
    replies: int = 0
    retries: int = 0  # of those requests, the retries (after a 429, 5xx, timeout, dropped connection, bad body)
    failures: Counter = field(default_factory=Counter)  # kind -> requests that failed after their retries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "replies": self.replies, "retries": self.retries,
                "failures": dict(self.failures), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seconds": round(time.monotonic() - self.started, 2)}


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _root_reason(err: BaseException) -> str:
    """The innermost cause's message (``[Errno 111] Connection refused`` rather than ``Connection error.``)."""
    seen, e = set(), err
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return _one_line(e) or type(e).__name__


class Teacher:
    """Chat requests to one model behind an OpenAI-compatible ``base_url`` (e.g. ``http://127.0.0.1:8080/v1``).

    ``concurrency`` worker threads serve ``submit``; ``max_requests`` (None: unlimited) caps the HTTP requests sent,
    retries included; ``timeout`` is seconds per request; ``max_retries`` is how often one chat request is tried
    again after a retryable failure or a bad body; ``temperature`` and ``max_tokens`` are per-request defaults.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = DEFAULT_API_KEY_ENV, concurrency: int = 4,
                 max_requests: int | None = None, timeout: float = 60.0, max_retries: int = 3,
                 temperature: float = 0.7, max_tokens: int = 512):
        import openai

        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.concurrency, self.max_requests, self.timeout = concurrency, max_requests, timeout
        self.max_retries, self.temperature, self.max_tokens = max_retries, temperature, max_tokens
        self.stats = TeacherStats()
        self._key = os.environ.get(api_key_env) or ""
        # max_retries=0: the client never retries on its own, so every HTTP request is one of ours and is counted
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self._key or NO_KEY, timeout=timeout,
                                     max_retries=0)
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._closed = False

    def __repr__(self) -> str:  # never the key
        return f"Teacher({self.base_url!r}, {self.model!r}, api_key_env={self.api_key_env!r})"

    def __enter__(self) -> "Teacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scrub(self, text: str) -> str:
        """``text`` with the API key replaced by ``***`` (for messages that came back from the server)."""
        return text.replace(self._key, "***") if self._key and len(self._key) >= 4 else text

    # -- checks -----------------------------------------------------------------------------------------------
    def check(self) -> list[str] | None:
        """Fails fast with one line when the endpoint is down or refuses the key; returns the served model ids
        (None when the endpoint has no ``/models`` route, which is not an error).  Its ``GET /models`` requests (a
        second one after a connection failure) count against ``max_requests``."""
        import openai

        client = self._client.with_options(timeout=min(self.timeout, 10.0))
        for attempt in range(2):
            self._take_budget()
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            try:
                return [m.id for m in client.models.list().data]
            except openai.APIConnectionError as e:
                if attempt:
                    raise TeacherUnreachable(
                        f"cannot reach the teacher at {self.base_url} ({self.scrub(_root_reason(e))}); is the server "
                        f"running? check --base-url (OpenAI-compatible servers usually end in /v1)") from None
                time.sleep(RETRY_BASE_DELAY)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise self._auth_error(e) from None
            except (openai.APIStatusError, openai.APIResponseValidationError, ValueError, AttributeError, TypeError):
                return None
        return None

    def _auth_error(self, e) -> TeacherAuthError:
        key = f"the API key from ${self.api_key_env}" if self._key else f"no API key (${self.api_key_env} is unset)"
        return TeacherAuthError(f"{self.base_url} refused {key} (HTTP {e.status_code}); set {self.api_key_env} "
                                f"(or --api-key-env NAME) to a valid key")

    # -- requests ---------------------------------------------------------------------------------------------
    def _take_budget(self) -> None:
        with self._lock:
            if self.max_requests is not None and self.stats.requests >= self.max_requests:
                raise BudgetExhausted(self.max_requests)
            self.stats.requests += 1

    def budget_left(self) -> int | None:
        """Requests that may still be sent (None: unlimited)."""
        with self._lock:
            return None if self.max_requests is None else max(0, self.max_requests - self.stats.requests)

    def _fail(self, kind: str, message: str) -> TeacherError:
        with self._lock:
            self.stats.failures[kind] += 1
        return TeacherError(kind, self.scrub(_one_line(message)))

    @staticmethod
    def _backoff(retry: int, headers=None) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): the server's ``retry-after-ms`` /
        ``retry-after`` when it gives one up to RETRY_AFTER_MAX, else the openai client's exponential backoff
        (0.5 s doubling up to 8 s) less up to 25% jitter."""
        for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
            value = headers.get(header) if headers is not None else None
            try:
                delay = float(value) / scale if value is not None else None
            except ValueError:
                delay = None
            if delay is not None and 0 < delay <= RETRY_AFTER_MAX:
                return delay
        return min(RETRY_BASE_DELAY * 2 ** (retry - 1), RETRY_MAX_DELAY) * (1 - 0.25 * random.random())

    def chat(self, messages: list[dict], *, temperature: float | None = None, max_tokens: int | None = None,
             **extra) -> Reply:
        """One chat completion (blocking): up to ``max_retries + 1`` HTTP requests, each taken from the budget.
        Raises TeacherError after the retries (BudgetExhausted when the budget is used up, possibly between two
        tries), TeacherAuthError at once on 401/403/404.  ``extra`` goes to ``chat.completions.create``."""
        import openai

        t0 = time.monotonic()
        last: tuple[str, str] = ("malformed", "no request sent")
        headers = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._backoff(attempt, headers))
                headers = None
            self._take_budget()
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages,
                    temperature=self.temperature if temperature is None else temperature,
                    max_tokens=self.max_tokens if max_tokens is None else max_tokens, **extra)
            except openai.APITimeoutError:
                last = ("timeout", f"no answer within {self.timeout:g} s")
                continue
            except openai.APIConnectionError as e:  # refused, reset, or a body cut short on the wire
                last = ("connection", f"connection failed ({_root_reason(e)})")
                continue
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise self._auth_error(e) from None
            except openai.NotFoundError as e:
                raise TeacherAuthError(
                    f"{self.base_url}/chat/completions answered 404 for model {self.model!r} "
                    f"({self.scrub(_one_line(e.message, 120))}); check --model and --base-url") from None
            except openai.APIStatusError as e:
                kind = "rate_limited" if e.status_code == 429 else f"http_{e.status_code // 100}xx"
                last = (kind, f"HTTP {e.status_code}: {e.message}")
                if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                    raise self._fail(kind, last[1])
                headers = getattr(e.response, "headers", None)
                continue
            try:
                completion = raw.parse()
                choice = completion.choices[0]
                text = choice.message.content
                if text is not None and not isinstance(text, str):
                    raise TypeError("content is not a string")
            except (ValueError, TypeError, AttributeError, IndexError, KeyError, openai.APIResponseValidationError):
                last = ("malformed", "the body was not a chat completion")
                continue  # malformed or truncated JSON, no choices: ask again
            usage = getattr(completion, "usage", None)
            reply = Reply(text or "", getattr(choice, "finish_reason", None),
                          int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0),
                          time.monotonic() - t0, attempt + 1, attempt)
            with self._lock:
                self.stats.replies += 1
                self.stats.prompt_tokens += reply.prompt_tokens
                self.stats.completion_tokens += reply.completion_tokens
            return reply
        raise self._fail(last[0], f"{last[1]} ({self.max_retries + 1} tries)")

    # -- concurrency ------------------------------------------------------------------------------------------
    def submit(self, messages: list[dict], **kwargs) -> Future:
        """``chat`` on one of ``concurrency`` worker threads; returns a Future of the Reply (or its exception)."""
        if self._closed:
            raise RuntimeError("teacher is closed")
        fut: Future = Future()
        self._jobs.put((fut, messages, kwargs))
        if len(self._workers) < self.concurrency:
            # Daemon threads, not a ThreadPoolExecutor: the executor joins its workers at exit, so Ctrl-C would
            # wait for every request in flight (up to timeout x retries); daemon workers die with the process.
            t = threading.Thread(target=self._work, name=f"teacher-{len(self._workers)}", daemon=True)
            self._workers.append(t)
            t.start()
        return fut

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, messages, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self.chat(messages, **kwargs))
            except BaseException as e:  # the caller sees it through the future
                fut.set_exception(e)

    def close(self) -> None:
        """Stops the workers after their current request (queued jobs are cancelled) and closes the client."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._workers:
            self._jobs.put(None)
        self._client.close()
