"""The HTTP server: OpenAI-compatible completions, a health check and the web playground.

    GET  /                 the playground (static/playground.html)
    GET  /health           the model's name and config, and what the server is doing
    GET  /v1/models        the one model served, as OpenAI lists models
    GET  /metrics          Prometheus metrics (metrics.py)
    POST /v1/completions   OpenAI's legacy completions API, streamed as server-sent events on request
    POST /v1/chat/completions  OpenAI's chat API, for a model fine-tuned by `scratchgpt sft`: the
                           messages are rendered by the one chat template (chat/template.py), and
                           the reply, through the same scheduler, ends at the model's <|end|>

The server is a thin layer over the one decoding engine (inference/engine.py), the one the CLI
and `generate_text` step: its scheduler (scheduler.py) admits requests and steps the engine for
all of them, one forward pass advancing every running request at a shape that does not depend
on how many run, so the same seed gives the same text alone or beside fifteen others.
`scratchgpt serve` runs that engine in a process of its own (process.py), so that its Python and
the event loop's do not take turns on one interpreter lock. The engine turns tokens into text;
this layer encodes the prompt once, checks the request, and turns each step's chunks of text into
JSON, read on the event loop as they arrive. It clamps what callers may ask for
(--max-tokens-cap, n, logprobs) and answers bad requests with a 400 and a JSON message; a client
that goes away frees its slot at the next step.

For a shared server (a classroom): an optional API key guards /v1/* (`Authorization: Bearer KEY`,
else a 401), a body over --max-body-bytes is a 413 and a prompt over --max-prompt-tokens a 400,
a full server (ServerBusy, raised when a request is accepted) is a 429 with Retry-After (a stopped
scheduler, SchedulerStopped, a 503), and on
SIGTERM uvicorn stops accepting, lets running requests finish for up to --drain-seconds, and the
lifespan's shutdown then calls ServerState.close. /health shows the load: ServerState.load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat.talk import reply_request
from ..chat.template import ChatError, Message, as_messages, is_chat_tokenizer
from ..errors import ScratchGPTError, TokenizerError
from ..inference.engine import SamplingError, SamplingSettings
from ..inference.text import CompletionChunk, TokenDetail
from ..model import count_parameters
from .metrics import ServerMetrics
from .protocol import DEFAULT_HEADER_TIMEOUT, with_header_timeout
from .scheduler import (
    DEFAULT_MAX_WAITING,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SLOTS,
    Scheduler,
    ServerBusy,
    Stream,
    retry_after_header,
)

DEFAULT_MAX_TOKENS_CAP = 2048
MAX_SAMPLES = 16  # n
MAX_LOGPROBS = 20  # alternatives per token
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters of one stop string: each token's check looks that far back
REQUEST_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}  # engine field -> API field
DISCONNECT_POLL_S = 0.2  # how often a non-streamed request checks that its client is still there
DEFAULT_MAX_BODY_BYTES = 1_000_000  # --max-body-bytes: a larger request body is a 413
DEFAULT_MAX_PROMPT_TOKENS = 8192  # --max-prompt-tokens: a longer prompt is a 400
DEFAULT_MAX_CONNECTIONS = 256  # --max-connections: beyond this many at once, uvicorn answers 503
DEFAULT_DRAIN_SECONDS = 30.0
ENGINE_WATCH_S = 0.5  # how often `serve` checks that its engine is still there  # --drain-seconds: how long SIGTERM lets running requests finish
API_KEY_ENV = "SCRATCHGPT_API_KEY"  # where `scratchgpt serve` finds the key when --api-key is not given
LOAD_WINDOW_S = 5.0  # /health's tokens_per_second is the rate over this many seconds


# --- the request, and the errors it can earn ---------------------------------------------------------------------

class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields, plus top_k and repetition_penalty."""

    prompt: str | list[str] | None = None
    model: str | None = None  # one model is served; the name is accepted and ignored
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # 0 or absent: no top-k filter
    repetition_penalty: float = 1.0
    n: int = 1
    stream: bool = False
    logprobs: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions: OpenAI's fields, plus top_k and repetition_penalty."""

    messages: list[dict[str, Any]] | None = None
    model: str | None = None
    max_tokens: int | None = None  # the older name of max_completion_tokens
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    n: int = 1
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None


