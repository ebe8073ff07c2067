"""The server shared by a classroom, against a real uvicorn on a free port: the API key (with the official
openai client), the limits on a body's bytes and a prompt's tokens, the 429 of a full server, the load
in /health, the close at shutdown, and the `serve` flags that set them."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving import running_server  # noqa: E402

import scratchgpt.serving.server as server_module  # noqa: E402
from scratchgpt.serving.scheduler import ServerBusy  # noqa: E402
from scratchgpt.serving.server import create_app  # noqa: E402

KEY = "class-of-2025-secret"
TEXT = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(scope="module")
def tiny():
    """A random one-layer model and a character tokenizer: enough to serve, built in a blink."""
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.config import ModelConfig
    from scratchgpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def keyed(tiny):
    """A server that needs KEY, takes bodies of up to 2000 bytes and prompts of up to 10 tokens."""
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny", max_tokens_cap=100_000, api_key=KEY, max_body_bytes=2000,
                     max_prompt_tokens=10)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def open_server(tiny):
    """A server with the default limits and no key."""
    model, tokenizer = tiny
    with running_server(create_app(model, tokenizer, "tiny", max_tokens_cap=100_000)) as url:
        yield url


AUTH = {"Authorization": f"Bearer {KEY}"}


def completion(url: str, headers=None, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 5, **body}, headers=headers,
                      timeout=60)


# --- the API key ---------------------------------------------------------------------------------------------------

def test_the_openai_client_gets_401_without_the_key_and_200_with_it(keyed):
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=f"{keyed}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.completions.create(model="tiny", prompt="the ", max_tokens=5)
    assert exc.value.status_code == 401
    assert exc.value.body["code"] == "invalid_api_key" and exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="the ", max_tokens=5, stream=True)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0)
    answer = client.completions.create(model="tiny", prompt="the ", max_tokens=7, seed=3)
    assert len(answer.choices[0].text) == 7 and answer.usage.completion_tokens == 7
    streamed = client.completions.create(model="tiny", prompt="the ", max_tokens=7, seed=3, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == answer.choices[0].text
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize("headers", [
    None, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY[:-1]}"},
])
def test_every_v1_route_refuses_a_missing_or_wrong_key_in_openais_error_shape(keyed, headers):
    for response in (completion(keyed, headers), completion(keyed, headers, stream=True),
                     httpx.get(f"{keyed}/v1/models", headers=headers)):
        assert response.status_code == 401
        assert response.json() == {"error": {"message": response.json()["error"]["message"], "param": None,
                                             "type": "invalid_request_error", "code": "invalid_api_key"}}
        assert "Bearer" in response.json()["error"]["message"] and KEY not in response.text
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_key_opens_v1_and_the_playground_and_health_stay_open(keyed):
    assert completion(keyed, AUTH).status_code == 200
    assert completion(keyed, {"authorization": f"bearer {KEY}"}).status_code == 200  # the scheme's case is free
    assert httpx.get(f"{keyed}/health").status_code == 200
    page = httpx.get(f"{keyed}/")
    assert page.status_code == 200 and 'id="api_key"' in page.text


def test_the_key_is_compared_in_constant_time(keyed, monkeypatch):
    calls = []
    real = server_module.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server_module.hmac, "compare_digest", spy)
    assert completion(keyed, {"Authorization": "Bearer guess"}).status_code == 401
    assert completion(keyed, AUTH).status_code == 200
    assert calls == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_a_server_without_a_key_needs_none(open_server):
    assert completion(open_server).status_code == 200
    assert completion(open_server, {"Authorization": "Bearer anything"}).status_code == 200


# --- the limits ----------------------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_a_413_by_its_length_or_by_counting(keyed):
    big = json.dumps({"prompt": "the ", "max_tokens": 5, "padding": "x" * 2000}).encode()
    response = httpx.post(f"{keyed}/v1/completions", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert "2000 bytes" in error["message"] and "--max-body-bytes" in error["message"]
    assert error["type"] == "invalid_request_error"

    def chunked(body: bytes):  # a generator: httpx sends it chunked, without a Content-Length
        for i in range(0, len(body), 500):
            yield body[i:i + 500]

    response = httpx.post(f"{keyed}/v1/completions", content=chunked(big), headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["error"]["message"]

    # just under the limit, with a length or chunked, the body reaches the route whole
    fits = json.dumps({"prompt": "the ", "max_tokens": 6, "seed": 4, "padding": "x" * 1900}).encode()
    assert len(fits) <= 2000
    whole = httpx.post(f"{keyed}/v1/completions", content=fits, headers={**AUTH, "Content-Type": "application/json"})
    assert whole.status_code == 200 and len(whole.json()["choices"][0]["text"]) == 6
    again = httpx.post(f"{keyed}/v1/completions", content=chunked(fits), headers={**AUTH, "Content-Type": "application/json"})
    assert again.status_code == 200 and again.json()["choices"] == whole.json()["choices"]


def test_the_default_body_limit_is_one_megabyte(open_server):
    body = {"prompt": "the ", "max_tokens": 1, "padding": ""}
    overhead = len(json.dumps(body))
    for size, status in ((1_000_000, 200), (1_000_001, 413)):
        content = json.dumps({**body, "padding": "x" * (size - overhead)}).encode()
        assert len(content) == size
        response = httpx.post(f"{open_server}/v1/completions", content=content,
                              headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == status, response.text


def test_a_prompt_over_the_token_limit_is_a_400_naming_prompt(keyed):
    assert completion(keyed, AUTH, prompt="the cat sa").status_code == 200  # 10 tokens: the limit
    for stream in (False, True):
        response = completion(keyed, AUTH, prompt="the cat sat", stream=stream)  # 11
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "prompt" and "11 tokens" in error["message"]
        assert "at most 10" in error["message"] and "--max-prompt-tokens" in error["message"]


def test_the_default_prompt_limit_is_8192_tokens(open_server):
    assert completion(open_server, prompt="a" * 8192, max_tokens=1).status_code == 200
    response = completion(open_server, prompt="a" * 8193, max_tokens=1)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


# --- a full server -------------------------------------------------------------------------------------------------

@pytest.fixture
def full(monkeypatch):
    """Every generation refused as the scheduler refuses one when its slots and waiting line are full."""
    started = []

    def busy(cls, state, prompt, prompt_ids, settings):
        started.append(prompt)
        raise ServerBusy("all 8 slots are taken and 32 requests wait; retry later", retry_after=2.2)

    monkeypatch.setattr(server_module._Generation, "start", classmethod(busy))
    return started


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_server_answers_429_with_retry_after(keyed, full, stream):
    response = completion(keyed, AUTH, stream=stream)
    assert full == ["the "]  # the refusal came from starting the generation
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"  # whole seconds, rounded up
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": {"message": "all 8 slots are taken and 32 requests wait; retry later",
                                         "type": "requests", "param": None, "code": "rate_limit_exceeded"}}


def test_retry_after_is_at_least_one_second(keyed, monkeypatch):
    for retry_after, header in ((0.0, "1"), (0.3, "1"), (1.0, "1"), (7.5, "8"), (float("inf"), "1")):
        def busy(cls, state, prompt, prompt_ids, settings, retry_after=retry_after):
            raise ServerBusy("full", retry_after=retry_after)

        monkeypatch.setattr(server_module._Generation, "start", classmethod(busy))
        response = completion(keyed, AUTH)
        assert response.status_code == 429 and response.headers["retry-after"] == header


def test_the_openai_client_sees_a_rate_limit_error(keyed, full):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as exc:
            client.completions.create(model="tiny", prompt="the ", max_tokens=5, stream=stream)
        assert exc.value.response.headers["retry-after"] == "3"
        assert exc.value.body["code"] == "rate_limit_exceeded"


def test_a_refused_request_leaves_no_load_behind(keyed, full):
    assert completion(keyed, AUTH, stream=True).status_code == 429
    info = httpx.get(f"{keyed}/health").json()
    assert info["running"] == 0 and info["active_requests"] == 0


# --- the load in /health, and shutdown -----------------------------------------------------------------------------

def test_health_shows_running_waiting_and_tokens_per_second(open_server):
    info = httpx.get(f"{open_server}/health").json()
    for kept in ("status", "model", "config", "parameters", "vocab_size", "max_tokens_cap", "active_requests",
                 "tokens_generated"):
        assert kept in info
    assert info["waiting"] == 0 and isinstance(info["tokens_per_second"], (int, float))
    with httpx.stream("POST", f"{open_server}/v1/completions", timeout=60,
                      json={"prompt": "the ", "max_tokens": 100_000, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(50):  # some tokens have been generated
            next(line for line in lines if line.startswith("data: "))
        during = httpx.get(f"{open_server}/health").json()
    assert during["running"] == 1 and during["active_requests"] == 1 and during["waiting"] == 0
    assert during["tokens_per_second"] > 0


def test_tokens_per_second_is_the_rate_over_the_last_five_seconds(monkeypatch):
    now = [100.0]

    class Clock:
        @staticmethod
        def monotonic():
            return now[0]

    monkeypatch.setattr(server_module, "time", Clock)
    stats = server_module._Stats()
    assert stats.tokens_per_second() == 0
    now[0] = 101.0
    stats.add_tokens(30)
    stats.add_tokens(20)
    now[0] = 102.0
    stats.add_tokens(50)
    assert stats.tokens_per_second() == pytest.approx(100 / 2)  # two seconds since the start
    now[0] = 106.0
    assert stats.tokens_per_second() == pytest.approx(100 / 5)
    now[0] = 106.5  # the tokens of second 101 are out of the window
    assert stats.tokens_per_second() == pytest.approx(50 / 5)
    now[0] = 107.5
    assert stats.tokens_per_second() == 0
    assert stats.tokens_generated == 100


def test_shutdown_calls_server_state_close_once(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny")
    closed = []
    app.state.server.close = lambda: closed.append(threading.current_thread().name)
    with running_server(app) as url:
        assert completion(url).status_code == 200
        assert closed == []
    assert len(closed) == 1


# --- the serve command's flags -------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tiny, tmp_path):
    from scratchgpt.checkpoint import save_checkpoint
    from scratchgpt.config import Config

    model, tokenizer = tiny
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer, Config(model=model.config), {"step": 0})


@pytest.fixture
def uvicorn_runs(monkeypatch):
    """uvicorn.Server.run replaced: the configs `serve` would have run, collected."""
    import uvicorn

    configs = []

    def run(self, sockets=None):
        configs.append(self.config)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("SCRATCHGPT_API_KEY", raising=False)
    return configs


def serve_main(checkpoint, *flags) -> int:
    from scratchgpt.cli import main

    return main(["serve", "--checkpoint", str(checkpoint), "--device", "cpu", *flags])


def status_of(app, key: str | None) -> int:
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app).get("/v1/models", headers=headers).status_code


def test_serve_flags_reach_the_app_and_uvicorn(checkpoint, uvicorn_runs, capsys):
    assert serve_main(checkpoint, "--api-key", "k1", "--max-body-bytes", "300", "--max-prompt-tokens", "3",
                      "--drain-seconds", "7.5") == 0
    config = uvicorn_runs[0]
    assert config.timeout_graceful_shutdown == 7.5 and config.host == "127.0.0.1"
    assert status_of(config.app, None) == 401 and status_of(config.app, "k1") == 200
    from fastapi.testclient import TestClient

    client = TestClient(config.app)
    auth = {"Authorization": "Bearer k1"}
    assert client.post("/v1/completions", json={"prompt": "abcd"}, headers=auth).json()["error"]["param"] == "prompt"
    assert client.post("/v1/completions", content=b"x" * 301, headers=auth).status_code == 413
    assert "warning" not in capsys.readouterr().err

    assert serve_main(checkpoint) == 0  # the defaults
    config = uvicorn_runs[1]
    assert config.timeout_graceful_shutdown == 30 and status_of(config.app, None) == 200
    assert TestClient(config.app).app.state.server.max_prompt_tokens == 8192


def test_the_key_comes_from_the_environment_and_the_flag_wins(checkpoint, uvicorn_runs, monkeypatch):
    monkeypatch.setenv("SCRATCHGPT_API_KEY", "from-env")
    assert serve_main(checkpoint) == 0
    assert status_of(uvicorn_runs[0].app, None) == 401 and status_of(uvicorn_runs[0].app, "from-env") == 200
    assert serve_main(checkpoint, "--api-key", "from-flag") == 0
    assert status_of(uvicorn_runs[1].app, "from-env") == 401 and status_of(uvicorn_runs[1].app, "from-flag") == 200


@pytest.mark.parametrize("flags,env,message", [
    (["--api-key", ""], None, "--api-key must be a non-empty key"),
    (["--api-key", "two words"], None, "--api-key must be a non-empty key"),
    ([], "", "SCRATCHGPT_API_KEY must be a non-empty key"),
    (["--max-body-bytes", "0"], None, "--max-body-bytes must be >= 1"),
    (["--max-prompt-tokens", "0"], None, "--max-prompt-tokens must be >= 1"),
    (["--drain-seconds", "-1"], None, "--drain-seconds must be a number >= 0"),
    (["--drain-seconds", "nan"], None, "--drain-seconds must be a number >= 0"),
])
def test_serve_refuses_bad_flags_in_one_line(checkpoint, uvicorn_runs, monkeypatch, capsys, flags, env, message):
    if env is not None:
        monkeypatch.setenv("SCRATCHGPT_API_KEY", env)
    assert serve_main(checkpoint, *flags) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("scratchgpt serve: error: ") and message in errors[0]
    assert uvicorn_runs == []


@pytest.mark.parametrize("host,key,warned", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.20", None, True), ("myhost.example", None, True),
    ("0.0.0.0", "k", False), ("127.0.0.1", None, False), ("127.0.1.1", None, False), ("::1", None, False),
    ("localhost", None, False),
])
def test_a_server_open_to_the_network_without_a_key_warns_in_one_line(checkpoint, uvicorn_runs, capsys, host, key,
                                                                       warned):
    flags = ["--host", host] + (["--api-key", key] if key else [])
    assert serve_main(checkpoint, *flags) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    if warned:
        assert len(warnings) == 1 and host in warnings[0] and "SCRATCHGPT_API_KEY" in warnings[0]
    else:
        assert warnings == []


# --- more doors: several keys, CORS, TLS, a connection limit -------------------------------------------------------

def test_any_of_several_keys_opens_the_api(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny", api_key=["key-one", "key-two"])
    assert [status_of(app, key) for key in ("key-one", "key-two", "key-three", None)] == [200, 200, 401, 401]


def test_allowed_origins_get_cors_headers_and_others_do_not(tiny):
    from fastapi.testclient import TestClient

    model, tokenizer = tiny
    client = TestClient(create_app(model, tokenizer, "tiny", api_key=KEY, allowed_origins=["https://class.example"]))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = client.options("/v1/completions", headers={"Origin": "https://class.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://class.example"
    other = client.options("/v1/completions", headers={"Origin": "https://elsewhere.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    answer = client.post("/v1/completions", json={"prompt": "the ", "max_tokens": 2}, headers={**AUTH, "Origin": "https://class.example"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://class.example"
    plain = TestClient(create_app(model, tokenizer, "tiny"))  # no origins given: no CORS headers at all
    assert "access-control-allow-origin" not in plain.get("/health", headers={"Origin": "https://class.example"}).headers


def test_serve_takes_a_key_file_origins_tls_and_a_connection_limit(checkpoint, uvicorn_runs, tmp_path, capsys):
    keys = tmp_path / "keys.txt"
    keys.write_text("# the class\nalice-key\n\nbob-key\n", encoding="utf-8")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x"), key.write_text("x")
    assert serve_main(checkpoint, "--api-key-file", str(keys), "--allowed-origins", "https://a.example",
                      "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--max-connections", "40") == 0
    config = uvicorn_runs[0]
    assert (config.ssl_certfile, config.ssl_keyfile, config.limit_concurrency) == (str(cert), str(key), 40)
    assert [status_of(config.app, k) for k in ("alice-key", "bob-key", "eve-key")] == [200, 200, 401]
    assert "https://127.0.0.1" in capsys.readouterr().out
    assert serve_main(checkpoint) == 0 and uvicorn_runs[1].limit_concurrency == 256


@pytest.mark.parametrize("flags, message", [
    (["--ssl-certfile", "cert.pem"], "both --ssl-certfile and --ssl-keyfile"),
    (["--ssl-certfile", "nowhere.pem", "--ssl-keyfile", "nowhere.pem"], "--ssl-certfile nowhere.pem: no such file"),
    (["--api-key-file", "nowhere.txt"], "--api-key-file nowhere.txt: cannot read it"),
    (["--max-connections", "0"], "--max-connections must be >= 1"),
])
def test_bad_door_flags_are_one_line_errors(checkpoint, uvicorn_runs, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text("x")
    assert serve_main(checkpoint, *flags) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not uvicorn_runs


def test_serve_exits_non_zero_once_its_engine_is_gone(checkpoint, monkeypatch, capsys):
    """So that a supervisor (systemd, a container's restart policy) starts it again."""
    import time

    import uvicorn

    def run(self, sockets=None):
        self.started = True
        self.config.app.state.server.scheduler._runner.send(("no_such_command",))  # the engine loop fails
        deadline = time.monotonic() + 10
        while not self.should_exit:
            assert time.monotonic() < deadline, "serve did not notice its engine was gone"
            time.sleep(0.05)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("SCRATCHGPT_API_KEY", raising=False)
    assert serve_main(checkpoint, "--in-process") == 1
    err = capsys.readouterr().err
    assert "stopped unexpectedly" in err and "so that its supervisor can start it again" in err


@pytest.mark.parametrize("flags, compiled", [([], False), (["--compile"], True)])
def test_serve_compile_flag_reaches_the_engine(checkpoint, monkeypatch, flags, compiled):
    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda *args, **kwargs: seen.update(kwargs))
    assert serve_main(checkpoint, *flags) == 0
    assert seen["batching"].compile is compiled
