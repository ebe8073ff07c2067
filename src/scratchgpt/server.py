"""The HTTP server: OpenAI-compatible completions, a health check and the web playground.

    GET  /                 the playground (static/playground.html)
    GET  /health           the model's name and config, and what the server is doing
    GET  /v1/models        the one model served, as OpenAI lists models
    POST /v1/completions   OpenAI's legacy completions API, streamed as server-sent events on request

The server is a thin layer over `engine.stream_completion`, the sampler the CLI uses. It clamps
what callers may ask for (--max-tokens-cap, n, logprobs) and answers bad requests with a 400
and a JSON message. Each request decodes in a worker thread so the event loop stays free;
one lock is held around every forward pass, so a request's arithmetic is the same whether it
runs alone or beside fifteen others (the same seed gives the same text), and requests take
turns token by token. A client that goes away cancels its generation before the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .engine import CompletionChunk, SamplingError, SamplingSettings, TokenDetail, stream_completion
from .errors import TokenizerError
from .model import count_parameters

DEFAULT_MAX_TOKENS_CAP = 2048
MAX_SAMPLES = 16  # n
MAX_LOGPROBS = 20  # alternatives per token
MAX_STOP_STRINGS = 16
REQUEST_NAMES = {"max_new_tokens": "max_tokens", "num_samples": "n"}  # engine field -> API field
DISCONNECT_POLL_S = 0.2  # how often a non-streamed request checks that its client is still there


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


class BadRequest(Exception):
    """A request the server refuses: answered with a 400 and {"error": {"message": ...}}."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error body with the given status."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    """Exception handler: a BadRequest raised anywhere in a route becomes a 400."""
    return _error(400, str(exc), exc.param)


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Exception handler: a body pydantic rejects is a 400 naming the first field at fault (FastAPI says 422)."""
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request body")
    return _error(400, f"invalid request: {message}", where or None)


# --- what every route shares ---------------------------------------------------------------------------------------

class _Stats:
    """Counters shown by /health: requests generating now, and tokens generated since the start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.tokens_generated = 0

    def add_tokens(self, n: int) -> None:
        """Count `n` more generated tokens (called from worker threads)."""
        with self._lock:
            self.tokens_generated += n

    def add_active(self, n: int) -> None:
        """Count `n` more (or, negative, fewer) requests generating now."""
        with self._lock:
            self.active += n


@dataclass
class ServerState:
    """What the routes share: the model and tokenizer, the limits, the forward-pass lock and the counters."""

    model: torch.nn.Module
    tokenizer: Any
    model_name: str
    model_config: dict
    max_tokens_cap: int
    max_logprobs: int
    step_lock: threading.Lock = field(default_factory=threading.Lock)  # held around every forward pass
    stats: _Stats = field(default_factory=_Stats)

    @classmethod
    def build(cls, model: torch.nn.Module, tokenizer, model_name: str, config: dict | None,
              max_tokens_cap: int) -> ServerState:
        """The state for `model`; `config` defaults to the model's own, logprobs are capped by the vocabulary."""
        model_config = config if config is not None else vars(model.config)
        max_logprobs = min(MAX_LOGPROBS, tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else MAX_LOGPROBS)
        return cls(model, tokenizer, model_name, model_config, max_tokens_cap, max_logprobs)


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
    return prompt


