"""The HTTP server, against a real uvicorn on a free port: the API, the official openai client,
bad requests, concurrent requests with one seed, and a client that goes away."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving import running_server, train_tiny_checkpoint  # noqa: E402

from scratchgpt import load  # noqa: E402
from scratchgpt.sample import generate_text  # noqa: E402
from scratchgpt.serving.server import BatchingLimits, create_app  # noqa: E402

CAP = 100_000  # large, so that an uncancelled generation would run far past the disconnect test's wait


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_corpus):
    return train_tiny_checkpoint(small_corpus, tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "own-process"])
def served(request, tiny_run):
    """The server, its model's scheduler in the server's process and in a process of its own (`scratchgpt serve`)."""
    model, tokenizer = load(tiny_run)
    app = create_app(model, tokenizer, "tiny", max_tokens_cap=CAP, batching=BatchingLimits(own_process=request.param))
    with running_server(app) as url:
        yield url, model, tokenizer


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def stream_events(url: str, **body) -> list:
    """The parsed `data:` payloads of a streamed completion, "[DONE]" kept as a string."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_names_the_model_and_its_config(served):
    url, model, _ = served
    info = httpx.get(f"{url}/health").json()
    assert info["status"] == "ok" and info["model"] == "tiny"
    assert info["config"]["n_layer"] == 2 and info["config"]["block_size"] == model.config.block_size
    assert info["max_tokens_cap"] == CAP


def test_completion_matches_the_library_and_reports_logprobs(served):
    url, model, tokenizer = served
    answer = post(url, prompt="the ", max_tokens=25, temperature=0, logprobs=3).json()
    choice = answer["choices"][0]
    assert choice["text"] == generate_text(model, tokenizer, "the ", max_new_tokens=25, temperature=0)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 25, "total_tokens": 29}
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == list(range(4, 29))  # from the start of the prompt, one character per token
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert logprob <= 0 and top[token] == logprob and len(top) <= 4
        assert logprob == max(top.values())  # greedy: the chosen token is the most likely one


def test_stream_sends_the_same_text_as_one_answer(served):
    url, _, _ = served
    body = dict(prompt="the ", max_tokens=30, temperature=1.0, top_k=10, seed=5)
    whole = post(url, **body).json()["choices"][0]["text"]
    events = stream_events(url, **body)
    assert events[-1] == "[DONE]" and len(events) > 3  # streamed in pieces
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole
    assert chunks[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])
    assert all(e["object"] == "text_completion" and e["model"] == "tiny" for e in events[:-1])


def test_stream_usage_comes_last_when_asked(served):
    url, _, _ = served
    events = stream_events(url, prompt="the ", max_tokens=7, seed=1, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}
    assert all("usage" not in e for e in events[:-2])

def test_stop_string_and_several_samples(served):
    url, _, _ = served
    answer = post(url, prompt="the ", max_tokens=200, seed=2, n=3, stop=["\n", "zz"]).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    for choice in answer["choices"]:  # the corpus has a newline every few words
        assert "\n" not in choice["text"] and choice["finish_reason"] == "stop"
    events = stream_events(url, prompt="the ", max_tokens=200, seed=2, n=3, stop="\n")
    for i, choice in enumerate(answer["choices"]):  # the same seed gives the same samples when streamed
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i) == choice["text"]


def test_the_official_openai_client_works(served):
    openai = pytest.importorskip("openai")
    url, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
    completion = client.completions.create(model="tiny", prompt="the ", max_tokens=20, seed=9, logprobs=2)
    text = completion.choices[0].text
    assert len(text) == 20 and completion.usage.completion_tokens == 20
    assert completion.choices[0].logprobs.tokens == list(text)
    streamed = client.completions.create(model="tiny", prompt="the ", max_tokens=20, seed=9, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="the ", temperature=-1)
    assert "temperature" in str(exc.value)


