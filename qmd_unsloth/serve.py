"""Serve: a local OpenAI-compatible server for a GGUF, QMD's /expand, and a checked hot swap of the model.

    python -m qmd_unsloth.serve --model runs/gguf/qmd-query-expansion-q4_k_m.gguf [--host 127.0.0.1] [--port 8765]
    python -m qmd_unsloth.serve reload --model NEW.gguf [--url http://127.0.0.1:8765] [--token ...]

Endpoints: ``GET /health`` (model path, load time, requests served), ``GET /v1/models``, ``POST
/v1/chat/completions`` (OpenAI-compatible, ``max_tokens`` honoured; a chat without a system message gets
node-llama-cpp's default system prompt, as QMD's chat session does), ``GET /expand?q=QUERY`` (QMD's prompt, sampling,
grammar and 600-token cap: the lines, the ones QMD would keep, their reward, and ``searches`` in the shape QMD's own
HTTP ``POST /query`` takes), ``POST /admin/reload-model`` with ``{"path": FILE}``.

QMD itself never calls this server: it runs the GGUF in its own process (node-llama-cpp).  ``serve`` is for
OpenAI-compatible clients, for trying a model by hand and for hot swaps; a QMD user can send ``/expand``'s
``searches`` to ``qmd mcp --http``'s ``POST /query`` (docs/serving.md).
A reload runs the export's checks (qmd_unsloth.gguf_check) on the new file while the old model keeps serving, then
swaps; a file that fails is refused with the reason (HTTP 422) and the old model stays.  Requests in flight finish on
the model they started on; the old model is closed when its last request ends.

Binds 127.0.0.1 by default.  Any other address needs a token (``--token`` or QMD_UNSLOTH_SERVE_TOKEN); requests from
non-loopback clients must then send ``Authorization: Bearer TOKEN`` (an OpenAI client's api_key).  The token is never
logged.  A request that carries a proxy header (``Forwarded``, ``X-Forwarded-For``, ``X-Real-IP``) is not trusted as
local even from a loopback address: a reverse proxy on the same host makes every remote client look like loopback.
Admin calls need the token whenever one is configured, from any client; without a token they are open to unproxied
loopback clients only.  A prompt longer than the context is refused with HTTP 400 and one line.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import ipaddress
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .cli import UserError, command

DEFAULT_URL = "http://127.0.0.1:8765"
TOKEN_ENV = "QMD_UNSLOTH_SERVE_TOKEN"
log = logging.getLogger("uvicorn.error")


class ServeError(UserError, RuntimeError):
    """A user-facing serve problem (one line)."""


class PromptTooLong(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------- the models


class ServedModel:
    """One loaded llama.cpp model.  A llama.cpp context is not thread-safe: generation is serialised by ``lock``."""

    def __init__(self, path: Path, llm, info: dict):
        from llama_cpp import LlamaGrammar

        from .qmd_contract import GRAMMAR

        self.path, self.llm, self.info = Path(path).resolve(), llm, info
        self.fmt = info["chat_format"]  # how QMD's node-llama-cpp wraps this model's chats (gguf_check)
        self.grammar = LlamaGrammar.from_string(GRAMMAR, verbose=False)
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.lock = threading.Lock()
        self.rng = random.Random(0)
        self.users = 0
        self.served = 0
        self.retired = self.closed = False

    @classmethod
    def load(cls, path: Path, n_ctx: int = 2048) -> "ServedModel":
        """Loads and checks a GGUF (qmd_unsloth.gguf_check); raises GGUFCheckError with the reason."""
        from .gguf_check import exported_format, load_checked

        t0 = time.perf_counter()
        # the training wrapper from the export.json beside the file, when there is one: then the file is verified
        llm, info = load_checked(Path(path), expected=exported_format(Path(path)), n_ctx=n_ctx)
        info["verify_seconds"] = round(time.perf_counter() - t0, 3)
        return cls(path, llm, info)

    def generate(self, prompt: str, max_tokens: int, grammar: bool = False, seed: int | None = None,
                 **sampling) -> dict:
        from .llamacpp import generate_capped

        with self.lock:
            n_prompt = len(self.llm.tokenize(prompt.encode(), add_bos=False, special=True))
            room = self.llm.n_ctx() - n_prompt
            if room <= 0:
                raise PromptTooLong(f"the prompt is {n_prompt} tokens; the context holds {self.llm.n_ctx()}")
            cap = min(max_tokens, room)
            self.llm.set_seed(seed if seed is not None else self.rng.randrange(2**31))
            t0 = time.perf_counter()
            text, n, stopped = generate_capped(self.llm, prompt, cap, grammar=self.grammar if grammar else None,
                                               **sampling)
            return {"text": text, "prompt_tokens": n_prompt, "tokens": n, "stopped": stopped,
                    "finish_reason": "stop" if stopped else "length", "seconds": round(time.perf_counter() - t0, 4)}

    def close(self) -> None:
        with self.lock:
            self.llm.close()


class ModelSlot:
    """The current model behind a reference that a swap replaces in one step.  A request takes the current model
    (``acquire``) and gives it back when its generation ends (``release``); a replaced model is closed when its last
    request is done, so requests in flight finish on the model they started on."""

    def __init__(self, model: ServedModel):
        self._lock = threading.Lock()
        self.current = model
        self.requests_served = 0
        self.reloads = 0
        self.started = time.time()

    def acquire(self) -> ServedModel:
        with self._lock:
            m = self.current
            m.users += 1
            return m

    def release(self, m: ServedModel, served: bool) -> None:
        with self._lock:
            m.users -= 1
            if served:
                m.served += 1
                self.requests_served += 1
            close = m.retired and m.users == 0 and not m.closed
            m.closed = m.closed or close
        if close:
            m.close()

    def swap(self, new: ServedModel) -> ServedModel:
        with self._lock:
            old, self.current = self.current, new
            old.retired = True
            self.reloads += 1
            close = old.users == 0 and not old.closed
            old.closed = old.closed or close
        if close:
            old.close()
        return old

    def run(self, fn, *args, **kwargs):
        """Runs ``fn(model, ...)`` on the model current at the call (in a worker thread; releases it there)."""
        m = self.acquire()
        ok = False
        try:
            out = fn(m, *args, **kwargs)
            ok = True
            return m, out
        finally:
            self.release(m, ok)


# ---------------------------------------------------------------------------------------------------- the app


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields a local model has no use for
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    grammar: Literal["qmd"] | None = Field(None, description="'qmd': only (lex|vec|hyde): lines")


class ReloadRequest(BaseModel):
    path: str = Field(min_length=1)



def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# Headers a reverse proxy adds (RFC 7239 Forwarded, the de facto X-Forwarded-For, nginx's X-Real-IP): a request that
# carries one came through a proxy, so its loopback address says nothing about where the client is.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def proxied_by(headers) -> str | None:
    """The first proxy header a request carries (its name as sent on the wire, lowercased), or None."""
    for name in PROXY_HEADERS:
        if name in headers:
            return name
    return None


def token_matches(header: str | None, token: str | None) -> bool:
    """Constant-time comparison of an ``Authorization: Bearer ...`` header with the server's token."""
    if not token or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def create_app(slot: ModelSlot, token: str | None = None, max_tokens: int = 600, n_ctx: int = 2048):
    """The FastAPI app over a model slot.  Clients that are not loopback must send the token (``token`` None: they
    are always refused)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from .gguf_check import GGUFCheckError, describe_checks
    from .prompt import parse_completion
    from .qmd_contract import kept, kept_lines, llama_cpp_sampling
    from .reward import score_expansion

    SAMPLING = llama_cpp_sampling()

    import asyncio

    app = FastAPI(title="qmd_unsloth serve", version="1")
    reload_lock = asyncio.Lock()

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ())[1:]) or "body"
        return error(400, f"{where}: {e.get('msg')}")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        host = request.client.host if request.client else None
        proxy = proxied_by(request.headers)
        local = is_loopback(host) and proxy is None
        admin = request.url.path.startswith("/admin/")
        if token_matches(request.headers.get("authorization"), token) or (local and not (admin and token)):
            return await call_next(request)
        what = "admin calls" if admin else "requests"
        if not local:
            who = f"through a proxy ({proxy} header)" if proxy else "from a non-loopback client"
            need = "'Authorization: Bearer <token>'" if token else \
                f"a token, and this server has none (start it with {TOKEN_ENV} set)"
            return error(401, f"{what} {who} need {need}", "authentication_error")
        return error(401, f"{what} need 'Authorization: Bearer <token>' (this server has a token)",
                     "authentication_error")

    @app.get("/health")
    async def health():
        m = slot.current
        return {"status": "ok", "model": str(m.path), "loaded_at": m.loaded_at,
                "load_seconds": m.info.get("verify_seconds"), "file_type": m.info.get("file_type"),
                "verified": m.info.get("verified"), "requests_served": slot.requests_served, "requests_on_this_model": m.served,
                "reloads": slot.reloads}

    @app.get("/v1/models")
    async def models():
        m = slot.current
        return {"object": "list", "data": [{"id": m.path.name, "object": "model", "created": int(slot.started),
                                            "owned_by": "qmd_unsloth"}]}

    def _text(content) -> str:
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if p.get("type") == "text")
        return content or ""

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.stream:
            return error(400, "stream: streaming is not supported; send stream=false")
        if req.n != 1:
            return error(400, "n: only n=1 is supported")
        chat_msgs = [{"role": m.role, "content": _text(m.content)} for m in req.messages]
        cap = min(req.max_completion_tokens or req.max_tokens or max_tokens, n_ctx)
        sampling = {"temp": SAMPLING["temp"] if req.temperature is None else req.temperature,
                    "top_k": SAMPLING["top_k"] if req.top_k is None else req.top_k,
                    "top_p": SAMPLING["top_p"] if req.top_p is None else req.top_p,
                    "presence_penalty": SAMPLING["presence_penalty"] if req.presence_penalty is None
                    else req.presence_penalty}

        def work(m: ServedModel):
            return m.generate(m.fmt.chat(chat_msgs), cap, grammar=req.grammar == "qmd", seed=req.seed,
                              **{**SAMPLING, **sampling})

        try:
            m, out = await run_in_threadpool(slot.run, work)
        except PromptTooLong as e:
            return error(400, f"messages: {e}")
        text, finish = out["text"], out["finish_reason"]
        for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []):
            if s and s in text:
                text, finish = text[:text.index(s)], "stop"
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": m.path.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["tokens"],
                          "total_tokens": out["prompt_tokens"] + out["tokens"]}}

    @app.get("/expand")
    async def expand(q: str = Query(..., min_length=1, description="the search query"),
                     max_tokens: int = Query(max_tokens, gt=0, le=n_ctx), seed: int | None = None):
        if not q.strip():
            return error(400, "q: the query is empty")

        def work(m: ServedModel):
            return m.generate(m.fmt.prompt(q), max_tokens, grammar=True, seed=seed, **SAMPLING)

        try:
            m, out = await run_in_threadpool(slot.run, work)
        except PromptTooLong as e:
            return error(400, f"q: the query is too long: {e}")
        score = score_expansion(q, out["text"])
        searches = [{"type": "lex", "query": q.strip()}, {"type": "vec", "query": q.strip()}] + [
            {"type": k, "query": t} for k, t in kept_lines(q, out["text"])]
        return {"query": q, "model": m.path.name,
                "lines": [{"kind": k, "text": t} for k, t in parse_completion(out["text"])],
                "kept": [{"kind": k, "text": t} for k, t in kept(q, out["text"])],
                "searches": searches, "text": out["text"], "tokens": out["tokens"], "stopped": out["stopped"],
                "seconds": out["seconds"], "score": round(score.score, 4), "rating": score.rating}

    @app.post("/admin/reload-model")
    async def reload_model(req: ReloadRequest):
        async with reload_lock:  # one reload at a time; generation goes on meanwhile
            path = Path(req.path).expanduser().resolve()
            old = slot.current
            try:
                new = await run_in_threadpool(ServedModel.load, path, n_ctx)
            except GGUFCheckError as e:
                log.warning("reload refused, still serving %s: %s", old.path, e)
                return error(422, str(e), "invalid_model")
            slot.swap(new)
            log.info("reload: now serving %s (was %s)", new.path, old.path)
            return {"status": "ok", "model": str(new.path), "previous": str(old.path),
                    "load_seconds": new.info["verify_seconds"], "file_type": new.info["file_type"],
                    "verified": new.info["verified"], "checks": describe_checks(new.info),
                    "smoke_generation": new.info["smoke_generation"]}

    return app


# ---------------------------------------------------------------------------------------------------- the client


def reload_model(url: str, path: str | os.PathLike, token: str | None = None, timeout: float = 600) -> dict:
    """Asks a running server to hot-swap to ``path`` (made absolute here); raises ServeError with the server's
    reason when it refuses."""
    import httpx

    token = token or os.environ.get(TOKEN_ENV) or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target = url.rstrip("/") + "/admin/reload-model"
    try:
        r = httpx.post(target, json={"path": str(Path(path).expanduser().resolve())}, headers=headers,
                       timeout=timeout)
    except httpx.HTTPError as e:
        raise ServeError(f"{url}: cannot reach the server ({type(e).__name__}: {e}); is "
                         "`python -m qmd_unsloth.serve` running there?") from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code != 200:
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else None
        raise ServeError(f"{url}: reload refused (HTTP {r.status_code}): {msg or r.text[:200]}")
    return body


# ---------------------------------------------------------------------------------------------------- the server


class _Redact(logging.Filter):
    """Removes the token from any log record (defence in depth: uvicorn logs paths and query strings, not headers)."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        s = self.secret
        if isinstance(record.msg, str) and s in record.msg:
            record.msg = record.msg.replace(s, "***")
        if isinstance(record.args, tuple):
            record.args = tuple(a.replace(s, "***") if isinstance(a, str) and s in a else a for a in record.args)
        return True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port in use, address not on this machine)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        reason = {errno.EADDRINUSE: "address already in use; choose another --port or stop the process that holds it",
                  errno.EADDRNOTAVAIL: "that address is not on this machine"}.get(e.errno, e.strerror)
        raise ServeError(f"{host}:{port}: {reason}") from None
    sock.listen(2048)
    return sock


