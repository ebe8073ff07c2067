"""The engine loop in a process of its own, so that the model's Python and the server's do not share a lock.

A Python process runs one thread of Python at a time (the interpreter lock). In one process the
engine's step and the server's event loop, which turns every chunk into a JSON event and a socket
write, take turns on that lock, and a server with many clients stays at one core however many the
machine has. Here the engine loop (scheduler.py's `EngineLoop`, the same one a thread runs) lives
in a child process with its own interpreter; the server process decides admission and streams,
and the two work at the same time on two cores. (vLLM separates its engine from its API server
in the same way, for the same reason.)

The model reaches the child once, through shared memory (PyTorch's multiprocessing, "spawn"), the
tokenizer by pickling; then commands (start a job, a reader left, close) go down a pipe and each
step's items (text, ends, errors) come back in one message. A job carries its prompt's ids, its
settings and its seed, so the child draws exactly the tokens a thread would
(tests/test_scheduler_process.py). The child ignores SIGINT and SIGTERM: the server drains its
requests first, then closes the pipe, and the child exits.

As with any "spawn" child, the child imports the program's main module again: a script that
starts one should keep its own work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import functools
import queue
import signal
import sys
import threading
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from ..device import governed, governor_ceiling
from ..errors import ScratchGPTError
from .loop import EngineLoop, Item

START_TIMEOUT_S = 120.0  # the child imports PyTorch and takes the model; a slow disk may take a while


class ProcessRunner:
    """The engine loop in a child process; `send(command)` and `close()` as ThreadRunner's."""

    def __init__(self, model: torch.nn.Module, tokenizer, slots: int, deliver: Callable[[list[Item]], None],
                 on_exit: Callable[[str], None], threads: int | None = None, compile: bool = False):
        """Start the child with `model` (moved to shared memory) and `threads` PyTorch threads (default: this
        process's count, following the machine's load as this process's would); return once it is ready."""
        self._deliver, self._on_exit = deliver, on_exit
        context = mp.get_context("spawn")  # fork would copy this process's threads' locks mid-use
        self._conn, child_end = context.Pipe()
        model.share_memory()
        ceiling = governor_ceiling() if not threads else None
        self._process = context.Process(target=_child, name="scratchgpt-engine", daemon=True,
                                        args=(model, tokenizer, slots, threads or torch.get_num_threads(), ceiling,
                                              compile, child_end))
        self._process.start()
        child_end.close()
        self._wait_until_ready()
        self._closing = False
        self._outbox: queue.Queue = queue.Queue()  # commands, sent by a thread of their own: never blocks a caller
        self._sender = threading.Thread(target=self._send_loop, name="scratchgpt-engine-writer", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="scratchgpt-engine-reader", daemon=True)
        self._sender.start()
        self._receiver.start()
        # Closed at exit before multiprocessing's own hook, which would send the child a SIGTERM it ignores and wait.
        atexit.register(self.close)

    def _wait_until_ready(self) -> None:
        try:
            ready = self._conn.poll(START_TIMEOUT_S) and self._conn.recv() == "ready"
        except (EOFError, OSError):  # it died while starting (say, the model could not reach it)
            self._process.join(timeout=5)
            raise ScratchGPTError(f"the engine's process exited while starting (exit code {self._process.exitcode})") from None
        if not ready:
            self._process.kill()
            raise ScratchGPTError(f"the engine's process did not start within {START_TIMEOUT_S:.0f} s")

    def send(self, command: tuple) -> None:
        self._outbox.put(command)

    def close(self) -> None:
        """End the child: running requests end where they are."""
        atexit.unregister(self.close)
        if not self._closing:
            self._closing = True
            self._outbox.put(("close",))
        self._sender.join(timeout=10)
        self._receiver.join(timeout=10)
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _send_loop(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # the child is gone; the receiver says so
                return
            if command[0] == "close":
                return

    def _receive(self) -> None:
        """Hand each step's items to the scheduler, until the child ends (closed, or died)."""
        while True:
            try:
                items = self._conn.recv()
            except (EOFError, OSError):
                break
            self._deliver(items)
        self._process.join(timeout=1)  # so that its exit code is known
        if self._closing:
            self._on_exit("the server is shutting down")
        else:
            self._on_exit(f"the engine's process stopped unexpectedly (exit code {self._process.exitcode})")


def _child(model: torch.nn.Module, tokenizer, slots: int, threads: int, ceiling: int | None, compile: bool,
           conn) -> None:
    """The child process: an EngineLoop fed from the pipe; each step's items go back as one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM reach the server, which drains, then closes us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)

    def receive(block: bool) -> tuple | None:
        try:
            if block or conn.poll():
                return conn.recv()
        except (EOFError, OSError):  # the server is gone
            return ("close",)
        return None

    say = functools.partial(print, file=sys.stderr, flush=True)
    with governed(0 if ceiling else threads, say=say, most=ceiling):
        loop = EngineLoop(model, tokenizer, slots, conn.send, compile)
        conn.send("ready")
        loop.run(receive)
    conn.close()