@pytest.mark.parametrize("body,message", [
    ({"max_tokens": 5}, "prompt is required"),
    ({"prompt": ""}, "prompt must not be empty"),
    ({"prompt": "the", "temperature": -0.5}, "temperature must be 0 (greedy) or >= 0.0001"),
    ({"prompt": "the", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "the", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "the", "max_tokens": CAP + 1}, f"max_tokens must be <= {CAP}"),
    ({"prompt": "the", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt": "the \u03a9"}, "'\u03a9'"),
    ({"prompt": "the", "n": 0}, "n must be between 1 and"),
    ({"prompt": "the", "temperature": "hot"}, "temperature"),
    ({"prompt": ["a", "b"]}, "one string"),
])
def test_bad_requests_get_400_with_a_json_message(served, body, message):
    url, _, _ = served
    response = post(url, **body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    if "temperature" in body or "top_p" in body:  # the field at fault, as OpenAI names it
        assert response.json()["error"]["param"] == next(k for k in ("temperature", "top_p") if k in body)
    response = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_sixteen_concurrent_requests_get_the_text_of_one(served):
    url, _, _ = served
    body = dict(prompt="the ", max_tokens=30, temperature=1.0, seed=123)
    alone = post(url, **body).json()["choices"][0]["text"]

    def one(i: int) -> str:  # half of them streamed
        if i % 2:
            return "".join(e["choices"][0]["text"] for e in stream_events(url, **body)[:-1])
        return post(url, **body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == [alone] * 16
    assert post(url, **{**body, "seed": 124}).json()["choices"][0]["text"] != alone


def test_every_door_gives_the_same_text_for_a_seed(served, tiny_run, capsys):
    """scratchgpt sample, generate_text, and the server alone, streamed, and beside 15 others with extreme settings."""
    from scratchgpt.cli import main

    url, model, tokenizer = served
    settings = dict(max_tokens=40, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1, seed=77)
    library = generate_text(model, tokenizer, "the ", max_new_tokens=40, temperature=0.9, top_k=20, top_p=0.95,
                            repetition_penalty=1.1, seed=77)
    assert main(["sample", "--checkpoint", str(tiny_run), "--prompt", "the ", "--max-new-tokens", "40",
                 "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--repetition-penalty", "1.1",
                 "--seed", "77"]) == 0
    assert capsys.readouterr().out == "the " + library + "\n"
    assert post(url, prompt="the ", **settings).json()["choices"][0]["text"] == library
    assert "".join(e["choices"][0]["text"] for e in stream_events(url, prompt="the ", **settings)[:-1]) == library
    extreme = [dict(temperature=1e-4, top_k=1), dict(repetition_penalty=1000.0, top_k=3), dict(temperature=2.0, n=3),
               dict(temperature=0, stop=["e"])]

    def neighbour(i: int) -> int:
        return post(url, prompt="ab" * (i + 1), max_tokens=60, seed=i, **extreme[i % len(extreme)]).status_code

    with ThreadPoolExecutor(16) as pool:
        beside = pool.submit(lambda: post(url, prompt="the ", **settings).json()["choices"][0]["text"])
        codes = list(pool.map(neighbour, range(15)))
        assert beside.result() == library and set(codes) == {200}


def wait_until_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = httpx.get(f"{url}/health").json()
        if info["active_requests"] == 0:
            return info
        time.sleep(0.05)
    raise AssertionError(f"a generation was still running {timeout} s after its client left")


def test_a_client_that_disconnects_stops_its_generation(served):
    url, _, _ = served
    before = wait_until_idle(url)["tokens_generated"]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "the ", "max_tokens": CAP, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is generating
    # leaving the block closed the connection mid-stream
    after = wait_until_idle(url)["tokens_generated"]
    assert 0 < after - before < CAP

    # the same without streaming: the request is sent, then the socket closed before the answer
    host, port = urlparse(url).hostname, urlparse(url).port
    before = after
    body = json.dumps({"prompt": "the ", "max_tokens": CAP}).encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["tokens_generated"] == before:  # until it has started
            assert time.monotonic() < deadline
            time.sleep(0.02)
    after = wait_until_idle(url)["tokens_generated"]
    assert 0 < after - before < CAP


def test_playground_page_is_served(served):
    url, _, _ = served
    response = httpx.get(url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "/v1/completions" in response.text and 'id="generate"' in response.text


def test_serve_command_starts_a_server(tiny_run):
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scratchgpt", "serve", "--checkpoint", str(tiny_run), "--port", str(port),
                             "--max-tokens-cap", "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/health").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "scratchgpt serve did not answer within 60 s"
                time.sleep(0.1)
        assert info["model"] == "tiny/best" and info["max_tokens_cap"] == 50
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "the ", "max_tokens": 51})
        assert response.status_code == 400 and "--max-tokens-cap" in response.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from scratchgpt.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
