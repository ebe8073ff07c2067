"""Hostile input gets a 4xx in the API's error shape, never a 500 (#25): framing, text that is not text, seeds,
stop strings, bodies that are not JSON, doors that stay shut, health that tells the truth, stalled readers."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serving import running_server  # noqa: E402
from test_batching import TOKENIZER, make_model, prompt, settings  # noqa: E402

from scratchgpt.chat.template import chat_tokenizer  # noqa: E402
from scratchgpt.serving import scheduler as scheduler_module  # noqa: E402
from scratchgpt.serving.scheduler import Scheduler  # noqa: E402
from scratchgpt.serving.server import create_app  # noqa: E402
from scratchgpt.tokenizer import ByteTokenizer  # noqa: E402

KEY = "k-hostile"


@pytest.fixture(scope="module")
def served():
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig

    tokenizer = chat_tokenizer(ByteTokenizer())  # a chat model: /v1/chat/completions is open to attack too
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    app = create_app(model.eval(), tokenizer, "tiny", api_key=KEY, max_body_bytes=2000)
    with running_server(app) as url:
        yield url, app


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def raw(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (httpx would fix the framing); the status and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"error"' in answer:
                break
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def assert_api_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in error["message"] for word in words), error["message"]


def test_a_body_framed_two_ways_is_refused(served):
    url, _ = served
    body = b'{"prompt": "ab", "max_tokens": 2}'
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n")
    status, answer = raw(url, head, chunked)
    assert status == 400 and b"both Content-Length and Transfer-Encoding" in answer


@pytest.mark.parametrize("field, body, words", [
    ("prompt", b'{"prompt": "ab\\ud800cd", "max_tokens": 2}', ("prompt", "lone surrogate", "U+D800", "character 2")),
    ("stop", b'{"prompt": "ab", "max_tokens": 2, "stop": ["\\udfff"]}', ("stop", "lone surrogate")),
    ("seed", b'{"prompt": "ab", "max_tokens": 2, "seed": 1180591620717411303424}', ("seed", "2**64")),
    ("stop", b'{"prompt": "ab", "max_tokens": 2, "stop": ["' + b"x" * 300 + b'"]}', ("256 characters",)),
    ("temperature", b'{"prompt": "ab", "max_tokens": 2, "temperature": 1e-30}', ("temperature",)),
    ("repetition_penalty", b'{"prompt": "ab", "max_tokens": 2, "repetition_penalty": 1e-30}', ("repetition_penalty",)),
])
def test_values_that_break_the_arithmetic_or_the_encoding_are_400s(served, field, body, words):
    url, _ = served
    response = httpx.post(f"{url}/v1/completions", content=body, headers=AUTH, timeout=30)
    assert_api_error(response, 400, *words)


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', ("messages[0].content", "lone surrogate")),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}', ("text content parts",)),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', ("role is 'tool'",)),
    (b'{"messages": "hello"}', ("messages",)),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 40 + b'"}]}', ("context",)),
    (b'{"messages": [{"role": "user", "content": "ab"}], "max_completion_tokens": 99999}', ("max_tokens",)),
])
def test_chat_requests_that_cannot_be_answered_are_400s(served, body, words):
    url, _ = served
    response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=AUTH, timeout=30)
    assert_api_error(response, 400, *words)


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_a_400_in_the_api_shape(served, body):
    url, _ = served
    response = httpx.post(f"{url}/v1/completions", content=body, headers=AUTH, timeout=30)
    assert_api_error(response, 400)


def test_the_docs_pages_are_off_and_the_schema_needs_the_key(served):
    url, _ = served
    assert_api_error(httpx.get(f"{url}/docs"), 404)
    assert_api_error(httpx.get(f"{url}/redoc"), 404)
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).json()["paths"]["/v1/completions"]


def test_health_is_503_once_the_engine_is_gone():
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    app = create_app(model.eval(), TOKENIZER, "tiny")
    with running_server(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        app.state.server.scheduler._runner.send(("no_such_command",))  # the engine loop fails
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{url}/health")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health.status_code == 503 and health.json()["status"].startswith("unavailable: the scheduler's thread")
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 2}).status_code == 503


def test_a_reader_that_falls_behind_is_dropped_and_its_slot_freed(monkeypatch):
    monkeypatch.setattr(scheduler_module, "MAX_BEHIND", 20)
    scheduler = Scheduler(make_model(), TOKENIZER, slots=2)
    try:
        stalled = scheduler.submit(prompt(1, 3), settings(100_000, 0))  # nobody reads it
        deadline = time.monotonic() + 30
        while scheduler.load()["running"]:
            assert time.monotonic() < deadline, "a stalled reader kept its slot"
            time.sleep(0.01)
        assert stalled.ready() <= 22
        with pytest.raises(Exception, match="fell 20 steps behind"):
            list(stalled)
    finally:
        scheduler.close()


def test_metrics_count_responses_tokens_load_and_step_time(served):
    url, _ = served
    assert httpx.get(f"{url}/metrics").status_code == 401  # behind the key, as the API is
    for body in ({"prompt": "ab", "max_tokens": 3}, {"prompt": "", "max_tokens": 3}):
        httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=30)
    httpx.post(f"{url}/v1/completions", json={"prompt": "ab"}, timeout=30)  # no key: 401
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values['scratchgpt_requests_total{status="200"}'] >= 1
    assert values['scratchgpt_requests_total{status="400"}'] >= 1 and values['scratchgpt_requests_total{status="401"}'] >= 1
    assert values["scratchgpt_tokens_generated_total"] >= 3
    assert values["scratchgpt_step_seconds_count"] >= 2 and values["scratchgpt_step_seconds_sum"] > 0
    assert values["scratchgpt_requests_running"] == 0 and values["scratchgpt_requests_waiting"] == 0


# --- fuzzing the API from its own schema ---------------------------------------------------------------------------

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import settings as hypothesis_settings  # noqa: E402


def fuzzed_app():
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig

    torch.manual_seed(0)
    tokenizer = chat_tokenizer(TOKENIZER)  # both endpoints, /v1/chat/completions past its "not a chat model" door
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    app = create_app(model.eval(), tokenizer, "tiny", max_tokens_cap=24, batching=None)
    # Each case runs the app's lifespan, whose shutdown closes the scheduler for good (tested in test_server_guard):
    # the fuzzed app keeps one scheduler for every case.
    app.router.lifespan_context = _no_lifespan
    return app


@contextlib.asynccontextmanager
async def _no_lifespan(app):
    yield


schema = schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app())


@schema.parametrize()
@hypothesis_settings(max_examples=60, deadline=None)
def test_no_request_the_schema_allows_gets_a_5xx_or_leaves_the_schema(case):
    """Bodies drawn from the API's own OpenAPI schema (and past it): never a 5xx; statuses, content types and
    JSON bodies as the schema declares them. (A schema-valid body may still be a 400: the caps on max_tokens, n and
    the prompt are the server's flags, not the schema's, so that one check is left out.)"""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    case.call_and_validate(excluded_checks=[positive_data_acceptance])


def test_a_client_whose_headers_dawdle_is_closed_and_the_others_are_served():
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig
    from scratchgpt.serving.protocol import with_header_timeout

    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with running_server(create_app(model.eval(), tokenizer, "tiny"), http=with_header_timeout(0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHo")  # and nothing more: the rest of the headers never come
            started = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # meanwhile, others are served
            assert slow.recv(1024) == b""  # closed, without an answer
            assert time.monotonic() - started < 5
        with socket.create_connection((host, int(port)), timeout=10) as keep:  # a second, slow request on one connection
            keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = keep.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            keep.sendall(b"GET /health HTTP/1.1\r\n")  # its headers never finish
            time.sleep(1.5)
            rest = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := keep.recv(65536):
                    rest += chunk
            assert b"HTTP/1.1" not in rest  # closed with no second answer