def serve(cfg) -> None:
    import uvicorn

    if cfg.model is None:
        raise ServeError("--model is required (a .gguf file)")
    token = cfg.token.get_secret_value() if cfg.token else None
    if not is_loopback(cfg.host) and cfg.host != "localhost" and not token:
        raise ServeError(f"--host {cfg.host} is not loopback: give a token (--token or the environment variable "
                         f"{TOKEN_ENV}) that non-loopback clients must send")
    sock = bind(cfg.host, cfg.port)
    try:
        model = ServedModel.load(cfg.model, cfg.n_ctx)
        slot = ModelSlot(model)
        app = create_app(slot, token, cfg.max_tokens, cfg.n_ctx)
        config = uvicorn.Config(app, log_level=cfg.log_level, access_log=True, timeout_graceful_shutdown=5)
        if token:
            redact = _Redact(token)
            for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
                for h in logging.getLogger(name).handlers:
                    h.addFilter(redact)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        rule = ("required for admin calls and for non-loopback or proxied clients" if token
                else "none (only unproxied loopback clients are served)")
        from .gguf_check import describe_checks

        print(f"serve: http://{shown}:{port} {model.path} ({model.info['file_type']}, "
              f"{describe_checks(model.info)}; loaded in {model.info['verify_seconds']} s); token {rule}", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    slot.current.close()


@command("serve")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["reload"]:
        ap = argparse.ArgumentParser(prog="python -m qmd_unsloth.serve reload",
                                     description="Hot-swap a running server to a new GGUF (checked there first).")
        ap.add_argument("--model", required=True, help="the new .gguf file")
        ap.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
        ap.add_argument("--token", help=f"bearer token (default: the environment variable {TOKEN_ENV})")
        args = ap.parse_args(argv[1:])
        out = reload_model(args.url, args.model, args.token)
        print(f"reload: {args.url} now serves {out['model']} (was {out['previous']}; {out.get('checks') or 'checked'}; "
              f"loaded in {out['load_seconds']} s)")
        return 0
    from .config import parse_stage_args, stage_parser

    parser = stage_parser("serve", __doc__.split("\n\n")[0])
    cfg, _ = parse_stage_args("serve", __doc__, argv, extra=parser)
    serve(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
