"""Helpers for the server tests: a tiny trained checkpoint, and a real uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import tiny_config


def train_tiny_checkpoint(corpus: Path, out: Path) -> Path:
    """A 2-layer GPT trained for a few seconds on the corpus; returns its run directory."""
    from scratchgpt.train import train

    train(tiny_config(corpus, max_steps=40, eval_interval=40), out, progress=False, log=lambda line: None)
    return out


@contextmanager
def running_server(app, **config):
    """Serve `app` with uvicorn on a free local port (`config`: more uvicorn.Config settings); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
