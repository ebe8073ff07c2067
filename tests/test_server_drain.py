"""`scratchgpt serve` as a real process, stopped with SIGTERM while it streams: it stops accepting
connections, lets the running request finish (up to --drain-seconds), and exits with status 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is a POSIX signal")

TEXT = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random one-layer model with a 16-token context: thousands of tokens a second on a CPU."""
    import torch

    from scratchgpt.build import build_model
    from scratchgpt.checkpoint import save_checkpoint
    from scratchgpt.config import Config, ModelConfig
    from scratchgpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return save_checkpoint(tmp_path_factory.mktemp("drain") / "tiny", model.eval(), tokenizer,
                           Config(model=model.config), {"step": 0})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint, drain_seconds: float):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scratchgpt", "serve", "--checkpoint", str(checkpoint), "--port",
                             str(port), "--device", "cpu", "--threads", "1", "--max-tokens-cap", "1000000",
                             "--drain-seconds", str(drain_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            httpx.get(f"{url}/health")
            return proc, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "scratchgpt serve did not answer within 60 s"
            time.sleep(0.1)


class Reader(threading.Thread):
    """Streams one completion, keeping every `data:` payload and when the stream ended."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list = []
        self.first = threading.Event()
        self.ended_at: float | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", timeout=120,
                              json={"prompt": "the ", "max_tokens": self.max_tokens, "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.first.set()
        except Exception as exc:  # noqa: BLE001 - a cut stream is an outcome the test checks
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:  # accepted, then closed by the shutdown: not refused yet
        return False
    return False


def wait_refused(url: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not refused(url):
        assert time.monotonic() < deadline, f"the server still accepted connections {timeout} s after SIGTERM"
        time.sleep(0.05)
    return time.monotonic()


def test_sigterm_lets_a_running_stream_finish_then_exits_0(checkpoint):
    drain = 30.0
    proc, url = start_server(checkpoint, drain)
    try:
        max_tokens = 2500  # about 2.5 s here; SIGTERM comes after the first piece of text
        reader = Reader(url, max_tokens)
        reader.start()
        assert reader.first.wait(60) and reader.error is None, reader.error
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        events_then = len(reader.events)

        wait_refused(url, timeout=5)  # no new connections...
        still_streaming = reader.ended_at is None
        reader.join(timeout=drain + 30)
        code = proc.wait(timeout=drain + 30)
        exited = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert still_streaming, "the stream ended before the server stopped accepting connections: lengthen it"
    assert reader.error is None, f"the stream was cut: {reader.error!r}\n{log}"
    assert len(reader.events) > events_then  # ...while the running request went on
    assert reader.events[-1] == "[DONE]"
    text = "".join(event["choices"][0]["text"] for event in reader.events[:-1])
    assert len(text) == max_tokens and reader.events[-2]["choices"][0]["finish_reason"] == "length"
    assert code == 0, log
    assert exited - signalled < drain
    assert refused(url)
    assert "Traceback" not in log


def test_the_drain_is_bounded_by_drain_seconds(checkpoint):
    drain = 1.0
    proc, url = start_server(checkpoint, drain)
    try:
        reader = Reader(url, 1_000_000)  # minutes of text
        reader.start()
        assert reader.first.wait(60) and reader.error is None, reader.error
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(timeout=drain + 20)
        exited = time.monotonic()
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert code == 0, log
    assert drain <= exited - signalled < drain + 10, log
    assert "[DONE]" not in reader.events  # cut at the bound
    assert refused(url)

