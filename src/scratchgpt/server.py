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
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
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
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _logprobs_json(details: list[TokenDetail], prompt_length: int) -> dict[str, list]:
    """OpenAI's legacy logprobs: text_offset counts characters from the start of the prompt."""
    return {
        "tokens": [d.text for d in details],
        "token_logprobs": [d.logprob for d in details],
        "top_logprobs": [d.top for d in details],
        "text_offset": [prompt_length + d.offset for d in details],
    }


class _Stats:
    """Counters shown by /health: requests generating now, and tokens generated since the start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.tokens_generated = 0

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens_generated += n

    def add_active(self, n: int) -> None:
        with self._lock:
            self.active += n


def create_app(model: torch.nn.Module, tokenizer, model_name: str = "scratchgpt", config: dict | None = None,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP) -> FastAPI:
    """The FastAPI application serving `model`; `config` is shown by /health (default: the model config)."""
    app = FastAPI(title="scratchgpt", description="OpenAI-compatible completions from a scratchgpt checkpoint.")
    step_lock = threading.Lock()
    stats = _Stats()
    app.state.stats = stats
    model_config = config if config is not None else vars(model.config)
    max_logprobs = min(MAX_LOGPROBS, tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else MAX_LOGPROBS)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return _error(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request body")
        return _error(400, f"invalid request: {message}", where or None)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse((resources.files("scratchgpt") / "static" / "playground.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "config": model_config,
            "parameters": count_parameters(model),
            "vocab_size": getattr(tokenizer, "vocab_size", None),
            "max_tokens_cap": max_tokens_cap,
            "active_requests": stats.active,
            "tokens_generated": stats.tokens_generated,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "scratchgpt"}]}

    def settings_for(body: CompletionRequest) -> tuple[str, SamplingSettings]:
        """Check the request and turn it into the prompt and the engine's settings, or raise BadRequest."""
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest(f"prompt must be one string (or a list of one), got a list of {len(prompt)}; use n for several samples", "prompt")
            prompt = prompt[0]
        if prompt is None:
            raise BadRequest("prompt is required: the text to continue", "prompt")
        if not prompt:
            raise BadRequest("prompt must not be empty", "prompt")
        if body.echo:
            raise BadRequest("echo is not supported; the prompt is not repeated in the answer", "echo")
        if body.max_tokens > max_tokens_cap:
            raise BadRequest(f"max_tokens must be <= {max_tokens_cap} (this server's --max-tokens-cap), got {body.max_tokens}", "max_tokens")
        if not 1 <= body.n <= MAX_SAMPLES:
            raise BadRequest(f"n must be between 1 and {MAX_SAMPLES}, got {body.n}", "n")
        if body.logprobs is not None and not 0 <= body.logprobs <= max_logprobs:
            raise BadRequest(f"logprobs must be between 0 and {max_logprobs}, got {body.logprobs}", "logprobs")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
        if body.top_k is not None and body.top_k < 0:
            raise BadRequest(f"top_k must be >= 0 (0 turns it off), got {body.top_k}", "top_k")
        settings = SamplingSettings(
            max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k or None, top_p=body.top_p,
            repetition_penalty=body.repetition_penalty, stop=stop, num_samples=body.n, seed=body.seed, logprobs=body.logprobs,
        )
        try:
            settings.validate(REQUEST_NAMES)
            tokenizer.encode(prompt)
        except SamplingError as exc:
            raise BadRequest(str(exc), exc.param) from None
        except TokenizerError as exc:
            raise BadRequest(f"prompt: {exc}", "prompt") from None
        return prompt, settings

    def choice_json(chunk: CompletionChunk, prompt: str, with_logprobs: bool) -> dict[str, Any]:
        return {"text": chunk.text, "index": chunk.index,
                "logprobs": _logprobs_json(chunk.tokens, len(prompt)) if with_logprobs else None,
                "finish_reason": chunk.finish_reason}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt, settings = settings_for(body)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        header = {"id": completion_id, "object": "text_completion", "created": created, "model": model_name}
        with_logprobs = settings.logprobs is not None
        cancel = threading.Event()
        chunks_iter = stream_completion(model, tokenizer, prompt, settings, cancel=cancel, step_lock=step_lock,
                                        on_token=stats.add_tokens)
        prompt_tokens = len(tokenizer.encode(prompt))

        def usage(generated: dict[int, int]) -> dict[str, int]:
            completion_tokens = sum(generated.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                generated: dict[int, int] = {}
                stats.add_active(1)
                try:
                    while True:
                        # Each step runs in a worker thread; if the client leaves, Starlette cancels
                        # this generator once that step is done, and `finally` stops the decoding.
                        step = await run_in_threadpool(next, chunks_iter, None)
                        if step is None:
                            break
                        for chunk in step:
                            generated[chunk.index] = chunk.generated
                            payload = {**header, "choices": [choice_json(chunk, prompt, with_logprobs)]}
                            yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps({**header, 'choices': [], 'usage': usage(generated)})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    cancel.set()
                    stats.add_active(-1)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        def collect() -> list[list[CompletionChunk]]:
            return list(chunks_iter)

        stats.add_active(1)
        try:
            work = asyncio.ensure_future(run_in_threadpool(collect))
            while not work.done():
                await asyncio.wait({work}, timeout=0.2)
                if not work.done() and await request.is_disconnected():
                    cancel.set()  # nobody will read the answer: stop after the current token
            steps = work.result()
        finally:
            stats.add_active(-1)
        if cancel.is_set():
            return _error(499, "the client closed the request")
        texts: dict[int, list[str]] = {i: [] for i in range(settings.num_samples)}
        details: dict[int, list[TokenDetail]] = {i: [] for i in range(settings.num_samples)}
        finish: dict[int, str | None] = {}
        generated: dict[int, int] = {}
        for step in steps:
            for chunk in step:
                texts[chunk.index].append(chunk.text)
                details[chunk.index].extend(chunk.tokens)
                finish[chunk.index] = chunk.finish_reason
                generated[chunk.index] = chunk.generated
        choices = [
            choice_json(CompletionChunk(i, "".join(texts[i]), details[i], finish.get(i), generated.get(i, 0)), prompt, with_logprobs)
            for i in range(settings.num_samples)
        ]
        return {**header, "choices": choices, "usage": usage(generated)}

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