def _check_limits(body: CompletionRequest, state: ServerState) -> list[str]:
    """Refuse what this server does not allow (echo, the caps on tokens, n, logprobs, stops); returns the stop list."""
    if body.echo:
        raise BadRequest("echo is not supported; the prompt is not repeated in the answer", "echo")
    if body.max_tokens > state.max_tokens_cap:
        raise BadRequest(f"max_tokens must be <= {state.max_tokens_cap} (this server's --max-tokens-cap), got {body.max_tokens}", "max_tokens")
    if not 1 <= body.n <= MAX_SAMPLES:
        raise BadRequest(f"n must be between 1 and {MAX_SAMPLES}, got {body.n}", "n")
    if body.logprobs is not None and not 0 <= body.logprobs <= state.max_logprobs:
        raise BadRequest(f"logprobs must be between 0 and {state.max_logprobs}, got {body.logprobs}", "logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
    if body.top_k is not None and body.top_k < 0:
        raise BadRequest(f"top_k must be >= 0 (0 turns it off), got {body.top_k}", "top_k")
    return stop


def settings_for(body: CompletionRequest, state: ServerState) -> tuple[str, SamplingSettings]:
    """Check the request and turn it into the prompt and the engine's settings, or raise BadRequest."""
    prompt = _prompt_of(body)
    stop = _check_limits(body, state)
    settings = SamplingSettings(
        max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k or None, top_p=body.top_p,
        repetition_penalty=body.repetition_penalty, stop=stop, num_samples=body.n, seed=body.seed, logprobs=body.logprobs,
    )
    try:  # the engine's own checks, and the tokenizer's, before any decoding starts
        settings.validate(REQUEST_NAMES)
        state.tokenizer.encode(prompt)
    except SamplingError as exc:
        raise BadRequest(str(exc), exc.param) from None
    except TokenizerError as exc:
        raise BadRequest(f"prompt: {exc}", "prompt") from None
    return prompt, settings


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
    """One completion under way: the decoding steps, their cancel flag, and what every JSON answer repeats."""

    prompt: str
    settings: SamplingSettings
    steps: Iterator[list[CompletionChunk]]
    cancel: threading.Event
    header: dict[str, Any]
    prompt_tokens: int

    @classmethod
    def start(cls, state: ServerState, prompt: str, settings: SamplingSettings) -> _Generation:
        """Set up the (lazy) decoding of `prompt`; nothing runs until `steps` is iterated."""
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": state.model_name}
        cancel = threading.Event()
        steps = stream_completion(state.model, state.tokenizer, prompt, settings, cancel=cancel,
                                  step_lock=state.step_lock, on_token=state.stats.add_tokens)
        return cls(prompt, settings, steps, cancel, header, len(state.tokenizer.encode(prompt)))

    def choice(self, chunk: CompletionChunk) -> dict[str, Any]:
        """One entry of "choices": a sample's text (or new piece of it), logprobs if asked, finish reason."""
        logprobs = _logprobs_json(chunk.tokens, len(self.prompt)) if self.settings.logprobs is not None else None
        return {"text": chunk.text, "index": chunk.index, "logprobs": logprobs, "finish_reason": chunk.finish_reason}

    def usage(self, generated: dict[int, int]) -> dict[str, int]:
        """OpenAI's usage block, given the tokens generated per sample."""
        completion_tokens = sum(generated.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def _events(job: _Generation, stats: _Stats, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion: one per chunk, usage if asked, then [DONE]."""
    generated: dict[int, int] = {}
    stats.add_active(1)
    try:
        while True:
            # Each step runs in a worker thread; if the client leaves, Starlette cancels
            # this generator once that step is done, and `finally` stops the decoding.
            step = await run_in_threadpool(next, job.steps, None)
            if step is None:
                break
            for chunk in step:
                generated[chunk.index] = chunk.generated
                payload = {**job.header, "choices": [job.choice(chunk)]}
                yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**job.header, 'choices': [], 'usage': job.usage(generated)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()
        stats.add_active(-1)


async def _run_to_end(job: _Generation, request: Request, stats: _Stats) -> list[list[CompletionChunk]]:
    """Decode every step in a worker thread, cancelling it if the client disconnects meanwhile."""
    stats.add_active(1)
    try:
        work = asyncio.ensure_future(run_in_threadpool(list, job.steps))
        while not work.done():
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                job.cancel.set()  # nobody will read the answer: stop after the current token
        return work.result()
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
    return HTMLResponse((resources.files("scratchgpt") / "static" / "playground.html").read_text(encoding="utf-8"))


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    """GET /health: the model's name, config and size, the cap, and what the server is doing."""
    return {
        "status": "ok",
        "model": state.model_name,
        "config": state.model_config,
        "parameters": count_parameters(state.model),
        "vocab_size": getattr(state.tokenizer, "vocab_size", None),
        "max_tokens_cap": state.max_tokens_cap,
        "active_requests": state.stats.active,
        "tokens_generated": state.stats.tokens_generated,
    }


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    """GET /v1/models: the one model served, as OpenAI lists models."""
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "scratchgpt"}]}


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: State) -> dict[str, Any] | Response:
    """POST /v1/completions: check the request, then stream the completion as events or answer it whole."""
    prompt, settings = settings_for(body, state)
    job = _Generation.start(state, prompt, settings)
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(job, state.stats, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    steps = await _run_to_end(job, request, state.stats)
    if job.cancel.is_set():
        return _error(499, "the client closed the request")
    return _whole_answer(job, steps)


def create_app(model: torch.nn.Module, tokenizer, model_name: str = "scratchgpt", config: dict | None = None,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP) -> FastAPI:
    """The FastAPI application serving `model`; `config` is shown by /health (default: the model config)."""
    app = FastAPI(title="scratchgpt", description="OpenAI-compatible completions from a scratchgpt checkpoint.")
    app.state.server = ServerState.build(model, tokenizer, model_name, config, max_tokens_cap)
    app.state.stats = app.state.server.stats  # kept under its old name too
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.include_router(router)
    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
          device: str = "auto") -> None:
    """Load a checkpoint and serve it with uvicorn until interrupted."""
    import uvicorn

    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .device import resolve_device

    directory = resolve_checkpoint(checkpoint)
    model, tokenizer, config, _ = load_checkpoint(directory, resolve_device(device))
    name = directory.name if directory.name not in ("best", "last") and not directory.name.startswith("step-") \
        else f"{directory.parent.name}/{directory.name}"
    app = create_app(model, tokenizer, name, config.to_dict()["model"], max_tokens_cap)
    print(f"serving {name} on http://{host}:{port}/ (playground), OpenAI-compatible API at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