class BadRequest(Exception):
    """A request the server refuses: answered with a 400 and {"error": {"message": ...}}."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None, *, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with the given status: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    """Exception handler: a BadRequest raised anywhere in a route becomes a 400."""
    return _error(400, str(exc), exc.param)


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Exception handler: a body pydantic rejects is a 400 naming the first field at fault (FastAPI says 422)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request body")
    return _error(400, f"invalid request: {message}", where or None)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Exception handler: Starlette's own refusals (a body that is not UTF-8 or not JSON, an unknown path, a wrong
    method) in the API's error shape instead of {"detail": ...}."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _error(exc.status_code, str(exc.detail), kind=kind, headers=getattr(exc, "headers", None))


async def _server_busy(request: Request, exc: ServerBusy) -> JSONResponse:
    """Exception handler: every slot taken and the waiting line full is a 429 with Retry-After, as OpenAI answers;
    a scheduler that has stopped (SchedulerStopped: shutting down, or its process died) a 503."""
    retry_after = retry_after_header(exc)
    if exc.status == 503:
        return _error(503, str(exc), kind="server_error", code="service_unavailable",
                      headers={"Retry-After": retry_after})
    return _error(429, str(exc) or "the server is busy; retry later", kind="requests", code="rate_limit_exceeded",
                  headers={"Retry-After": retry_after})


# --- in front of every route: the API key and the size of a request body ------------------------------------------

def _needs_key(path: str) -> bool:
    """Whether a path is the API (/v1/*), its schema or its metrics, which a key guards; / and /health stay open."""
    return path == "/v1" or path.startswith("/v1/") or path in ("/openapi.json", "/metrics")


class _Guard:
    """ASGI middleware: with an API key set, a /v1/* request without `Authorization: Bearer KEY` is a 401; a
    request body over `max_body_bytes` is a 413, by its Content-Length or, without one, by counting what arrives."""

    def __init__(self, app, api_keys: Sequence[str], max_body_bytes: int,
                 on_status: Callable[[str, int], None] = lambda path, status: None):
        self.app = app
        self.keys = [key.encode("utf-8") for key in api_keys]
        self.max_body_bytes = max_body_bytes
        self.on_status = on_status  # hears every response's path and status (the metrics)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._counting(scope["path"], send)
        headers = dict(scope["headers"])  # lower-case names; of repeated headers the last counts
        if self.keys and _needs_key(scope["path"]):
            refusal = self._key_refusal(headers.get(b"authorization"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if b"content-length" in headers and b"transfer-encoding" in headers:  # which one frames the body?
            await _error(400, "the request has both Content-Length and Transfer-Encoding: send one")(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:  # refused before a byte of the body is read
            await self._too_large()(scope, receive, send)
            return
        # The body as it arrives, counted whatever the headers said, up to the limit; then handed on.
        received = await self._read_body(receive)
        if received is None:
            await self._too_large()(scope, receive, send)
            return
        await self.app(scope, _replay(received, receive), send)

    def _counting(self, path: str, send):
        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.on_status(path, message["status"])
            await send(message)
        return counted

    def _key_refusal(self, authorization: bytes | None) -> JSONResponse | None:
        """None if `authorization` carries this server's key (compared in constant time), else the 401."""
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        # Every key is compared, each in constant time, so the time taken says nothing of which came close.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        if scheme.lower() == b"bearer" and any(matches):
            return None
        if authorization is None:
            message = ("this server needs an API key: send the header 'Authorization: Bearer KEY' "
                       "(the openai client sends it given api_key=KEY)")
        else:
            message = "incorrect API key: 'Authorization: Bearer KEY' does not carry this server's key"
        return _error(401, message, kind="invalid_request_error", code="invalid_api_key",
                      headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, receive) -> list[dict] | None:
        """The request's body messages, or None as soon as they add up to more than the limit."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left: let the app see it
                return messages
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    def _too_large(self) -> JSONResponse:
        return _error(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes "
                           "(--max-body-bytes)")


def _replay(messages: list[dict], receive):
    """An ASGI receive that gives `messages` first, then whatever `receive` gives."""
    pending = collections.deque(messages)

    async def replayed() -> dict:
        return pending.popleft() if pending else await receive()
    return replayed


# --- what every route shares ---------------------------------------------------------------------------------------

class _Stats:
    """Counters shown by /health: requests generating now, tokens generated since the start, and their recent rate."""

    BUCKET_S = 0.1  # the recent tokens are counted per tenth of a second

    def __init__(self, on_tokens: Callable[[int], None] = lambda n: None) -> None:
        self._lock = threading.Lock()
        self.on_tokens = on_tokens  # hears every count of new tokens (the metrics)
        self.active = 0
        self.tokens_generated = 0
        self.started = time.monotonic()
        self._recent: collections.deque[list[int]] = collections.deque()  # [bucket number, tokens], oldest first

    def add_tokens(self, n: int) -> None:
        """Count `n` more generated tokens (called from worker threads)."""
        bucket = int(time.monotonic() / self.BUCKET_S)
        self.on_tokens(n)
        with self._lock:
            self.tokens_generated += n
            if self._recent and self._recent[-1][0] == bucket:
                self._recent[-1][1] += n
            else:
                self._recent.append([bucket, n])
                self._forget(bucket)

    def _forget(self, bucket: int) -> None:
        """Drop the buckets older than the window (the lock is held)."""
        oldest = bucket - int(LOAD_WINDOW_S / self.BUCKET_S)
        while self._recent and self._recent[0][0] < oldest:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Tokens generated over the last LOAD_WINDOW_S seconds (or since the start, if sooner), per second."""
        now = time.monotonic()
        with self._lock:
            self._forget(int(now / self.BUCKET_S))
            recent = sum(count for _, count in self._recent)
        return recent / max(min(LOAD_WINDOW_S, now - self.started), self.BUCKET_S)

    def add_active(self, n: int) -> None:
        """Count `n` more (or, negative, fewer) requests generating now."""
        with self._lock:
            self.active += n


@dataclass
class ServerState:
    """What the routes share: the model and tokenizer, the limits, the scheduler and the counters."""

    model: torch.nn.Module
    tokenizer: Any
    model_name: str
    model_config: dict
    max_tokens_cap: int
    max_logprobs: int
    scheduler: Scheduler
    metrics: ServerMetrics
    stats: _Stats = field(default_factory=_Stats)
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer, model_name: str, config: dict | None,
              max_tokens_cap: int, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
              batching: BatchingLimits | None = None) -> ServerState:
        """The state for `model`; `config` defaults to the model's own, logprobs are capped by the vocabulary."""
        model_config = config if config is not None else vars(model.config)
        max_logprobs = min(MAX_LOGPROBS, tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else MAX_LOGPROBS)
        limits = batching or BatchingLimits()
        metrics = ServerMetrics()
        scheduler = Scheduler(model, tokenizer, limits.slots, limits.max_waiting, limits.request_timeout,
                              own_process=limits.own_process, compile=limits.compile,
                              on_step=metrics.step_seconds.observe)
        metrics.follow(scheduler.load)
        return cls(model, tokenizer, model_name, model_config, max_tokens_cap, max_logprobs, scheduler, metrics,
                   stats=_Stats(on_tokens=metrics.tokens.inc), max_prompt_tokens=max_prompt_tokens)

    @property
    def max_samples(self) -> int:
        """The largest n: one slot per sample."""
        return min(MAX_SAMPLES, self.scheduler.slots)

    def load(self) -> dict[str, Any]:
        """What /health reports of the load: requests running and waiting for a slot, and the tokens generated
        per second over the last few seconds."""
        return {"tokens_per_second": round(self.stats.tokens_per_second(), 1), **self.scheduler.load()}

    def close(self) -> None:
        """Stop the scheduler; called once at shutdown, after uvicorn has drained the running requests."""
        self.scheduler.close()


@dataclass
class BatchingLimits:
    """How many requests run at once (slots), how many may wait for one, how long one may run, and whether the
    engine runs in a process of its own (process.py; `scratchgpt serve` does unless --in-process)."""

    slots: int = DEFAULT_SLOTS
    max_waiting: int = DEFAULT_MAX_WAITING
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    own_process: bool = False
    compile: bool = False  # the engine's passes compiled (inference/compiled.py, `serve --compile`): built once per shape


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the ServerState that create_app put on app.state."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


# --- checking a request --------------------------------------------------------------------------------------------

def _prompt_of(body: CompletionRequest) -> str:
    """The one prompt string of the request, or BadRequest."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest(f"prompt must be one string (or a list of one), got a list of {len(prompt)}; use n for several samples", "prompt")
        prompt = prompt[0]
    if prompt is None:
        raise BadRequest("prompt is required: the text to continue", "prompt")
    if not prompt:
        raise BadRequest("prompt must not be empty", "prompt")
    _check_text(prompt, "prompt")
    return prompt


def _check_text(text: str, param: str) -> None:
    """Refuse a string that JSON allows but Unicode does not: a lone surrogate (\\ud800 alone) has no encoding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{param} is not valid text: character {exc.start} is a lone surrogate "
                         f"(U+{ord(text[exc.start]):04X}); send UTF-8 text", param) from None


def _check_limits(body: CompletionRequest, state: ServerState) -> list[str]:
    """Refuse what this server does not allow (echo, the caps on tokens, n, logprobs, stops); returns the stop list."""
    if body.echo:
        raise BadRequest("echo is not supported; the prompt is not repeated in the answer", "echo")
    if body.max_tokens > state.max_tokens_cap:
        raise BadRequest(f"max_tokens must be <= {state.max_tokens_cap} (this server's --max-tokens-cap), got {body.max_tokens}", "max_tokens")
    if not 1 <= body.n <= state.max_samples:
        raise BadRequest(f"n must be between 1 and {state.max_samples}, got {body.n}", "n")
    if body.logprobs is not None and not 0 <= body.logprobs <= state.max_logprobs:
        raise BadRequest(f"logprobs must be between 0 and {state.max_logprobs}, got {body.logprobs}", "logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
    if any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise BadRequest(f"a stop string may be at most {MAX_STOP_LENGTH} characters long", "stop")
    for s in stop:
        _check_text(s, "stop")
    if body.top_k is not None and body.top_k < 0:
        raise BadRequest(f"top_k must be >= 0 (0 turns it off), got {body.top_k}", "top_k")
    return stop


def _settings(body: CompletionRequest, state: ServerState) -> SamplingSettings:
    """The engine's settings for a request's sampling fields, checked against this server's limits and the engine's
    own ranges, or BadRequest (completions and chat completions alike)."""
    stop = _check_limits(body, state)
    settings = SamplingSettings(
        max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k or None, top_p=body.top_p,
        repetition_penalty=body.repetition_penalty, stop=stop, num_samples=body.n, seed=body.seed, logprobs=body.logprobs,
    )
    try:
        settings.validate(REQUEST_NAMES)
    except SamplingError as exc:
        raise BadRequest(str(exc), exc.param) from None
    return settings


def settings_for(body: CompletionRequest, state: ServerState) -> tuple[str, list[int], SamplingSettings]:
    """Check the request and turn it into the prompt, its ids (encoded once, here) and the engine's settings,
    or raise BadRequest."""
    prompt = _prompt_of(body)
    settings = _settings(body, state)
    try:  # the tokenizer's check, before any decoding starts
        prompt_ids = state.tokenizer.encode(prompt)
    except TokenizerError as exc:
        raise BadRequest(f"prompt: {exc}", "prompt") from None
    if len(prompt_ids) > state.max_prompt_tokens:
        raise BadRequest(f"prompt is {len(prompt_ids)} tokens; this server takes at most {state.max_prompt_tokens} "
                         "(--max-prompt-tokens)", "prompt")
    return prompt, prompt_ids, settings


def _chat_messages(body: ChatRequest, state: ServerState) -> list[Message]:
    """The request's messages, checked; a content given as text parts is joined."""
    if not is_chat_tokenizer(state.tokenizer):
        raise BadRequest("this model is not a chat model (its tokenizer has no role tokens): serve a checkpoint "
                         "fine-tuned by `scratchgpt sft`, or use /v1/completions", "messages")
    raw = [_joined_parts(m) for m in (body.messages if body.messages is not None else [])]
    try:
        messages = as_messages(raw, "messages")
    except ChatError as exc:
        raise BadRequest(str(exc), "messages") from None
    for i, m in enumerate(messages):
        _check_text(m.content, f"messages[{i}].content")
    return messages


def _joined_parts(message: Any) -> Any:
    """A message whose content is text parts ([{"type": "text", "text": ...}, ...]) as one string; others as they are."""
    if not (isinstance(message, dict) and isinstance(message.get("content"), list)):
        return message
    parts = message["content"]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise BadRequest("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported", "messages")
    return {**message, "content": "".join(p["text"] for p in parts)}


def chat_settings_for(body: ChatRequest, state: ServerState) -> tuple[list[int], SamplingSettings]:
    """Check a chat request and turn it into the rendered conversation's ids and the engine's settings (ending at <|end|>)."""
    messages = _chat_messages(body, state)
    block = state.model.config.block_size
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = CompletionRequest(  # the fields both APIs share, checked by the same rules
        max_tokens=limit if limit is not None else min(block, state.max_tokens_cap), temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k, repetition_penalty=body.repetition_penalty, n=body.n, stop=body.stop,
        seed=body.seed, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    settings = _settings(sampling, state)
    try:
        ids, settings = reply_request(messages, state.tokenizer, block, settings)
    except ChatError as exc:
        raise BadRequest(str(exc), "messages") from None
    except TokenizerError as exc:
        raise BadRequest(f"messages: {exc}", "messages") from None
    if len(ids) > state.max_prompt_tokens:
        raise BadRequest(f"the conversation is {len(ids)} tokens; this server takes at most {state.max_prompt_tokens} "
                         "(--max-prompt-tokens)", "messages")
    return ids, settings


def _chat_logprobs(details: list[TokenDetail], n_top: int) -> dict[str, list]:
    """OpenAI's chat logprobs: per token its text, bytes, log-probability and the top alternatives."""
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(d.text, d.logprob), "top_logprobs": [entry(t, lp) for t, lp in list(d.top.items())[:n_top]]}
                        for d in details]}


# --- one completion: its JSON, streamed or whole -------------------------------------------------------------------

def _logprobs_json(details: list[TokenDetail], prompt_length: int) -> dict[str, list]:
    """OpenAI's legacy logprobs: text_offset counts characters from the start of the prompt."""
    return {
        "tokens": [d.text for d in details],
        "token_logprobs": [d.logprob for d in details],
        "top_logprobs": [d.top for d in details],
        "text_offset": [prompt_length + d.offset for d in details],
    }


@dataclass
class _Generation:
    """One completion under way: the scheduler's stream of its chunks, and what every JSON answer repeats."""

    prompt: str
    settings: SamplingSettings
    stream: Stream
    header: dict[str, Any]
    prompt_tokens: int
    stats: _Stats
    chat: bool = False  # a chat completion: messages and deltas instead of text
    _counted: dict[int, int] = field(default_factory=dict)  # tokens of each sample already counted in stats

    @classmethod
    def start(cls, state: ServerState, prompt: str, prompt_ids: list[int], settings: SamplingSettings,
              chat: bool = False) -> _Generation:
        """Submit the completion (ServerBusy if the server is full); its chunks come as `chunks()` is iterated."""
        header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                  "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                  "model": state.model_name}
        stream = state.scheduler.submit(prompt_ids, settings)
        return cls(prompt, settings, stream, header, len(prompt_ids), state.stats, chat)

    async def chunks(self, still_wanted: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[list[CompletionChunk]]:
        """The chunks as they come, read on the event loop: the scheduler's thread wakes it for each step, and it
        never waits on a step that has not arrived. `still_wanted()`, asked while waiting, ends it early if False."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        self.stream.on_step(lambda: loop.call_soon_threadsafe(wake.set))
        checked = loop.time()
        try:
            while True:
                if still_wanted is not None and loop.time() - checked > DISCONNECT_POLL_S:
                    checked = loop.time()
                    if not await still_wanted():
                        return
                wake.clear()
                if self.stream.ready() == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), DISCONNECT_POLL_S)
                    continue
                chunks: list[CompletionChunk] = []
                ended = False
                while self.stream.ready() > 0:  # every step decoded so far, without waiting
                    step = next(self.stream, None)
                    if step is None:
                        ended = True
                        break
                    chunks += step
                if chunks:
                    merged = _merged(chunks)
                    self.stats.add_tokens(sum(c.generated - self._counted.get(c.index, 0) for c in merged))
                    self._counted.update((c.index, c.generated) for c in merged)
                    yield merged
                if ended:
                    return
        finally:
            self.stream.close()

    def choice(self, chunk: CompletionChunk, first: bool | None = None) -> dict[str, Any]:
        """One entry of "choices": a sample's text (or new piece of it), logprobs if asked, finish reason.
        A chat choice holds a message; streamed (`first` given), a delta, with the role in a sample's first."""
        if not self.chat:
            logprobs = _logprobs_json(chunk.tokens, len(self.prompt)) if self.settings.logprobs is not None else None
            return {"text": chunk.text, "index": chunk.index, "logprobs": logprobs, "finish_reason": chunk.finish_reason}
        logprobs = _chat_logprobs(chunk.tokens, self.settings.logprobs) if self.settings.logprobs is not None else None
        content = {"role": "assistant", "content": chunk.text}
        if first is not None:
            return {"index": chunk.index, "delta": content if first else {"content": chunk.text},
                    "logprobs": logprobs, "finish_reason": chunk.finish_reason}
        return {"index": chunk.index, "message": content, "logprobs": logprobs, "finish_reason": chunk.finish_reason}

    def usage(self, generated: dict[int, int]) -> dict[str, int]:
        """OpenAI's usage block, given the tokens generated per sample."""
        completion_tokens = sum(generated.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


def _merged(chunks: list[CompletionChunk]) -> list[CompletionChunk]:
    """Chunks of several steps joined into one per sample, in sample order."""
    merged: dict[int, CompletionChunk] = {}
    for chunk in chunks:
        earlier = merged.get(chunk.index)
        merged[chunk.index] = chunk if earlier is None else CompletionChunk(
            chunk.index, earlier.text + chunk.text, earlier.tokens + chunk.tokens, chunk.finish_reason, chunk.generated)
    return [merged[i] for i in sorted(merged)]


def _error_event(exc: Exception) -> str:
    """A stream's error, in the API's error shape, as one server-sent event."""
    kind = "invalid_request_error" if isinstance(exc, SamplingError) else "server_error"
    return f"data: {json.dumps({'error': {'message': str(exc), 'type': kind, 'param': None, 'code': None}})}\n\n"


async def _events(job: _Generation, stats: _Stats, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion: one per chunk, usage if asked, then [DONE]."""
    generated: dict[int, int] = {}
    header = {**job.header, "object": "chat.completion.chunk"} if job.chat else job.header
    stats.add_active(1)
    try:
        # If the client leaves, Starlette cancels this generator, and `finally` ends the request.
        try:
            async for step in job.chunks():
                for chunk in step:
                    first = chunk.index not in generated
                    generated[chunk.index] = chunk.generated
                    payload = {**header, "choices": [job.choice(chunk, first if job.chat else None)]}
                    yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
        except ScratchGPTError as exc:  # this request's own failure (or the engine's): said in the stream
            yield _error_event(exc)
        if include_usage:
            yield f"data: {json.dumps({**header, 'choices': [], 'usage': job.usage(generated)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.stream.close()
        stats.add_active(-1)


async def _run_to_end(job: _Generation, request: Request, stats: _Stats) -> list[list[CompletionChunk]] | None:
    """Every chunk of the completion, or None if the client disconnected meanwhile (its slots then free up)."""
    stats.add_active(1)
    left = False

    async def still_wanted() -> bool:
        nonlocal left
        left = await request.is_disconnected()
        return not left
    try:
        steps = [step async for step in job.chunks(still_wanted)]
        return None if left else steps
    finally:
        stats.add_active(-1)


def _whole_answer(job: _Generation, steps: list[list[CompletionChunk]]) -> dict[str, Any]:
    """The non-streamed answer: each sample's chunks joined into one choice, plus usage."""
    n = job.settings.num_samples
    texts: dict[int, list[str]] = {i: [] for i in range(n)}
    details: dict[int, list[TokenDetail]] = {i: [] for i in range(n)}
    finish: dict[int, str | None] = {}
    generated: dict[int, int] = {}
    for step in steps:
        for chunk in step:
            texts[chunk.index].append(chunk.text)
            details[chunk.index].extend(chunk.tokens)
            finish[chunk.index] = chunk.finish_reason
            generated[chunk.index] = chunk.generated
    choices = [job.choice(CompletionChunk(i, "".join(texts[i]), details[i], finish.get(i), generated.get(i, 0)))
               for i in range(n)]
    return {**job.header, "choices": choices, "usage": job.usage(generated)}


# --- the routes ----------------------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    """GET /: the web playground page."""
    return HTMLResponse((resources.files("scratchgpt.serving") / "static" / "playground.html").read_text(encoding="utf-8"))


@router.get("/health", response_model=None, responses={
    200: {"description": "the model and the load; status \"ok\""},
    503: {"description": "the engine is gone: status \"unavailable: <why>\""}})
async def health(state: State) -> JSONResponse:
    """GET /health: the model's name, config and size, the cap, and what the server is doing (ServerState.load);
    200 with status "ok", or 503 with "unavailable: <why>" once the scheduler has stopped (a load balancer or
    supervisor then knows to restart the server)."""
    stopped = state.scheduler.stopped
    return JSONResponse(status_code=200 if stopped is None else 503, content={
        "status": "ok" if stopped is None else f"unavailable: {stopped}",
        "model": state.model_name,
        "config": state.model_config,
        "parameters": count_parameters(state.model),
        "vocab_size": getattr(state.tokenizer, "vocab_size", None),
        "chat": is_chat_tokenizer(state.tokenizer),  # whether /v1/chat/completions can answer
        "max_tokens_cap": state.max_tokens_cap,
        "active_requests": state.stats.active,
        "tokens_generated": state.stats.tokens_generated,
        **state.load(),
    })


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {}}, "description": "Prometheus's text format"}})
async def metrics(state: State) -> Response:
    """GET /metrics: Prometheus's text format (metrics.py lists what it counts); behind the key on a keyed server."""
    return Response(state.metrics.exposition(), media_type=state.metrics.content_type)


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    """GET /v1/models: the one model served, as OpenAI lists models."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "scratchgpt"}]}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every refusal's body, as OpenAI shapes it: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail


_REFUSALS = {status: {"model": ErrorBody, "description": why} for status, why in (
    (400, "a request the server cannot take, naming the field at fault"), (401, "no key, or the wrong one"),
    (413, "a body over --max-body-bytes"), (429, "every slot busy and the waiting line full"),
    (499, "the client left before the answer"), (503, "the engine is gone, or the server is shutting down"))}
_COMPLETION_RESPONSES = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                               "description": "the completion, whole or (stream: true) as server-sent events"},
                         **_REFUSALS}


@router.post("/v1/completions", response_model=None, responses=_COMPLETION_RESPONSES)
async def completions(body: CompletionRequest, request: Request, state: State) -> dict[str, Any] | Response:
    """POST /v1/completions: check the request, then stream the completion as events or answer it whole."""
    prompt, prompt_ids, settings = settings_for(body, state)
    job = _Generation.start(state, prompt, prompt_ids, settings)  # a full server raises ServerBusy here: 429
    return await _answer(job, body.stream, body.stream_options, request, state)


@router.post("/v1/chat/completions", response_model=None, responses=_COMPLETION_RESPONSES)
async def chat_completions(body: ChatRequest, request: Request, state: State) -> dict[str, Any] | Response:
    """POST /v1/chat/completions: the assistant's reply to the messages, streamed as deltas or whole."""
    prompt_ids, settings = chat_settings_for(body, state)
    job = _Generation.start(state, "", prompt_ids, settings, chat=True)
    return await _answer(job, body.stream, body.stream_options, request, state)


async def _answer(job: _Generation, stream: bool, stream_options: dict[str, Any] | None, request: Request,
                  state: ServerState) -> dict[str, Any] | Response:
    """Stream the generation as events, or wait for it and answer it whole."""
    if stream:
        include_usage = bool((stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(job, state.stats, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        steps = await _run_to_end(job, request, state.stats)
    except SamplingError as exc:  # its own settings broke its arithmetic: its fault, and only its
        return _error(400, str(exc))
    if steps is None:
        return _error(499, "the client closed the request")
    return _whole_answer(job, steps)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's life: at shutdown, once uvicorn has let the running requests finish, ServerState.close."""
    yield
    await run_in_threadpool(app.state.server.close)


def create_app(model: torch.nn.Module, tokenizer, model_name: str = "scratchgpt", config: dict | None = None,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP, *, api_key: str | Sequence[str] | None = None,
               allowed_origins: Sequence[str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
               batching: BatchingLimits | None = None) -> FastAPI:
    """The FastAPI application serving `model`; `config` is shown by /health (default: the model config).

    With `api_key`, every /v1/* request must carry `Authorization: Bearer <api_key>`; a request body over
    `max_body_bytes` is refused with a 413, a prompt over `max_prompt_tokens` tokens with a 400; beyond the
    `batching` limits' slots and waiting line, a 429.
    """
    # No /docs or /redoc: those pages load their scripts from a third-party CDN. The schema stays at
    # /openapi.json, behind the key on a keyed server.
    app = FastAPI(title="scratchgpt", description="OpenAI-compatible completions from a scratchgpt checkpoint.",
                  lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState.build(model, tokenizer, model_name, config, max_tokens_cap, max_prompt_tokens, batching)
    app.state.stats = app.state.server.stats  # kept under its old name too
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ServerBusy, _server_busy)
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    app.add_middleware(_Guard, api_keys=keys, max_body_bytes=max_body_bytes,
                       on_status=app.state.server.metrics.count_response)
    if allowed_origins:  # pages served elsewhere may call the API from a browser (outermost: answers preflights)
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.include_router(router)
    return app


def is_loopback(host: str) -> bool:
    """Whether listening on `host` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, api_key: str | Sequence[str] | None) -> str | None:
    """The one-line warning for a server that others can reach and anyone may use, else None."""
    if api_key or is_loopback(host):
        return None
    return (f"scratchgpt serve: warning: listening on {host} without an API key: anyone who can reach this machine "
            f"can use the model; set {API_KEY_ENV} (or --api-key) to require one")


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
          device: str = "auto", *, api_key: str | Sequence[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, drain_seconds: float = DEFAULT_DRAIN_SECONDS,
          batching: BatchingLimits | None = None, allowed_origins: Sequence[str] = (),
          tls: tuple[str, str] | None = None, max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
          header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
    """Load a checkpoint and serve it with uvicorn until interrupted.

    On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, lets the running requests finish for up to
    `drain_seconds` (then cuts them), calls ServerState.close, and this function returns.
    """
    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..device import resolve_device

    directory = resolve_checkpoint(checkpoint)
    model, tokenizer, config, _ = load_checkpoint(directory, resolve_device(device))
    name = directory.name if directory.name not in ("best", "last") and not directory.name.startswith("step-") \
        else f"{directory.parent.name}/{directory.name}"
    app = create_app(model, tokenizer, name, config.to_dict()["model"], max_tokens_cap, api_key=api_key,
                     max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, batching=batching,
                     allowed_origins=allowed_origins)
    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    scheme = "https" if tls else "http"
    print(f"serving {name} on {scheme}://{host}:{port}/ (playground), OpenAI-compatible API at {scheme}://{host}:{port}/v1",
          flush=True)
    _run_uvicorn(app, host, port, drain_seconds, tls, max_connections, header_timeout)


def _run_uvicorn(app: FastAPI, host: str, port: int, drain_seconds: float, tls: tuple[str, str] | None,
                 max_connections: int | None, header_timeout: float) -> None:
    """Run uvicorn over `app` until a signal drains it or the engine dies; a start that failed, or a dead
    engine, is a ScratchGPTError (so the command exits non-zero)."""
    import uvicorn

    certfile, keyfile = tls or (None, None)  # HTTPS with this certificate and key
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=drain_seconds, limit_concurrency=max_connections,
                                           ssl_certfile=certfile, ssl_keyfile=keyfile,
                                           http=with_header_timeout(header_timeout)))  # slow headers: closed
    # uvicorn catches SIGTERM while it runs, drains, then raises the signal again once it has put back the handler
    # it found: this one, so that a drained server exits with status 0 instead of dying of the signal.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: setattr(server, "should_exit", True)) \
        if on_main_thread else None
    died = _exit_when_the_engine_dies(app.state.server.scheduler, server)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has drained too, then raised SIGINT again
        pass
    finally:
        app.state.server.close()  # the lifespan has closed it after a drain; not if uvicorn never started
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if not server.started:
        raise ScratchGPTError(f"could not serve on {host}:{port} (uvicorn's message above says why)")
    if died:
        raise ScratchGPTError(f"{died[0]}; the server stopped so that its supervisor can start it again")


def _exit_when_the_engine_dies(scheduler: Scheduler, server) -> list[str]:
    """Watch the engine: once it is gone for any reason but a shutdown, stop uvicorn (it drains what it can) and
    leave the reason in the returned list, so that `serve` exits non-zero and a supervisor restarts it."""
    died: list[str] = []

    def watch() -> None:
        while not server.should_exit:
            why = scheduler.stopped
            if why is not None and why != "the server is shutting down":
                print(f"scratchgpt serve: error: {why}", file=sys.stderr, flush=True)
                died.append(why)
                server.should_exit = True
                return
            time.sleep(ENGINE_WATCH_S)

    threading.Thread(target=watch, name="scratchgpt-engine-watch", daemon=True).start()
    return died
